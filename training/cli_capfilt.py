"""`blip2-bridge capfilt`: caption and filter an image-caption corpus with our own models (`training.capfilt`)."""

import argparse
import json

from .capfilt import CaptionerSettings, KeepRule, capfilt, capfilt_webdataset


def add_capfilt_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "capfilt",
        help="write synthetic captions for a corpus and keep the captions an image-text filter trusts (BLIP's CapFilt)",
        description="CapFilt, as BLIP-2's pre-training data was made: a captioner samples --num-captions captions per "
        "image (nucleus sampling), a stage-1 filter scores them with the web caption (ITC similarity, ITM "
        "probability) and the keep rule selects the captions to train on. Writes annotations.json (or webdataset "
        "shards) that `blip2-bridge train` reads, and capfilt_summary.json. Run under `accelerate launch` to split "
        "the work across processes; rerunning with the same arguments resumes an interrupted run.",
    )
    data = parser.add_argument_group("input (one of)")
    inputs = data.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--annotation-file", metavar="FILE",
                        help="COCO-style or LAVIS-style captions JSON; images under --image-root")
    inputs.add_argument("--image-folder", metavar="DIR",
                        help="a folder of images with metadata.jsonl or a .txt caption beside each image")
    inputs.add_argument("--shards", nargs="+", metavar="TAR",
                        help="webdataset tar shards (paths or globs); output as shards too")
    data.add_argument("--image-root", default="", metavar="DIR", help="root of the images --annotation-file names")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="stage-1 model folder (with its processor): the filter, and the captioner unless "
                        "--captioner is given")
    parser.add_argument("--captioner", metavar="DIR",
                        help="stage-1 model (its Q-Former decoder) or stage-2 model that writes the captions; default "
                        "--model")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for the output and its shards")

    caption = parser.add_argument_group("captioner")
    caption.add_argument("--num-captions", type=int, default=10,
                         help="synthetic captions per image (default 10, as BLIP-2); 0 filters the web captions only")
    caption.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass (default 0.9)")
    caption.add_argument("--prompt", help="text the captions continue, left out of the kept caption (default: none "
                         "for a stage-1 captioner, the captioning prompt of the LLM for stage 2, e.g. 'a photo of')")
    caption.add_argument("--max-new-tokens", type=int, help="default 29 (stage 1, as LAVIS), the captioning setting "
                         "for stage 2")
    caption.add_argument("--min-new-tokens", type=int, help="default 9 (stage 1, as LAVIS), the captioning setting "
                         "for stage 2")

    keep = parser.add_argument_group("filter and keep rule")
    keep.add_argument("--rank-by", choices=["itc", "itm"], default="itc",
                      help="score that orders an image's captions: ITC similarity or ITM probability (default itc)")
    keep.add_argument("--top-k", type=int, default=2,
                      help="captions kept per image, best first (default 2, as BLIP-2); 0 keeps every caption that "
                      "passes --itm-threshold")
    keep.add_argument("--itm-threshold", type=float, metavar="P",
                      help="keep only captions whose ITM match probability is at least P (BLIP's filter: 0.5)")
    keep.add_argument("--synthetic-itm-threshold", type=float, metavar="P",
                      help="the threshold of synthetic captions instead of --itm-threshold: a stricter bar for the "
                      "captioner's near misses (default: the same for both)")

    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--shard-size", type=int, default=1024,
                        help="images per resumable shard (default 1024; webdataset input: one input shard each)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the nucleus sampling (default 0)")
    parser.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16 or float16")
    parser.set_defaults(run=run_capfilt)


def load_model(folder: str, dtype: str, device):
    import torch
    from transformers import AutoProcessor

    from ..hub import load_blip2_bridge_folder

    torch_dtype = getattr(torch, dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"dtype is {dtype!r}; expected a torch dtype name such as float32, bfloat16 or float16")
    model, _ = load_blip2_bridge_folder(folder)
    return model.to(device, torch_dtype).eval(), AutoProcessor.from_pretrained(folder)


def run_capfilt(args: argparse.Namespace) -> int:
    from accelerate import Accelerator

    captioner_settings = CaptionerSettings(
        num_captions=args.num_captions,
        top_p=args.top_p,
        prompt=args.prompt,
        max_new_tokens=args.max_new_tokens,
        min_new_tokens=args.min_new_tokens,
    )
    keep_rule = KeepRule(
        rank_by=args.rank_by, top_k=args.top_k or None, itm_threshold=args.itm_threshold,
        synthetic_itm_threshold=args.synthetic_itm_threshold,
    )
    accelerator = Accelerator()
    filter_model, filter_processor = load_model(args.model, args.dtype, accelerator.device)
    captioner_model = captioner_processor = None
    if args.captioner is not None:
        captioner_model, captioner_processor = load_model(args.captioner, args.dtype, accelerator.device)
    common = dict(
        output_dir=args.output,
        filter_model=filter_model,
        filter_processor=filter_processor,
        captioner_model=captioner_model,
        captioner_processor=captioner_processor,
        captioner_settings=captioner_settings,
        keep_rule=keep_rule,
        batch_size=args.batch_size,
        seed=args.seed,
        accelerator=accelerator,
    )
    if args.shards:
        summary = capfilt_webdataset(args.shards, **common)
    else:
        from .datasets import load_annotation_file, load_image_folder

        if args.annotation_file:
            dataset, source = load_annotation_file(args.annotation_file, args.image_root), args.annotation_file
        else:
            dataset, source = load_image_folder(args.image_folder), args.image_folder
        summary = capfilt(dataset, shard_size=args.shard_size, source=source, **common)
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0
