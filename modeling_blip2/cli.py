"""The `blip2-bridge` command line. Each subcommand is one `add_*_command` function registered in `SUBCOMMANDS`."""

import argparse
import sys
from pathlib import Path

from .convert_lavis import VISION_PRESETS, load_lavis_checkpoint
from .hub import load_blip2_bridge_folder
from .evaluation.command import add_evaluate_command
from .quickstart.command import add_quickstart_command
from .training.cli_cache_features import add_cache_features_command
from .training.cli_capfilt import add_capfilt_command
from .training.cli_train import add_train_command


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except (ValueError, OSError) as error:
        # Bad inputs end with one readable line, not a traceback.
        print(f"blip2-bridge {args.command}: error: {error}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="blip2-bridge", description="BLIP-2 for the Hugging Face ecosystem."
    )
    subcommands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_command in SUBCOMMANDS:
        add_command(subcommands)
    return parser


# ---- convert ----------------------------------------------------------------------------------------------------


def add_convert_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "convert",
        help="convert an original checkpoint to a blip2-bridge model folder, or a stage-2 model to transformers' BLIP-2",
        description="Convert an original BLIP-2 checkpoint to a model folder that AutoModel.from_pretrained loads "
        "(after `import modeling_blip2`), or a stage-2 model to transformers' Blip2ForConditionalGeneration format.",
    )
    parser.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=["lavis", "blip2-bridge"],
        help="checkpoint format: an original LAVIS .pth file, or a blip2-bridge model folder",
    )
    parser.add_argument(
        "--to",
        dest="target_format",
        default="blip2-bridge",
        choices=["blip2-bridge", "transformers"],
        help="output format: a blip2-bridge model folder (default), or transformers' Blip2ForConditionalGeneration "
        "(stage-2 models with a Blip2VisionModel tower)",
    )
    parser.add_argument(
        "checkpoint",
        metavar="CHECKPOINT",
        help="LAVIS .pth file ({'model': state_dict}): stage 1 (blip2, blip2_feature_extractor) or stage 2 (blip2_opt, "
        "blip2_t5); or a blip2-bridge model folder",
    )
    parser.add_argument("--output", required=True, metavar="DIR", help="folder to write the converted model to")
    parser.add_argument(
        "--vision",
        metavar="PRESET|FILE.json",
        help=f"vision tower: a preset ({', '.join(VISION_PRESETS)}) or a transformers vision config JSON; "
        "default: the preset of the checkpoint's tower",
    )
    parser.add_argument(
        "--vision-checkpoint",
        metavar="FILE.pth",
        help="the vision tower's own weights (LAVIS's eva_vit_g.pth or clip_vit_L.pth), for checkpoints saved "
        "without their frozen image encoder",
    )
    parser.add_argument(
        "--qformer-config", metavar="FILE.json", help="BERT-style Q-Former config; default: BERT-base"
    )
    parser.add_argument(
        "--language-model",
        metavar="PATH",
        help="stage-2 checkpoints: the pretrained LLM they were trained with (folder or hub id, e.g. facebook/opt-2.7b); "
        "its tokenizer, with <image> added, is saved next to the model",
    )
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    if args.source_format == "lavis":
        model, tokenizer = load_lavis_checkpoint(
            args.checkpoint,
            vision=args.vision,
            qformer_config=args.qformer_config,
            vision_checkpoint=args.vision_checkpoint,
            language_model=args.language_model,
        )
        text_config = model.config.text_config
        source = "LAVIS stage 1" if text_config is None else f"LAVIS stage 2, LLM {text_config.model_type}"
    else:
        lavis_options = ("vision", "vision_checkpoint", "qformer_config", "language_model")
        given = [f"--{name.replace('_', '-')}" for name in lavis_options if getattr(args, name) is not None]
        if given:
            raise ValueError(f"{', '.join(given)} apply to --from lavis only; a blip2-bridge folder holds its config")
        model, tokenizer = load_blip2_bridge_folder(args.checkpoint)
        source = f"blip2-bridge {type(model).__name__}"
    if args.target_format == "transformers":
        from .export_transformers import export_to_transformers

        saved = export_to_transformers(model, args.output, tokenizer=tokenizer)
        target = f"transformers {type(saved).__name__}"
    else:
        model.save_pretrained(args.output)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.output)
        saved, target = model, "blip2-bridge"

    parameters = list(saved.parameters())
    total = sum(parameter.numel() for parameter in parameters)
    trainable = sum(parameter.numel() for parameter in parameters if parameter.requires_grad)
    output = Path(args.output).resolve()
    size_on_disk = sum(file.stat().st_size for file in output.glob("*.safetensors"))
    vision_config = model.config.vision_config
    vision = f"{vision_config.model_type}, {vision_config.num_hidden_layers} layers"
    print(f"Converted {args.checkpoint} ({source}, vision tower {vision}) to {target}")
    print(f"  {count(total)} parameters, {count(trainable)} trainable; {size_on_disk / 1e6:,.1f} MB of safetensors")
    print(f"  written to {output}")
    return 0


def count(number: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= scale:
            return f"{number / scale:.2f}{unit}"
    return str(number)


SUBCOMMANDS = (
    add_quickstart_command, add_convert_command, add_train_command, add_evaluate_command, add_cache_features_command,
    add_capfilt_command,
)


if __name__ == "__main__":
    sys.exit(main())
