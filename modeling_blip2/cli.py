"""The `blip2-bridge` command line. Each subcommand is one `add_*_command` function registered in `SUBCOMMANDS`."""

import argparse
import sys
from pathlib import Path

from .convert_lavis import VISION_PRESETS, convert_lavis_checkpoint
from .quickstart.command import add_quickstart_command
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
        help="convert an original checkpoint to a blip2-bridge model folder",
        description="Convert an original BLIP-2 checkpoint to a model folder that AutoModel.from_pretrained loads "
        "(after `import modeling_blip2`).",
    )
    parser.add_argument("--from", dest="source_format", required=True, choices=["lavis"], help="checkpoint format")
    parser.add_argument("checkpoint", metavar="CHECKPOINT", help="LAVIS stage-1 .pth file ({'model': state_dict})")
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
    parser.set_defaults(run=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    model = convert_lavis_checkpoint(
        args.checkpoint,
        args.output,
        vision=args.vision,
        qformer_config=args.qformer_config,
        vision_checkpoint=args.vision_checkpoint,
    )
    parameters = list(model.parameters())
    total = sum(parameter.numel() for parameter in parameters)
    trainable = sum(parameter.numel() for parameter in parameters if parameter.requires_grad)
    output = Path(args.output).resolve()
    size_on_disk = sum(file.stat().st_size for file in output.glob("*.safetensors"))
    vision_config = model.config.vision_config
    vision = f"{vision_config.model_type}, {vision_config.num_hidden_layers} layers"
    print(f"Converted {args.checkpoint} (LAVIS stage 1, vision tower {vision})")
    print(f"  {count(total)} parameters, {count(trainable)} trainable; {size_on_disk / 1e6:,.1f} MB of safetensors")
    print(f"  written to {output}")
    return 0


def count(number: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if number >= scale:
            return f"{number / scale:.2f}{unit}"
    return str(number)


SUBCOMMANDS = (add_convert_command, add_train_command, add_quickstart_command)


if __name__ == "__main__":
    sys.exit(main())
