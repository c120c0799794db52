"""The quickstart's report: a results table for the terminal, loss curves and sample captions as PNG files.

Drawn with PIL so that no plotting library is needed.
"""

import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont


LINE_COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]
PANEL_SIZE = (420, 280)
MARGIN = {"left": 56, "right": 12, "top": 28, "bottom": 30}


def font(size: int = 12) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def draw_loss_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path) -> Path:
    """One panel per training phase, one line per logged loss (log scale), saved as a PNG."""
    columns = 2
    rows = math.ceil(len(curves) / columns)
    width, height = PANEL_SIZE
    image = Image.new("RGB", (columns * width, rows * height), "white")
    for index, (phase, losses) in enumerate(curves.items()):
        left, top = (index % columns) * width, (index // columns) * height
        draw_panel(ImageDraw.Draw(image), (left, top), phase, losses)
    image.save(path)
    return path


def draw_panel(canvas: ImageDraw.ImageDraw, origin: tuple[int, int], title: str, losses: dict) -> None:
    width, height = PANEL_SIZE
    x0, y0 = origin[0] + MARGIN["left"], origin[1] + MARGIN["top"]
    x1, y1 = origin[0] + width - MARGIN["right"], origin[1] + height - MARGIN["bottom"]
    canvas.text((x0, origin[1] + 6), title, fill="black", font=font(14))
    canvas.rectangle((x0, y0, x1, y1), outline="black")
    points = [point for series in losses.values() for point in series if point[1] > 0]
    if not points:
        return
    max_step = max(step for step, _ in points)
    low = math.log10(min(value for _, value in points))
    high = math.log10(max(value for _, value in points))
    if high - low < 1e-6:
        low, high = low - 0.5, high + 0.5

    def to_pixel(step, value):
        x = x0 + (x1 - x0) * step / max(max_step, 1)
        y = y1 - (y1 - y0) * (math.log10(value) - low) / (high - low)
        return x, y

    for value in (10**high, 10**low):
        _, y = to_pixel(0, value)
        canvas.text((origin[0] + 4, y - 6), f"{value:.3g}", fill="black", font=font(11))
    canvas.text((x0, y1 + 6), "0", fill="black", font=font(11))
    canvas.text((x1 - 40, y1 + 6), f"step {max_step}", fill="black", font=font(11))
    for series_index, (name, series) in enumerate(losses.items()):
        colour = LINE_COLOURS[series_index % len(LINE_COLOURS)]
        line = [to_pixel(step, value) for step, value in series if value > 0]
        if len(line) > 1:
            canvas.line(line, fill=colour, width=2)
        canvas.text((x1 - 90, y0 + 4 + 14 * series_index), name, fill=colour, font=font(12))


def draw_sample_grid(images: list[Image.Image], references: list[str], predictions: list[str], path: Path) -> Path:
    """Each held-out image with its true caption and the trained model's caption under it."""
    columns = 4
    tile = images[0].width
    text_height = 84
    cell_width, cell_height = max(tile, 256) + 12, tile + text_height
    rows = math.ceil(len(images) / columns)
    sheet = Image.new("RGB", (columns * cell_width, rows * cell_height), "white")
    canvas = ImageDraw.Draw(sheet)
    for index, (image, reference, prediction) in enumerate(zip(images, references, predictions)):
        left, top = (index % columns) * cell_width + 6, (index // columns) * cell_height
        sheet.paste(image, (left, top + 4))
        lines = wrap(f"true: {reference}", 40) + wrap(f"model: {prediction}", 40)
        colours = ["dimgray"] * len(wrap(f"true: {reference}", 40)) + ["black"] * len(wrap(f"model: {prediction}", 40))
        for line_index, (line, colour) in enumerate(zip(lines[:6], colours)):
            canvas.text((left, top + tile + 8 + 12 * line_index), line, fill=colour, font=font(11))
    sheet.save(path)
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
    name_width = max(len(name) for name in results.metrics) + 2
    lines = ["", f"{'held-out metric':<{name_width}}{'untrained':>10}{'trained':>10}"]
    for name, values in results.metrics.items():
        lines.append(f"{name:<{name_width}}{values['untrained']:>10.1f}{values['trained']:>10.1f}")
    lines += ["", f"{'time per phase':<38}{'wall s':>8}{'CPU s':>8}"]
    for phase, seconds in results.timings.items():
        lines.append(f"  {phase:<36}{seconds['wall']:>8.1f}{seconds['cpu']:>8.1f}")
    total = {kind: sum(seconds[kind] for seconds in results.timings.values()) for kind in ("wall", "cpu")}
    lines.append(f"  {'total':<36}{total['wall']:>8.1f}{total['cpu']:>8.1f}")
    lines += ["", "written:"] + [f"  {name:<12} {path}" for name, path in results.files.items()]
    return "\n".join(lines)
