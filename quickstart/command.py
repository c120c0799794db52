"""The arguments of `blip2-bridge quickstart`, one per `QuickstartSettings` field, and the command itself."""

import argparse
from dataclasses import fields

from .run import SIZE_PRESETS, QuickstartSettings, run_quickstart


def add_quickstart_command(subcommands) -> None:
    parser = subcommands.add_parser(
        "quickstart",
        help="train and evaluate a small BLIP-2 end to end on generated scenes (CPU, minutes, no download)",
        description="Generates a corpus of drawn scenes with captions and questions, pre-trains a small image encoder "
        "and LLM on it, runs stage 1 and stage 2, and evaluates retrieval, captioning and VQA on held-out scenes "
        "next to the untrained model. Writes the model, results.json, loss_curves.png and samples.png.",
    )
    add_quickstart_arguments(parser)
    parser.set_defaults(run=run_quickstart_command)


def add_quickstart_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--size",
        choices=list(SIZE_PRESETS),
        default="default",
        help="preset of corpus size and steps; the options below override it (default: %(default)s)",
    )
    for setting in fields(QuickstartSettings):
        # A switch reads --name / --no-name; bool("False") would be True.
        kind = {"action": argparse.BooleanOptionalAction} if isinstance(setting.default, bool) else {
            "type": type(setting.default), "metavar": setting.name.split("_")[-1].upper()
        }
        parser.add_argument(
            f"--{setting.name.replace('_', '-')}",
            dest=setting.name,
            default=None,
            help=f"{setting.metadata['help']} (default: {setting.default})",
            **kind,
        )


def settings_from_arguments(args: argparse.Namespace) -> QuickstartSettings:
    chosen = {setting.name: getattr(args, setting.name) for setting in fields(QuickstartSettings)}
    return QuickstartSettings(**{**SIZE_PRESETS[args.size], **{k: v for k, v in chosen.items() if v is not None}})


def run_quickstart_command(args: argparse.Namespace) -> int:
    run_quickstart(settings_from_arguments(args))
    return 0
