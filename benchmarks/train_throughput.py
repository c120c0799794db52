"""Training throughput through `Blip2BridgeTrainer`: samples/s and peak memory of stage-1 and stage-2 steps.

CPU (always): stage 1 on the shapes of benchmarks/configs/stage1_small.json (image_embeds fed directly, as
benchmarks/stage1_step.py) and stage 2 on benchmarks/configs/stage2_small.json (pixels through the frozen vision tower,
the Q-Former, and the frozen OPT), fp32, peak RSS of the process.
CUDA (when available): stage 1 of a CLIP ViT-L/14 + BERT-base Q-Former (32 queries, batch 64, random weights, pixels
through the frozen tower) in bf16 autocast with the frozen tower in bf16; samples/s, peak GPU memory and model FLOPs
utilisation (FLOPs of one step counted by torch's FlopCounterMode, over the GPU's dense bf16 peak).

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--stage 1 2] [--peak-tflops 989]
"""

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset
from transformers import TrainerCallback

REPO = Path(__file__).resolve().parents[1]
SHAPES = REPO / "benchmarks" / "configs"
# Dense bf16 tensor-core peaks (TFLOP/s) of the GPUs we may be lent; pass --peak-tflops for others.
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


class RandomBatches(Dataset):
    """`length` copies of one generated sample, the images shifted by the sample's index: throughput does not depend on
    the values, but stage 1 refuses a batch of one repeated image (no in-batch negatives)."""

    def __init__(self, sample: dict, length: int):
        self.sample, self.length = sample, length

    def __len__(self):
        return self.length

    def __getitem__(self, index):
        return {
            name: value + index if name in ("image_embeds", "pixel_values") else value
            for name, value in self.sample.items()
        }


class StepTimer(TrainerCallback):
    """Wall time of the steps after the first `warmup`."""

    def __init__(self, warmup: int, synchronize: bool):
        self.warmup, self.synchronize, self.start, self.seconds = warmup, synchronize, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if self.synchronize:
            torch.cuda.synchronize()
        if state.global_step == self.warmup:
            self.start = time.perf_counter()
        elif state.global_step == args.max_steps:
            self.seconds = time.perf_counter() - self.start


def text_sample(vocab_size: int, text_length: int, generator: torch.Generator) -> dict:
    input_ids = torch.randint(1000, vocab_size - 1, (text_length,), generator=generator)
    input_ids[0] = 101  # [CLS]
    return {"input_ids": input_ids, "attention_mask": torch.ones(text_length, dtype=torch.long)}


def stage1_small():
    from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeModel

    shapes = json.loads((SHAPES / "stage1_small.json").read_text())
    qformer = dict(shapes["qformer"], bos_token_id=shapes["qformer"]["vocab_size"] - 1)
    # image_embeds are fed directly: the vision tower only sets the width and is never run.
    vision = dict(model_type="blip_2_vision_model", hidden_size=shapes["vision_width"], intermediate_size=64,
                  num_hidden_layers=1, num_attention_heads=1)
    config = Blip2BridgeConfig(vision_config=vision, qformer_config=qformer,
                               num_query_tokens=shapes["num_query_tokens"], embed_dim=shapes["embed_dim"])
    generator = torch.Generator().manual_seed(0)
    sample = {"image_embeds": torch.randn(shapes["num_image_tokens"], shapes["vision_width"], generator=generator),
              **text_sample(qformer["vocab_size"], shapes["text_length"], generator)}
    return Blip2BridgeModel(config), sample, shapes["batch_size"]


def stage2_small():
    from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeForConditionalGeneration

    shapes = json.loads((SHAPES / "stage2_small.json").read_text())
    text_config = shapes["text_config"]
    image_token_id = text_config["vocab_size"] - 1
    # A stage-2 Q-Former reads no text: without use_text_input=False it would carry unused word embeddings.
    config = Blip2BridgeConfig(vision_config=shapes["vision_config"],
                               qformer_config={**shapes["qformer_config"], "use_text_input": False},
                               text_config=text_config, num_query_tokens=shapes["num_query_tokens"],
                               image_token_id=image_token_id)
    generator = torch.Generator().manual_seed(0)
    vision = shapes["vision_config"]
    text_length = shapes["prompt_tokens"] + shapes["new_tokens"]  # a caption of prompt + answer length
    text = torch.randint(3, image_token_id, (text_length,), generator=generator)
    input_ids = torch.cat([torch.full((shapes["num_query_tokens"],), image_token_id),
                           torch.tensor([text_config["bos_token_id"]]), text])
    labels = input_ids.masked_fill(input_ids == image_token_id, -100)
    sample = {"pixel_values": torch.randn(3, vision["image_size"], vision["image_size"], generator=generator),
              "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    return Blip2BridgeForConditionalGeneration(config), sample, shapes["batch_size"]


def stage1_vit_l_bert_base():
    from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeModel

    vision = dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                  num_attention_heads=16, image_size=224, patch_size=14)
    qformer = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
                   vocab_size=30523, bos_token_id=30522, cross_attention_frequency=2)
    config = Blip2BridgeConfig(vision_config=vision, qformer_config=qformer, num_query_tokens=32, embed_dim=256,
                               vision_feature_layer=-2)
    generator = torch.Generator().manual_seed(0)
    sample = {"pixel_values": torch.randn(3, 224, 224, generator=generator),
              **text_sample(qformer["vocab_size"], 32, generator)}
    return Blip2BridgeModel(config), sample, 64


def measure(model, sample: dict, batch_size: int, steps: int, warmup: int, cuda: bool) -> dict:
    from modeling_blip2 import Blip2BridgeTrainer
    from modeling_blip2.training import Blip2BridgeTrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        args = Blip2BridgeTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=warmup + steps,
            learning_rate=1e-4, weight_decay=0.05, logging_steps=10**6, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=not cuda, bf16=cuda, frozen_dtype="bfloat16" if cuda else None,
            dataloader_num_workers=0,
        )
        timer = StepTimer(warmup, synchronize=cuda)
        trainer = Blip2BridgeTrainer(model=model, args=args, callbacks=[timer],
                                     train_dataset=RandomBatches(sample, batch_size * (warmup + steps)))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
    result = {"samples_per_s": batch_size * steps / timer.seconds, "s_per_step": timer.seconds / steps}
    if cuda:
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def step_flops(trainer_model, sample: dict, batch_size: int) -> float:
    """FLOPs of one forward + backward, counted by torch (matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    batch = {name: value.unsqueeze(0).expand(batch_size, *value.shape).cuda() for name, value in sample.items()}
    counter = FlopCounterMode(display=False)
    with counter, torch.autocast("cuda", dtype=torch.bfloat16):
        trainer_model(**batch).loss.backward()
    trainer_model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def peak_tflops(requested: float | None) -> float | None:
    if requested is not None:
        return requested
    name = torch.cuda.get_device_name()
    return next((peak for gpu, peak in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--stage", type=int, nargs="+", default=[1, 2], choices=[1, 2], help="CPU stages to run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the shapes files say 2)")
    parser.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak, for MFU (default: known GPUs)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    builders = {1: ("stage 1, stage1_small.json", stage1_small), 2: ("stage 2, stage2_small.json", stage2_small)}
    for stage in args.stage:
        label, build = builders[stage]
        torch.manual_seed(0)
        model, sample, batch_size = build()
        result = measure(model, sample, batch_size, args.steps, args.warmup, cuda=False)
        peak_rss_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        print(f"CPU fp32 {label}: batch {batch_size}, {result['samples_per_s']:.2f} samples/s "
              f"({result['s_per_step']:.2f} s/step), peak RSS so far {peak_rss_gb:.2f} GB", flush=True)
        del model

    if torch.cuda.is_available():
        torch.manual_seed(0)
        model, sample, batch_size = stage1_vit_l_bert_base()
        result = measure(model, sample, batch_size, args.steps, args.warmup, cuda=True)
        flops = step_flops(model, sample, batch_size)
        line = (f"GPU bf16 stage 1, ViT-L/14 + BERT-base Q-Former, batch {batch_size} ({torch.cuda.get_device_name()}):"
                f" {result['samples_per_s']:.1f} samples/s ({result['s_per_step'] * 1000:.0f} ms/step), peak memory "
                f"{result['peak_gpu_memory_gb']:.1f} GB, {flops / 1e12:.2f} TFLOP/step")
        peak = peak_tflops(args.peak_tflops)
        if peak is not None:
            line += f", MFU {100 * flops / result['s_per_step'] / (peak * 1e12):.1f}% of {peak:.0f} TFLOP/s"
        print(line, flush=True)
    else:
        print("no CUDA device: the bf16 ViT-L/14 + BERT-base measurement is skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
