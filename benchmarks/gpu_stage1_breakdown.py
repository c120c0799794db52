"""Where a stage-1 GPU step goes: the step outside the Trainer, the frozen tower's forward alone, the rest (Q-Former
passes, losses, optimiser) from the tower's features, and torch.profiler's table of that rest; with --lavis, the
original's tower (LAVIS's EVA ViT-g) alone beside ours.

The shapes are benchmarks/train_throughput.py's GPU stage 1 (EVA ViT-g/14 cut to 39 blocks, BERT-base Q-Former, 32
queries, 32 text tokens), bf16 autocast with the frozen tower in bf16, fused AdamW, inputs already on the GPU.

    python benchmarks/gpu_stage1_breakdown.py [--batch 256] [--steps 5] [--lavis salesforce_lavis-1.0.2-*.whl]
"""

import argparse
import sys
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import train_throughput  # noqa: E402  (a sibling script, not a package)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=train_throughput.GPU_BATCH[1])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--rows", type=int, default=30, help="rows of the profiler's table")
    parser.add_argument("--lavis", help="a salesforce-lavis wheel or unpacked folder: time the original's tower too")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to measure")
        return 0
    from modeling_blip2.training.trainer import cast_for_training

    device = torch.device("cuda")
    torch.manual_seed(0)
    model, sample = train_throughput.ours_gpu(1, device)
    cast_for_training(model, torch.bfloat16)
    model.train()
    batch = {name: value.unsqueeze(0).expand(args.batch, *value.shape).contiguous().to(device)
             for name, value in sample.items()}
    batch["pixel_values"] += torch.arange(args.batch, device=device)[:, None, None, None]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                                  fused=True)
    autocast = partial(torch.autocast, "cuda", dtype=torch.bfloat16)
    seconds_per_call = partial(train_throughput.seconds_per_call, calls=args.steps, warmup=2, device=device)

    def train_step(**inputs):
        with autocast():
            loss = model(**inputs).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def tower():
        with torch.no_grad(), autocast():
            return model.get_vision_features(batch["pixel_values"])

    torch.cuda.reset_peak_memory_stats()
    step = seconds_per_call(lambda: train_step(**batch))
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"batch {args.batch} ({torch.cuda.get_device_name()}): step {step * 1000:.0f} ms, peak {peak:.1f} GB",
          flush=True)
    print(f"frozen tower's forward: {seconds_per_call(tower) * 1000:.0f} ms", flush=True)
    text = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    features = tower()
    rest = seconds_per_call(lambda: train_step(vision_features=features, **text))
    print(f"the rest (Q-Former passes, losses, optimiser) from the tower's features: {rest * 1000:.0f} ms", flush=True)

    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(2):
            train_step(vision_features=features, **text)
        torch.cuda.synchronize()
    print(profiler.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=70))

    if args.lavis:
        from lavis_original import lavis_eva_vit, load_lavis_blip2

        with device:
            original = lavis_eva_vit(load_lavis_blip2(args.lavis), train_throughput.eva_vit_g(), torch.bfloat16).eval()

        def original_tower():
            with torch.no_grad(), autocast():
                return original(batch["pixel_values"])

        print(f"the original's tower forward: {seconds_per_call(original_tower) * 1000:.0f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
