"""Stage-1 training step (forward + backward of ITC + ITM + ITG): ours against the original implementation.

The original is `tests/lavis_reference.py`, a re-statement of salesforce/LAVIS's Blip2Qformer with its passes, eager
attention and per-sample negative sampling. Shapes come from benchmarks/configs/stage1_small.json (image_embeds are fed
directly; the frozen vision pass is excluded). Each implementation runs in its own process, alternating, so that peak
memory is measured alone and both see the same machine conditions.

    python benchmarks/stage1_step.py [--steps 8] [--rounds 2] [--text captions|full] [--shapes FILE.json]

Before/after a change, in one run: install the earlier tree beside this one and add it as "baseline",
    pip install --no-deps --target /tmp/baseline-site <earlier checkout>
    python benchmarks/stage1_step.py --implementations ours:sdpa,baseline:sdpa --baseline-site /tmp/baseline-site

--text captions (default) pads captions of varied length (a third of text_length to all of it) to text_length, as a
caption batch is; --text full fills every position with a real token, the worst case for skipping padding.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_SHAPES = REPO / "benchmarks" / "configs" / "stage1_small.json"
BASELINE_SITE = ""  # --baseline-site: where "baseline" implementations import modeling_blip2 from


def make_inputs(shapes: dict, text: str):
    import torch

    generator = torch.Generator().manual_seed(0)
    batch, text_length = shapes["batch_size"], shapes["text_length"]
    image_embeds = torch.randn(batch, shapes["num_image_tokens"], shapes["vision_width"], generator=generator)
    input_ids = torch.randint(1000, shapes["qformer"]["vocab_size"] - 1, (batch, text_length), generator=generator)
    input_ids[:, 0] = 101  # [CLS]
    lengths = torch.randint(text_length // 3, text_length + 1, (batch,), generator=generator)
    if text == "full":
        lengths.fill_(text_length)
    attention_mask = (torch.arange(text_length)[None] < lengths[:, None]).long()
    return image_embeds, input_ids.masked_fill(attention_mask == 0, 0), attention_mask


def build_step(implementation: str, shapes: dict, text: str):
    """Returns a function running one forward + backward."""
    import torch

    qformer = shapes["qformer"]
    dec_id = qformer["vocab_size"] - 1
    image_embeds, input_ids, attention_mask = make_inputs(shapes, text)
    if implementation == "original":
        sys.path.insert(0, str(REPO))
        from tests.lavis_reference import LavisBlip2Qformer, lavis_state_dict_random

        config = dict(qformer, vision_width=shapes["vision_width"], num_query_tokens=shapes["num_query_tokens"],
                      embed_dim=shapes["embed_dim"])
        model = LavisBlip2Qformer(config, lavis_state_dict_random(config))

        def step():
            out = model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask,
                        bos_token_id=dec_id)
            out["loss"].backward()
            model.zero_grad(set_to_none=True)
    else:
        if implementation.startswith("baseline"):
            sys.path.insert(0, BASELINE_SITE)  # found before the installed (editable) package
        from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeModel

        config = Blip2BridgeConfig(
            vision_config=dict(model_type="blip_2_vision_model", hidden_size=shapes["vision_width"],
                               num_hidden_layers=1, num_attention_heads=6, intermediate_size=4),
            qformer_config=dict(qformer, bos_token_id=dec_id, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0),
            num_query_tokens=shapes["num_query_tokens"],
            embed_dim=shapes["embed_dim"],
        )
        config._attn_implementation = implementation.split(":")[1] if ":" in implementation else "sdpa"
        model = Blip2BridgeModel(config).train()

        def step():
            model(image_embeds=image_embeds, input_ids=input_ids, attention_mask=attention_mask).loss.backward()
            model.zero_grad(set_to_none=True)
    return step


def run_one(implementation: str, shapes: dict, steps: int, text: str) -> dict:
    import torch

    torch.set_num_threads(shapes.get("threads", 2))
    torch.manual_seed(0)
    step = build_step(implementation, shapes, text)
    step()  # warm-up: allocator, kernels, first-touch memory
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        seconds.append(time.perf_counter() - start)
    peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
    return {"implementation": implementation, "median_s": statistics.median(seconds), "min_s": min(seconds),
            "peak_rss_gb": peak_rss_gb}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=str(DEFAULT_SHAPES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2, help="alternating runs of each implementation")
    parser.add_argument("--implementations", default="original,ours:sdpa,ours:eager")
    parser.add_argument("--text", choices=["captions", "full"], default="captions")
    parser.add_argument("--baseline-site", default="",
                        help="a folder holding another modeling_blip2 (pip install --target), run as 'baseline:<attn>'")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    global BASELINE_SITE
    BASELINE_SITE = args.baseline_site
    if "baseline" in args.implementations and not BASELINE_SITE:
        parser.error("a 'baseline' implementation needs --baseline-site")
    shapes = json.loads(Path(args.shapes).read_text())

    if args.worker:
        print(json.dumps(run_one(args.worker, shapes, args.steps, args.text)))
        return

    results: dict[str, list[dict]] = {}
    for _ in range(args.rounds):
        for implementation in args.implementations.split(","):
            command = [sys.executable, __file__, "--worker", implementation, "--shapes", args.shapes,
                       "--steps", str(args.steps), "--text", args.text, "--baseline-site", args.baseline_site]
            output = subprocess.run(command, check=True, capture_output=True, text=True, cwd=REPO).stdout
            results.setdefault(implementation, []).append(json.loads(output.strip().splitlines()[-1]))

    print(f"stage-1 step, batch {shapes['batch_size']}, {shapes['num_image_tokens']} image tokens, text "
          f"{shapes['text_length']}, Q-Former {shapes['qformer']['num_hidden_layers']}x{shapes['qformer']['hidden_size']},"
          f" {shapes.get('threads', 2)} threads, text={args.text}, {args.steps} steps x {args.rounds} rounds")
    print(f"{'implementation':<16}{'median s/step':>15}{'best s/step':>13}{'peak RSS GB':>13}")
    summary = {}
    for implementation, runs in results.items():
        median = statistics.median(r["median_s"] for r in runs)
        best = min(r["min_s"] for r in runs)
        rss = max(r["peak_rss_gb"] for r in runs)
        summary[implementation] = (median, rss)
        print(f"{implementation:<16}{median:>15.3f}{best:>13.3f}{rss:>13.2f}")
    for reference in ("original", *(name for name in summary if name.startswith("baseline"))):
        if reference not in summary:
            continue
        reference_seconds, reference_rss = summary[reference]
        for implementation, (seconds, rss) in summary.items():
            if implementation != reference and not implementation.startswith(("original", "baseline")):
                print(f"{implementation}: {reference_seconds / seconds:.2f}x faster than {reference}, "
                      f"memory {rss / reference_rss:.2f}x of {reference}")


if __name__ == "__main__":
    main()
