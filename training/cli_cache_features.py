"""`blip2-bridge cache-features`: the frozen vision tower's features of a dataset, to disk (`training.feature_cache`)."""

import argparse
import json

from .feature_cache import STORAGE_DTYPES, cache_features


def add_cache_features_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "cache-features",
        help="run a model's frozen vision tower once over a dataset and store its features for training",
        description="Runs the frozen vision tower of a blip2-bridge model (either stage) over every distinct image of "
        "a dataset and writes its features at config.vision_feature_layer, before vision_layernorm, as safetensors "
        "shards keyed by image path, with feature_cache.json naming the tower they belong to. `blip2-bridge train "
        "--feature_cache DIR` then trains without running the tower. Rerunning with the same arguments resumes an "
        "interrupted run; run under `accelerate launch` to split the work across processes.",
    )
    data = parser.add_argument_group("input (one of)")
    inputs = data.add_mutually_exclusive_group(required=True)
    inputs.add_argument("--annotation-files", nargs="+", metavar="FILE",
                        help="COCO-style or LAVIS-style captions JSON files, as `train --annotation_files`; images "
                        "under --image-root")
    inputs.add_argument("--image-folder", metavar="DIR",
                        help="a folder of images with metadata.jsonl or a .txt caption beside each image")
    inputs.add_argument("--shards", nargs="+", metavar="TAR",
                        help="webdataset tar shards (paths or globs), keyed by each sample's __key__; their images are "
                        "held in memory until cached")
    data.add_argument("--image-root", metavar="DIR", help="the folder the annotation files' image paths start in")
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="the blip2-bridge model folder (either stage) whose tower to run, with its image processor")
    parser.add_argument("--output", required=True, metavar="DIR", help="the cache folder to write")
    parser.add_argument("--dtype", default="bfloat16", choices=STORAGE_DTYPES,
                        help="storage dtype of the features (default bfloat16: half the disk of float32, rounding "
                        "to about 3 significant digits; float32 is exact)")
    parser.add_argument("--views", type=int, default=0,
                        help="0 (default): one view per image, the processor's plain resize; N: N random resized "
                        "crop + flip views per image, training draws one per sample (at most N distinct crops, where "
                        "training from pixels draws a new one every step)")
    parser.add_argument("--min-crop-scale", type=float, default=0.5,
                        help="--views: smallest crop area, as a fraction of the image (default 0.5, as train)")
    parser.add_argument("--seed", type=int, default=0, help="--views: seed of the crops (default 0)")
    parser.add_argument("--batch-size", type=int, default=32, help="images per tower forward (default 32)")
    parser.add_argument("--shard-size", type=int, default=1024, help="images per resumable shard (default 1024)")
    parser.add_argument("--model-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype the tower computes in: float32 (default), bfloat16 or float16 (a cache made in "
                        "another dtype has another tower checksum)")
    parser.set_defaults(run=run_cache_features)


def run_cache_features(args: argparse.Namespace) -> int:
    import torch
    from accelerate import Accelerator

    from ..hub import load_blip2_bridge_folder
    from ..processing import Blip2BridgeImageProcessor
    from .datasets import load_annotation_file, load_image_folder, load_webdataset

    torch_dtype = getattr(torch, args.model_dtype, None)
    if not isinstance(torch_dtype, torch.dtype):
        raise ValueError(f"--model-dtype is {args.model_dtype!r}; expected float32, bfloat16 or float16")
    if args.annotation_files:
        if args.image_root is None:
            raise ValueError("--annotation-files needs --image-root, the folder their image paths start in")
        import datasets

        parts = [load_annotation_file(path, args.image_root) for path in args.annotation_files]
        dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    elif args.shards:
        dataset = load_webdataset(args.shards)
    else:
        dataset = load_image_folder(args.image_folder)
    accelerator = Accelerator()
    model, _ = load_blip2_bridge_folder(args.model)
    model = model.to(accelerator.device, torch_dtype)
    try:
        image_processor = Blip2BridgeImageProcessor.from_pretrained(args.model)
    except OSError:
        image_processor = None  # the plain resize to vision_config.image_size, as `train` does
    summary = cache_features(
        model,
        dataset,
        args.output,
        image_processor=image_processor,
        storage_dtype=args.dtype,
        num_views=args.views,
        min_crop_scale=args.min_crop_scale,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        accelerator=accelerator,
    )
    if summary is not None:
        print(json.dumps(summary, indent=2))
    return 0


__all__ = ["add_cache_features_command"]
