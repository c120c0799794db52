"""Stage-1 training epochs from pixels against epochs from the feature cache (`blip2-bridge cache-features`), side by side.

The setting makes the frozen tower a real share of the step: a ViT-S/16-sized Blip2VisionModel at 224 px (12 layers,
width 384, 197 tokens), a small Q-Former (4 layers, width 256, 32 queries), batch 8, 32 generated JPEG images. One epoch
= collate (open, augment and process the images / read the cached features) + forward + backward + AdamW step for every
batch. The pixel run augments as `blip2-bridge train` does (random resized crop + flip); the cache holds one plain view
per image (`--views 0`, the default). Epochs alternate (pixels, cache) for --rounds rounds; medians are reported, with the
one-off time of writing the cache and the number of epochs after which it has paid for itself.

    python benchmarks/feature_cache.py                      # the setting above
    python benchmarks/feature_cache.py --images 8 --batch-size 4 --image-size 56 --vision-layers 2 --rounds 1  # CI smoke

Prints one JSON object (seconds per epoch, ratio); --target 3 makes the exit status 1 when the ratio is below it.
"""

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from transformers import BertTokenizer

from modeling_blip2 import Blip2BridgeConfig, Blip2BridgeImageProcessor, Blip2BridgeModel, Blip2BridgeProcessor
from modeling_blip2.training.augmentation import RandomResizedCropAndFlip
from modeling_blip2.training.collators import ImageCaptionCollator
from modeling_blip2.training.feature_cache import FeatureCache, cache_features

WORDS = ("a photo of cat dog man woman boat field street red green blue small old sitting running on in with the "
         "near under riding holding playing across sky lake park").split()
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=32, help="images (one caption each) in the epoch (default 32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--vision-layers", type=int, default=12, help="ViT-S: 12")
    parser.add_argument("--vision-width", type=int, default=384, help="ViT-S: 384 (6 heads of 64)")
    parser.add_argument("--qformer-layers", type=int, default=4)
    parser.add_argument("--qformer-width", type=int, default=256)
    parser.add_argument("--num-query-tokens", type=int, default=32)
    parser.add_argument("--text-length", type=int, default=20)
    parser.add_argument("--storage-dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--rounds", type=int, default=2, help="epochs of each kind, alternating (default 2)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--target", type=float, default=None, help="exit 1 when pixels/cache is below this ratio")
    return parser.parse_args(argv)


def write_images(folder: Path, count: int, seed: int = 0) -> list[dict]:
    """JPEG photos-to-be of 320x256 with a random caption each."""
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(count):
        pixels = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)  # a coarse pattern, upscaled: JPEG-like content
        image = PIL.Image.fromarray(pixels).resize((320, 256), PIL.Image.Resampling.BILINEAR)
        path = folder / f"{index:04d}.jpg"
        image.save(path, quality=90)
        caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 12))))
        rows.append({"image": str(path), "caption": caption})
    return rows


def build_model(args) -> tuple[Blip2BridgeModel, Blip2BridgeProcessor]:
    tokenizer = BertTokenizer(vocab={token: index for index, token in enumerate([*SPECIAL_TOKENS, *sorted(set(WORDS))])})
    tokenizer.add_special_tokens({"bos_token": "[DEC]"})
    heads = max(1, args.vision_width // 64)
    config = Blip2BridgeConfig(
        vision_config=dict(
            model_type="blip_2_vision_model", hidden_size=args.vision_width, intermediate_size=4 * args.vision_width,
            num_hidden_layers=args.vision_layers, num_attention_heads=heads, image_size=args.image_size,
            patch_size=args.patch_size,
        ),
        qformer_config=dict(
            hidden_size=args.qformer_width, num_hidden_layers=args.qformer_layers,
            num_attention_heads=max(1, args.qformer_width // 64), intermediate_size=4 * args.qformer_width,
            vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, sep_token_id=tokenizer.sep_token_id,
            pad_token_id=tokenizer.pad_token_id, max_position_embeddings=64,
        ),
        num_query_tokens=args.num_query_tokens,
        embed_dim=128,
        vision_feature_layer=-2,
    )
    torch.manual_seed(0)
    model = Blip2BridgeModel(config)
    image_processor = Blip2BridgeImageProcessor(size={"height": args.image_size, "width": args.image_size})
    return model, Blip2BridgeProcessor(image_processor, tokenizer, max_text_length=args.text_length)


def train_epoch(model, optimizer, collator, rows, batch_size: int, seed: int) -> float:
    """Seconds of one epoch: every batch collated, forward, backward, optimiser step."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(seed)).tolist()
    model.train()
    start = time.perf_counter()
    for first in range(0, len(order) - batch_size + 1, batch_size):
        batch = collator([rows[index] for index in order[first : first + batch_size]])
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main(argv=None) -> int:
    args = parse_arguments(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, processor = build_model(args)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        (folder / "images").mkdir()
        rows = write_images(folder / "images", args.images)
        start = time.perf_counter()
        cache_features(model, rows, folder / "cache", processor.image_processor, storage_dtype=args.storage_dtype,
                       batch_size=args.batch_size)
        caching_seconds = time.perf_counter() - start
        pixels = ImageCaptionCollator(processor, image_transform=RandomResizedCropAndFlip(processor.image_processor))
        cached = ImageCaptionCollator(processor, feature_cache=FeatureCache(folder / "cache"))
        # One warm-up batch of each (first-call allocations), not timed.
        train_epoch(model, optimizer, pixels, rows[: args.batch_size], args.batch_size, seed=0)
        train_epoch(model, optimizer, cached, rows[: args.batch_size], args.batch_size, seed=0)
        times = {"pixels": [], "cache": []}
        for round_index in range(args.rounds):
            times["pixels"].append(train_epoch(model, optimizer, pixels, rows, args.batch_size, seed=round_index))
            times["cache"].append(train_epoch(model, optimizer, cached, rows, args.batch_size, seed=round_index))
    pixel_epoch, cache_epoch = statistics.median(times["pixels"]), statistics.median(times["cache"])
    ratio = pixel_epoch / cache_epoch
    saved = pixel_epoch - cache_epoch
    result = {
        "setting": {
            "images": args.images, "batch_size": args.batch_size, "image_size": args.image_size,
            "vision": f"Blip2VisionModel {args.vision_layers} layers x {args.vision_width}, patch {args.patch_size}",
            "qformer": f"{args.qformer_layers} layers x {args.qformer_width}, {args.num_query_tokens} queries",
            "storage_dtype": args.storage_dtype, "threads": torch.get_num_threads(),
        },
        "seconds_per_epoch": {"pixels": round(pixel_epoch, 3), "cache": round(cache_epoch, 3)},
        "epochs_measured": {name: [round(t, 3) for t in values] for name, values in times.items()},
        "speedup": round(ratio, 2),
        "caching_seconds_once": round(caching_seconds, 3),
        "cache_pays_off_after_epochs": round(caching_seconds / saved, 2) if saved > 0 else None,
    }
    print(json.dumps(result, indent=2))
    if args.target is not None and ratio < args.target:
        print(f"speedup {ratio:.2f}x is below the target {args.target}x", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
