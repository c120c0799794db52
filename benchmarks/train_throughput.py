"""Training throughput through `Blip2BridgeTrainer`: samples/s and peak memory of stage-1 and stage-2 steps.

CPU (always): stage 1 on the shapes of benchmarks/configs/stage1_small.json (image_embeds fed directly, as
benchmarks/stage1_step.py) and stage 2 on benchmarks/configs/stage2_small.json (pixels through the frozen vision tower,
the Q-Former, and the frozen OPT), fp32, peak RSS of the process.
CUDA (when available): the paper's shapes with random weights, in bf16 autocast with the frozen tower and LLM in bf16,
each measurement in its own process: stage 1 of an EVA ViT-g/14 (39 blocks, as LAVIS cuts it) + BERT-base Q-Former (32
queries, 32 text tokens, batch 256) and stage 2 of the same + an OPT-2.7B-sized LLM (batch 128); a batch that does not
fit is halved. Samples/s, peak GPU memory and model FLOPs utilisation (FLOPs of one step counted by torch's
FlopCounterMode, over the GPU's dense bf16 peak). With --lavis, the original (salesforce/LAVIS's Blip2Qformer and
Blip2OPT, loaded by benchmarks/lavis_original.py) runs on the same GPU, precision, shapes and batch, and the ratio is
printed.

    python benchmarks/train_throughput.py [--steps 6] [--warmup 2] [--stage 1 2] [--gpu-stage 1 2] [--peak-tflops 989]
    pip download --no-deps salesforce-lavis==1.0.2 -d /tmp/lavis
    python benchmarks/train_throughput.py --stage --lavis /tmp/lavis/salesforce_lavis-1.0.2-py3-none-any.whl
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
            name: value + index if name in ("image_embeds", "pixel_values", "vision_features") else value
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


def measure(model, sample: dict, batch_size: int, steps: int, warmup: int, cuda: bool, loader_workers: int = 0) -> dict:
    from modeling_blip2 import Blip2BridgeTrainer
    from modeling_blip2.training import Blip2BridgeTrainingArguments

    with tempfile.TemporaryDirectory() as output_dir:
        args = Blip2BridgeTrainingArguments(
            output_dir=output_dir, per_device_train_batch_size=batch_size, max_steps=warmup + steps,
            learning_rate=1e-4, weight_decay=0.05, logging_steps=10**6, save_strategy="no", report_to="none",
            disable_tqdm=True, use_cpu=not cuda, bf16=cuda, frozen_dtype="bfloat16" if cuda else None,
            dataloader_num_workers=loader_workers, dataloader_pin_memory=cuda,
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



# GPU shapes: the paper's, with random weights. The tower is LAVIS's EVA ViT-g/14 as `convert --from lavis` builds it
# (39 blocks: the last one cut, its output read), the Q-Former BERT-base with 32 queries, 32 text tokens (LAVIS's
# max_txt_len), and in stage 2 an OPT-2.7B-sized LLM.
GPU_TEXT_LENGTH = 32
GPU_QUERY_TOKENS = 32
GPU_EMBED_DIM = 256
BERT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
QFORMER_VOCAB_SIZE, DEC_TOKEN_ID = 30523, 30522  # bert-base-uncased + [DEC], as LAVIS's init_tokenizer
OPT_2_7B = dict(model_type="opt", vocab_size=50272, hidden_size=2560, num_hidden_layers=32, ffn_dim=10240,
                num_attention_heads=32, word_embed_proj_dim=2560, max_position_embeddings=2048, pad_token_id=1,
                bos_token_id=2, eos_token_id=2)
OPT_IMAGE_TOKEN_ID = 50265  # the first unused row of OPT's padded vocabulary, as transformers' BLIP-2 checkpoints
GPU_BATCH = {1: 256, 2: 128}
GPU_LOADER_WORKERS = 4


def eva_vit_g() -> dict:
    from modeling_blip2.convert_lavis import VISION_PRESETS

    return dict(VISION_PRESETS["eva_clip_g"])


def gpu_text(vocab_low: int, vocab_high: int, first_token: int, generator: torch.Generator) -> torch.Tensor:
    input_ids = torch.randint(vocab_low, vocab_high, (GPU_TEXT_LENGTH,), generator=generator)
    input_ids[0] = first_token
    return input_ids


def ours_gpu(stage: int, device: torch.device, cached_features: bool = False):
    """Our model of the GPU shapes and one sample (CPU tensors, batched by the Trainer's collator). With
    `cached_features`, the sample holds the tower's output in bf16 (what `--feature_cache` reads) instead of pixels."""
    from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeForConditionalGeneration, Blip2BridgeModel

    tower = eva_vit_g()
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(3, tower["image_size"], tower["image_size"], generator=generator)
    qformer = dict(BERT_BASE, cross_attention_frequency=2, vocab_size=QFORMER_VOCAB_SIZE, bos_token_id=DEC_TOKEN_ID)
    if stage == 1:
        config = Blip2BridgeConfig(vision_config=tower, qformer_config=qformer, num_query_tokens=GPU_QUERY_TOKENS,
                                   embed_dim=GPU_EMBED_DIM, vision_feature_layer=-1)
        input_ids = gpu_text(1000, DEC_TOKEN_ID, 101, generator)  # [CLS] first
        sample = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if cached_features:
            image_length = (tower["image_size"] // tower["patch_size"]) ** 2 + 1
            sample["vision_features"] = torch.randn(image_length, tower["hidden_size"], generator=generator,
                                                    dtype=torch.bfloat16)
            del sample["pixel_values"]
        with device:  # initialised where it trains: a ViT-g's random init takes minutes on a CPU
            return Blip2BridgeModel(config), sample
    config = Blip2BridgeConfig(vision_config=tower, qformer_config=dict(qformer, use_text_input=False),
                               text_config=OPT_2_7B, num_query_tokens=GPU_QUERY_TOKENS,
                               image_token_id=OPT_IMAGE_TOKEN_ID, vision_feature_layer=-1)
    text = gpu_text(3, OPT_IMAGE_TOKEN_ID, OPT_2_7B["bos_token_id"], generator)  # BOS first
    input_ids = torch.cat([torch.full((GPU_QUERY_TOKENS,), OPT_IMAGE_TOKEN_ID), text])
    sample = {"pixel_values": pixel_values, "input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
              "labels": input_ids.masked_fill(input_ids == OPT_IMAGE_TOKEN_ID, -100)}
    with device:
        return Blip2BridgeForConditionalGeneration(config), sample


def seconds_per_call(function, calls: int, warmup: int, device: torch.device) -> float:
    """Wall seconds per call of `function` after `warmup` untimed calls, the device's queue drained around them."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        function()
    synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        function()
    synchronize()
    return (time.perf_counter() - start) / calls


def loss_of(output) -> torch.Tensor:
    return output["loss"] if isinstance(output, dict) else output.loss


def step_flops(model, device: torch.device, *args, **kwargs) -> float:
    """FLOPs of one forward + backward under bf16 autocast, counted by torch (matrix products and attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.autocast(device.type, dtype=torch.bfloat16):
        loss_of(model(*args, **kwargs)).backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def run_ours_gpu(stage: int, batch_size: int, steps: int, warmup: int, device: torch.device,
                 cached_features: bool = False) -> dict:
    torch.manual_seed(0)
    model, sample = ours_gpu(stage, device, cached_features)
    # Batches are assembled by loader processes, as a GPU run's are: the GPU does not wait for 256 images to be
    # stacked on the CPU between steps.
    result = measure(model, sample, batch_size, steps, warmup, cuda=device.type == "cuda",
                     loader_workers=GPU_LOADER_WORKERS)
    batch = {name: value.unsqueeze(0).expand(batch_size, *value.shape).to(device) for name, value in sample.items()}
    image_input = "vision_features" if cached_features else "pixel_values"
    shift = torch.arange(batch_size, device=device).view(-1, *[1] * sample[image_input].dim())
    batch[image_input] = batch[image_input] + shift
    model.train()
    result["tflop_per_step"] = step_flops(model, device, **batch) / 1e12
    return result


def run_lavis_gpu(stage: int, batch_size: int, steps: int, warmup: int, lavis: str, device: torch.device) -> dict:
    """The original on the same shapes: LAVIS's Blip2Qformer (stage 1) or Blip2OPT (stage 2), its forward under bf16
    autocast, backward, and a fused AdamW step as the Trainer's default optimiser takes for ours; inputs already on
    the GPU (ours come through the Trainer's data loader)."""
    import os

    import torch.distributed as dist

    sys.path.insert(0, str(REPO / "benchmarks"))
    from lavis_original import PretokenizedText, build_lavis_blip2_opt, build_lavis_blip2_qformer

    # LAVIS's stage 1 reads dist.get_rank() and all-gathers: it runs in a process group, here of one process.
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29577")
    if device.type == "cuda":
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)
    torch.manual_seed(0)
    tower = eva_vit_g()
    generator = torch.Generator().manual_seed(0)
    ones = torch.ones(batch_size, GPU_TEXT_LENGTH, dtype=torch.long, device=device)
    qformer_ids = torch.stack([gpu_text(1000, DEC_TOKEN_ID, 101, generator) for _ in range(batch_size)]).to(device)
    qformer_tokenizer = PretokenizedText(qformer_ids, ones, QFORMER_VOCAB_SIZE, DEC_TOKEN_ID)
    qformer = dict(BERT_BASE, cross_attention_freq=2)
    images = torch.randn(batch_size, 3, tower["image_size"], tower["image_size"], generator=generator).to(device)
    opt_ids = torch.stack([gpu_text(3, OPT_IMAGE_TOKEN_ID, OPT_2_7B["bos_token_id"], generator)
                           for _ in range(batch_size)]).to(device)
    with device:
        if stage == 1:
            model = build_lavis_blip2_qformer(lavis, tower=tower, qformer=qformer, num_query_tokens=GPU_QUERY_TOKENS,
                                              embed_dim=GPU_EMBED_DIM, tokenizer=qformer_tokenizer,
                                              tower_dtype=torch.bfloat16)
        else:
            opt_tokenizer = PretokenizedText(opt_ids, ones, OPT_2_7B["vocab_size"], OPT_2_7B["bos_token_id"],
                                             pad_token_id=OPT_2_7B["pad_token_id"])
            opt = {name: value for name, value in OPT_2_7B.items() if name != "model_type"}
            model = build_lavis_blip2_opt(lavis, tower=tower, qformer=qformer, num_query_tokens=GPU_QUERY_TOKENS,
                                          opt=opt, qformer_tokenizer=qformer_tokenizer, opt_tokenizer=opt_tokenizer,
                                          dtype=torch.bfloat16)
    model.train()
    samples = {"image": images, "text_input": [""] * batch_size}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.05,
                                  fused=device.type == "cuda")

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(model(samples))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    seconds_per_step = seconds_per_call(step, steps, warmup, device)
    result = {"samples_per_s": batch_size / seconds_per_step, "s_per_step": seconds_per_step}
    if device.type == "cuda":
        result["peak_gpu_memory_gb"] = torch.cuda.max_memory_allocated() / 2**30
    result["tflop_per_step"] = step_flops(model, device, samples) / 1e12
    dist.destroy_process_group()
    return result


def peak_tflops(requested: float | None) -> float | None:
    if requested is not None:
        return requested
    name = torch.cuda.get_device_name()
    return next((peak for gpu, peak in PEAK_BF16_TFLOPS.items() if gpu in name), None)


def gpu_worker(implementation: str, stage: int, batch_size: int, steps: int, warmup: int, lavis: str | None):
    """One measurement in this process; prints a JSON line (or the out-of-memory batch size)."""
    try:
        device = torch.device("cuda")
        if implementation.startswith("ours"):
            result = run_ours_gpu(stage, batch_size, steps, warmup, device, implementation == "ours, cached features")
        else:
            result = run_lavis_gpu(stage, batch_size, steps, warmup, lavis, device)
    except torch.cuda.OutOfMemoryError:
        result = {"out_of_memory": True}
    print(json.dumps(dict(result, implementation=implementation, stage=stage, batch_size=batch_size,
                          device=torch.cuda.get_device_name())), flush=True)


def run_gpu_measurement(implementation: str, stage: int, batch_size: int, args, halve_on_oom: bool = True) -> dict:
    """Runs `gpu_worker` in a fresh process (its own peak memory, no state shared between implementations), halving
    the batch on out-of-memory (or, without `halve_on_oom`, returning the out-of-memory record)."""
    import subprocess

    while True:
        command = [sys.executable, __file__, "--gpu-worker", implementation, "--gpu-stage", str(stage),
                   "--gpu-batch", str(batch_size), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        if args.lavis:
            command += ["--lavis", args.lavis]
        finished = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
        if finished.returncode != 0:
            print(f"{implementation} stage {stage} failed:\n{finished.stderr[-3000:]}", flush=True)
            return {"implementation": implementation, "stage": stage, "batch_size": batch_size, "failed": True}
        result = json.loads(finished.stdout.strip().splitlines()[-1])
        if not result.get("out_of_memory") or batch_size == 1 or not halve_on_oom:
            return result
        batch_size //= 2


def largest_fitting_batch(implementation: str, stage: int, batch_size: int, args) -> dict:
    """The measurement at the largest batch that fits: from `batch_size`, doubled until a step runs out of memory."""
    best = run_gpu_measurement(implementation, stage, batch_size, args)
    while "samples_per_s" in best and best["batch_size"] == batch_size:
        batch_size *= 2
        trial = run_gpu_measurement(implementation, stage, batch_size, args, halve_on_oom=False)
        if "samples_per_s" not in trial:
            print(f"stage {stage}, {implementation}: batch {batch_size} does not fit; the largest is "
                  f"{best['batch_size']}", flush=True)
            break
        best = trial
    return best


def gpu_measurements(args) -> list[dict]:
    peak = peak_tflops(args.peak_tflops)
    rows = []
    for stage in args.gpu_stage:
        batch_size = args.gpu_batch or GPU_BATCH[stage]
        # Stage 1 also from cached tower features (`blip2-bridge cache-features`), the tower's pass left out.
        implementations = (["ours"] + (["ours, cached features"] if stage == 1 else [])
                           + (["original"] if args.lavis else []))
        for implementation in implementations:
            if implementation == "ours" and args.largest_batch:
                result = largest_fitting_batch(implementation, stage, batch_size, args)
            else:
                result = run_gpu_measurement(implementation, stage, batch_size, args)
            batch_size = result["batch_size"]  # the others run at the batch ours fitted
            if peak is not None and "s_per_step" in result:
                result["mfu_percent"] = 100 * result["tflop_per_step"] / result["s_per_step"] / peak
            rows.append(result)
            model = "EVA ViT-g + BERT-base Q-Former" + (" + OPT-2.7B-sized LLM" if stage == 2 else "")
            if "s_per_step" not in result:
                if result.get("out_of_memory"):
                    print(f"GPU bf16 stage {stage} ({model}), {implementation}: out of memory at batch 1", flush=True)
                continue
            line = (f"GPU bf16 stage {stage} ({model}), {implementation}, batch {result['batch_size']} "
                    f"({result['device']}): {result['samples_per_s']:.1f} samples/s "
                    f"({result['s_per_step'] * 1000:.0f} ms/step), peak memory {result['peak_gpu_memory_gb']:.1f} GB, "
                    f"{result['tflop_per_step']:.1f} TFLOP/step")
            if "mfu_percent" in result:
                line += f", MFU {result['mfu_percent']:.1f}% of {peak:.0f} TFLOP/s"
            print(line, flush=True)
        original = next((row for row in rows if row["stage"] == stage and row["implementation"] == "original"
                         and "samples_per_s" in row), None)
        for row in rows:
            if original and row["stage"] == stage and row["implementation"] != "original" and "samples_per_s" in row:
                speedup = row["samples_per_s"] / original["samples_per_s"]
                print(f"GPU bf16 stage {stage}: {row['implementation']} {speedup:.2f}x the original's samples/s at "
                      f"batch {row['batch_size']}/{original['batch_size']}, peak memory "
                      f"{row['peak_gpu_memory_gb'] / original['peak_gpu_memory_gb']:.2f}x", flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=6, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    parser.add_argument("--stage", type=int, nargs="*", default=[1, 2], choices=[1, 2], help="CPU stages to run")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (the shapes files say 2)")
    parser.add_argument("--gpu-stage", type=int, nargs="*", default=[1, 2], choices=[1, 2],
                        help="GPU stages to run (with a CUDA device)")
    parser.add_argument("--gpu-batch", type=int, help=f"GPU batch size (default: {GPU_BATCH}, halved on OOM)")
    parser.add_argument("--largest-batch", action="store_true",
                        help="double ours' GPU batch until it no longer fits; the others then run at the largest")
    parser.add_argument("--lavis", help="a salesforce-lavis wheel or unpacked folder: time the original on the GPU too")
    parser.add_argument("--peak-tflops", type=float, help="GPU dense bf16 peak, for MFU (default: known GPUs)")
    parser.add_argument("--json", help="write the GPU measurements to this file")
    parser.add_argument("--gpu-worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.gpu_worker:
        gpu_worker(args.gpu_worker, args.gpu_stage[0], args.gpu_batch, args.steps, args.warmup, args.lavis)
        return 0
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

    if torch.cuda.is_available() and args.gpu_stage:
        rows = gpu_measurements(args)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    elif args.gpu_stage:
        print("no CUDA device: the GPU measurements (EVA ViT-g, BERT-base Q-Former, OPT-2.7B-sized) are skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
