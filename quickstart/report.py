"""The quickstart's report: a results table for the terminal, loss curves and sample captions as PNG files (matplotlib)."""

import math
from pathlib import Path

# Figures made directly (not through pyplot) render to files without a screen and leave matplotlib's global backend,
# and the figures of a notebook that imports this module, alone.
from matplotlib.figure import Figure
from PIL import Image


RIGHT_COLOUR, WRONG_COLOUR = "tab:green", "tab:red"


def draw_loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """`loss_curves_figure` saved as a PNG."""
    loss_curves_figure(curves).savefig(path, dpi=100)
    return path


def loss_curves_figure(curves: dict[str, dict[str, list[tuple[int, float]]]]) -> Figure:
    """One panel per training phase, one line per logged loss (stage 1: the total and each of ITC, ITM, ITG), on a
    log scale: the losses fall over orders of magnitude and the three stage-1 losses differ by one."""
    columns = 2
    rows = math.ceil(len(curves) / columns)
    figure = Figure(figsize=(6 * columns, 3.6 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, (phase, losses) in zip(axes.flat, curves.items()):
        for name, points in losses.items():
            points = [(step, value) for step, value in points if value > 0]  # a log scale has no room for 0
            if points:
                steps, values = zip(*points)
                axis.plot(steps, values, label=name, linewidth=1.5)
        axis.set_title(phase)
        axis.set_xlabel("step")
        axis.set_ylabel("loss")
        axis.set_yscale("log")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(loc="upper right", fontsize="small")
    for axis in axes.flat[len(curves) :]:
        axis.set_visible(False)
    figure.tight_layout()
    return figure


def draw_sample_grid(images: list[Image.Image], references: list[str], predictions: list[str], path: Path) -> Path:
    """Each held-out image with its true caption and the trained model's caption under it; the model's caption is
    green and marked "right" when it equals the true one, red and marked "wrong" otherwise."""
    columns = 4
    rows = math.ceil(len(images) / columns)
    figure = Figure(figsize=(3.4 * columns, 4.3 * rows))
    axes = figure.subplots(rows, columns, squeeze=False)
    for axis, image, reference, prediction in zip(axes.flat, images, references, predictions):
        right = prediction == reference
        axis.imshow(image)
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_edgecolor(RIGHT_COLOUR if right else WRONG_COLOUR)
            spine.set_linewidth(3)
        axis.text(0, -0.03, "\n".join(wrap(f"true: {reference}", 42)), transform=axis.transAxes, va="top",
                  fontsize=8, color="dimgray")
        verdict = "right" if right else "wrong"
        axis.text(0, -0.33, "\n".join(wrap(f"model ({verdict}): {prediction}", 42)), transform=axis.transAxes,
                  va="top", fontsize=8, color=RIGHT_COLOUR if right else WRONG_COLOUR)
    for axis in axes.flat[len(images) :]:
        axis.set_visible(False)
    figure.subplots_adjust(hspace=0.75, wspace=0.08, left=0.02, right=0.98, top=0.98, bottom=0.1)
    figure.savefig(path, dpi=100)
    return path


def wrap(text: str, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        if current and len(current) + 1 + len(word) > width:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}".strip()
    return lines + [current] if current else lines


def format_results_table(results) -> str:
    """The metrics next to the untrained model's, the phase timings and the files written."""
    rows = [*results.metrics.items()] + [
        (f"  VQA, {question_type}", values) for question_type, values in results.vqa_by_question_type.items()
    ]
    name_width = max(len(name) for name, _ in rows) + 2
    lines = ["", f"{'held-out metric':<{name_width}}{'untrained':>10}{'trained':>10}"]
    for name, values in rows:
        lines.append(f"{name:<{name_width}}{values['untrained']:>10.1f}{values['trained']:>10.1f}")
    if results.capfilt:
        capfilt = results.capfilt
        lines += ["", f"CapFilt: wrong captions {capfilt['wrong_before']:.1f}% before, {capfilt['wrong_after']:.1f}% "
                  f"after; right captions kept {capfilt['right_kept']:.1f}%",
                  f"{'stage-1 model trained on':<{name_width}}{'noisy':>10}{'filtered':>10}"]
        for name in capfilt["noisy"]:
            lines.append(f"{name:<{name_width}}{capfilt['noisy'][name]:>10.1f}{capfilt['filtered'][name]:>10.1f}")
    lines += ["", f"{'time per phase':<38}{'wall s':>8}{'CPU s':>8}"]
    for phase, seconds in results.timings.items():
        lines.append(f"  {phase:<36}{seconds['wall']:>8.1f}{seconds['cpu']:>8.1f}")
    total = {kind: sum(seconds[kind] for seconds in results.timings.values()) for kind in ("wall", "cpu")}
    lines.append(f"  {'total':<36}{total['wall']:>8.1f}{total['cpu']:>8.1f}")
    lines += ["", "written:"] + [f"  {name:<12} {path}" for name, path in results.files.items()]
    return "\n".join(lines)
