"""Heat maps and labelled image grids as PNG, drawn with PIL alone (no plotting dependency).

A figure is a vertical stack of ``HeatmapPanel``s: a matrix of values (NaN = no cell), row and
column tick labels, axis names, a title and a colour bar. Each cell also prints its value, so
the picture can be read without the colour bar.

LocoGen's pictures (``locogen_panels``, ``save_locogen_pictures``): start j × size m heat maps
of a sweep, and the grid of clean / best window / c′ everywhere images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Viridis at nine evenly spaced points; colours between them are linear blends.
_VIRIDIS = np.array([
    (68, 1, 84), (71, 44, 122), (59, 81, 139), (44, 113, 142), (33, 144, 141),
    (39, 173, 129), (92, 200, 99), (170, 220, 50), (253, 231, 37),
], dtype=np.float64)
_EMPTY = (235, 235, 235)
_HIGHLIGHT = (230, 20, 20)


def colormap(fraction: np.ndarray) -> np.ndarray:
    """Values in [0, 1] -> uint8 RGB on the viridis scale."""
    x = np.clip(np.asarray(fraction, dtype=np.float64), 0, 1) * (len(_VIRIDIS) - 1)
    low = np.floor(x).astype(int).clip(0, len(_VIRIDIS) - 2)
    t = (x - low)[..., None]
    return ((1 - t) * _VIRIDIS[low] + t * _VIRIDIS[low + 1] + 0.5).astype(np.uint8)


@dataclass
class HeatmapPanel:
    title: str
    values: np.ndarray  # (rows, cols), NaN where there is no cell
    row_labels: list[str]
    col_labels: list[str]
    row_axis: str
    col_axis: str
    vmin: float | None = None  # None: the panel's finite minimum
    vmax: float | None = None
    highlight: tuple[int, int] | None = None  # a cell to outline (the winner)
    value_format: str = "{:.2f}"


def _font(size: int):
    return ImageFont.load_default(size)


def _text_width(draw: ImageDraw.ImageDraw, text: str, font) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=font)
    return right - left


def _rotated_text(text: str, font) -> Image.Image:
    """``text`` reading upwards, on a transparent background (for column and axis labels)."""
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left, top, right, bottom = probe.textbbox((0, 0), text, font=font)
    label = Image.new("RGBA", (right - left + 4, bottom - top + 6), (255, 255, 255, 0))
    ImageDraw.Draw(label).text((2 - left, 2 - top), text, fill="black", font=font)
    return label.rotate(90, expand=True)


def _panel_image(panel: HeatmapPanel, cell: int) -> Image.Image:
    values = np.asarray(panel.values, dtype=np.float64)
    rows, cols = values.shape
    finite = values[np.isfinite(values)]
    vmin = panel.vmin if panel.vmin is not None else (float(finite.min()) if finite.size else 0.0)
    vmax = panel.vmax if panel.vmax is not None else (float(finite.max()) if finite.size else 1.0)
    span = vmax - vmin if vmax > vmin else 1.0

    font, small = _font(13), _font(10)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max([_text_width(probe, s, small) for s in panel.row_labels] + [0]) + 8
    left = 22 + label_w  # rotated row-axis name, then the row tick labels
    top = 26
    grid_w, grid_h = cols * cell, rows * cell
    bar_w = 60
    # Column tick labels may be words (tokens): write them rotated under the grid.
    col_label_h = max([_text_width(probe, s, small) for s in panel.col_labels] + [0]) + 8
    width = left + grid_w + 16 + bar_w
    height = top + grid_h + col_label_h + 22
    image = Image.new("RGB", (max(width, _text_width(probe, panel.title, font) + 20), height), "white")
    draw = ImageDraw.Draw(image)
    draw.text((8, 6), panel.title, fill="black", font=font)

    colours = colormap(np.nan_to_num((values - vmin) / span))  # NaN cells are drawn empty below
    for r in range(rows):
        for c in range(cols):
            x0, y0 = left + c * cell, top + r * cell
            box = (x0, y0, x0 + cell - 1, y0 + cell - 1)
            if not np.isfinite(values[r, c]):
                draw.rectangle(box, fill=_EMPTY)
                continue
            rgb = tuple(int(v) for v in colours[r, c])
            draw.rectangle(box, fill=rgb)
            text = panel.value_format.format(values[r, c])
            ink = "black" if sum(rgb) > 380 else "white"
            tw = _text_width(draw, text, small)
            draw.text((x0 + (cell - tw) / 2, y0 + cell / 2 - 6), text, fill=ink, font=small)
    if panel.highlight is not None:
        r, c = panel.highlight
        x0, y0 = left + c * cell, top + r * cell
        draw.rectangle((x0 - 1, y0 - 1, x0 + cell, y0 + cell), outline=_HIGHLIGHT, width=3)

    for r, text in enumerate(panel.row_labels):
        tw = _text_width(draw, text, small)
        draw.text((left - 4 - tw, top + r * cell + cell / 2 - 6), text, fill="black", font=small)
    for c, text in enumerate(panel.col_labels):
        label = _rotated_text(text, small)
        image.paste(label, (left + c * cell + cell // 2 - label.width // 2, top + grid_h + 4), label)
    if panel.row_axis:
        axis = _rotated_text(panel.row_axis, small)
        image.paste(axis, (4, top + max(0, (grid_h - axis.height) // 2)), axis)
    tw = _text_width(draw, panel.col_axis, small)
    draw.text((left + (grid_w - tw) / 2, top + grid_h + col_label_h + 4), panel.col_axis,
              fill="black", font=small)

    # Colour bar: vmax at the top, vmin at the bottom.
    bar_x = left + grid_w + 16
    steps = np.linspace(1, 0, max(grid_h, 2))
    bar = colormap(steps)
    for y, rgb in enumerate(bar):
        draw.line((bar_x, top + y, bar_x + 12, top + y), fill=tuple(int(v) for v in rgb))
    draw.text((bar_x + 16, top - 2), panel.value_format.format(vmax), fill="black", font=small)
    draw.text((bar_x + 16, top + grid_h - 12), panel.value_format.format(vmin), fill="black", font=small)
    return image


def heatmap_figure(panels: list[HeatmapPanel], cell: int = 36) -> Image.Image:
    """Stack the panels vertically into one picture."""
    parts = [_panel_image(panel, cell) for panel in panels]
    width = max(p.width for p in parts)
    figure = Image.new("RGB", (width, sum(p.height for p in parts) + 8 * (len(parts) - 1)), "white")
    y = 0
    for part in parts:
        figure.paste(part, (0, y))
        y += part.height + 8
    return figure


def save_heatmaps(panels: list[HeatmapPanel], path: Path, cell: int = 36) -> None:
    heatmap_figure(panels, cell).save(path)


def labelled_grid(rows: list[tuple[str, np.ndarray]], scale: int = 3) -> Image.Image:
    """Image rows (label, uint8 (N, H, W, 3)), each labelled on the left, scaled up ``scale``×."""
    font = _font(12)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_w = max(_text_width(probe, label, font) for label, _ in rows) + 12
    h = max(images.shape[1] for _, images in rows) * scale
    w = max(images.shape[2] for _, images in rows) * scale
    cols = max(len(images) for _, images in rows)
    figure = Image.new("RGB", (label_w + cols * (w + 2), len(rows) * (h + 2)), "white")
    draw = ImageDraw.Draw(figure)
    for r, (label, images) in enumerate(rows):
        y = r * (h + 2)
        draw.text((4, y + h / 2 - 7), label, fill="black", font=font)
        for c, img in enumerate(images):
            tile = Image.fromarray(img).resize((img.shape[1] * scale, img.shape[0] * scale), Image.NEAREST)
            figure.paste(tile, (label_w + c * (w + 2), y))
    return figure


# ----------------------------------------------------------------------------- LocoGen's pictures
def locogen_panels(result) -> list[HeatmapPanel]:
    """Start j × size m heat maps of a ``LocateResult``: the deciding measure and the CLIP-score."""
    num_layers = len(result.layer_names)
    sizes = list(range(1, result.settings.max_m + 1))
    clip = np.full((len(sizes), num_layers), np.nan)
    rate = np.full((len(sizes), num_layers), np.nan)
    for w in result.windows:
        clip[w.size - 1, w.start] = w.clip
        if w.rate is not None:
            rate[w.size - 1, w.start] = w.rate
    highlight = (result.best_size - 1, result.best_start)
    rows = [f"m={m}" for m in sizes]
    cols = [str(j) for j in range(num_layers)]
    better = "higher" if result.scored_against == "target" else "lower"
    panels = []
    if result.settings.criterion == "accuracy":
        panels.append(HeatmapPanel(
            f"{result.concept} -> {result.replacement}: judge's '{result.judged_phrase}' rate "
            f"({better} is better; clean {result.clean.rate:.2f}, c' everywhere {result.replaced.rate:.2f})",
            rate, rows, cols, "window size m", "first layer j", vmin=0.0, vmax=1.0, highlight=highlight))
    panels.append(HeatmapPanel(
        f"CLIP-score vs {result.scored_against} prompt ({better} is better; clean "
        f"{result.clean.clip:.3f}, c' everywhere {result.replaced.clip:.3f})",
        clip, rows, cols, "window size m", "first layer j", highlight=highlight, value_format="{:.3f}"))
    return panels


def save_locogen_pictures(result, folder: Path) -> list[Path]:
    """``heatmap.png`` and, when the result holds images, ``grid.png`` into ``folder``."""
    folder = Path(folder)
    save_heatmaps(locogen_panels(result), folder / "heatmap.png")
    written = [folder / "heatmap.png"]
    if result.images:
        w = result.best
        rows = [("clean (c everywhere)", result.images["clean"]),
                (f"c' in layers {w.start}-{w.start + w.size - 1}", result.images["best"]),
                ("c' everywhere", result.images["replaced"])]
        labelled_grid(rows).save(folder / "grid.png")
        written.append(folder / "grid.png")
    return written
