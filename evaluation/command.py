"""`blip2-bridge evaluate`: one benchmark, sharded across the processes of `accelerate launch`, resumable."""

import argparse
import json

from .runner import DEFAULTS, TASKS


def add_evaluate_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "evaluate",
        help="zero-shot VQA, captioning or retrieval benchmark of a model folder",
        description="Evaluate a model on a benchmark read from local annotation files (layout: docs/evaluation.md). "
        "Writes predictions.jsonl and metrics.json to --output. Run under `accelerate launch` to shard the work "
        "across processes; rerunning with the same arguments resumes an interrupted evaluation.",
    )
    parser.add_argument("--task", required=True, choices=TASKS)
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="model folder with its processor: stage 2 for VQA and captioning, stage 1 for retrieval")
    parser.add_argument("--data-dir", required=True, metavar="DIR", help="root of the annotation and image folders")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for predictions, metrics and shards")
    parser.add_argument("--batch-size", type=int, default=16, help="images per forward pass (default 16)")
    parser.add_argument("--shard-size", type=int, default=512,
                        help="questions or images per resumable shard (default 512)")
    parser.add_argument("--limit", type=int, metavar="N", help="evaluate only the first N questions or images")
    parser.add_argument("--k", type=int, default=128, help="retrieval: candidates ITM re-ranks per query (default 128)")
    parser.add_argument("--vqa-metric", choices=["official", "lavis"], default="official",
                        help="VQAv2/OK-VQA answer normalisation: the current official vqaEval.py or the older one "
                        "LAVIS vendors (default official); GQA always uses exact match")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16 or float16")
    generation = parser.add_argument_group(
        "generation (VQA and captioning; defaults per task and LLM family, listed in docs/evaluation.md)"
    )
    generation.add_argument("--defaults", choices=DEFAULTS, default="lavis",
                            help="lavis: LAVIS's released eval configs, which give the released numbers (default); "
                            "paper: the paper's text where it differs (VQA prompt 'Question: {} Answer:' for "
                            "decoder-only LLMs, length penalty -1; captioning prompt 'a photo of')")
    generation.add_argument("--prompt", help='prompt template; VQA fills "{}" with the question')
    generation.add_argument("--num-beams", type=int)
    generation.add_argument("--max-new-tokens", type=int)
    generation.add_argument("--min-new-tokens", type=int)
    generation.add_argument("--length-penalty", type=float)
    generation.add_argument("--repetition-penalty", type=float)
    generation.add_argument("--end-of-text", metavar="TEXT",
                            help="the one-token text that ends an answer or caption (default '\\n' for OPT, as the "
                            "original; the LLM's EOS for others); '' for the LLM's EOS token; in bash a newline is "
                            "$'\\n'")
    parser.set_defaults(run=run_evaluate)


def run_evaluate(args: argparse.Namespace) -> int:
    from .runner import evaluate

    names = ("prompt", "num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty",
             "end_of_text")
    generation = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    metrics = evaluate(
        args.task,
        args.model,
        args.data_dir,
        args.output,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        limit=args.limit,
        k=args.k,
        vqa_metric=args.vqa_metric,
        generation=generation or None,
        defaults=args.defaults,
        dtype=args.dtype,
    )
    if metrics is not None:
        print(json.dumps(metrics, indent=2))
    return 0
