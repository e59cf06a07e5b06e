"""The report's figures, drawn with Pillow: sample grids with class names, the loss-vs-compute
plot, and entropy heatmaps (entropy_tools.heatmaps draws each panel)."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from entropy_model.patching import PatchingConfig
from entropy_tools.heatmaps import code_panels, entropy_heatmap_figure, panel_title, save_figure_grid

WHITE, BLACK, GREY = (255, 255, 255), (0, 0, 0), (150, 150, 150)
COLOURS = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (148, 103, 189), (255, 127, 14)]


def font(size: int = 13) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def _text_width(draw: ImageDraw.ImageDraw, text: str, f: ImageFont.ImageFont) -> int:
    left, _, right, _ = draw.textbbox((0, 0), text, font=f)
    return right - left


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """(..., H, W, 3) -> (..., H * factor, W * factor, 3), nearest neighbour."""
    return images.repeat(factor, axis=-3).repeat(factor, axis=-2)


def sample_grid(columns: Sequence[tuple[str, np.ndarray, np.ndarray]], class_names: Sequence[str], per_class: int,
                scale: int = 1, gap: int = 12) -> Image.Image:
    """One row per class: the class name, then up to per_class images of each column set side by side.

    columns: (title, images (N, S, S, 3) uint8, labels (N,))."""
    f = font(13)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    S = columns[0][1].shape[1] * scale
    name_w = max(_text_width(probe, n, f) for n in class_names) + 10
    shown = [[np.flatnonzero(np.asarray(labels) == c)[:per_class] for c in range(len(class_names))]
             for _, _, labels in columns]
    widths = [max(max(len(chosen) for chosen in col) * (S + 2), _text_width(probe, title, f) + 4)
              for col, (title, _, _) in zip(shown, columns)]
    header = 22
    canvas = Image.new("RGB", (name_w + sum(widths) + gap * (len(columns) - 1), header + len(class_names) * (S + 2)),
                       WHITE)
    draw = ImageDraw.Draw(canvas)
    x0 = name_w
    for (title, images, _), col, width in zip(columns, shown, widths):
        draw.text((x0, 3), title, fill=BLACK, font=f)
        for c, chosen in enumerate(col):
            for k, i in enumerate(chosen):
                tile = upscale(images[i], scale) if scale > 1 else images[i]
                canvas.paste(Image.fromarray(tile), (x0 + k * (S + 2), header + c * (S + 2)))
        x0 += width + gap
    for c, name in enumerate(class_names):
        draw.text((3, header + c * (S + 2) + S // 2 - 7), name, fill=BLACK, font=f)
    return canvas


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    step = 10 ** math.floor(math.log10(raw))
    step *= min((m for m in (1, 2, 2.5, 5, 10) if m * step >= raw), default=10)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def line_plot(series: Sequence[tuple[str, Sequence[float], Sequence[float]]], x_label: str, y_label: str,
              title: str, size: tuple[int, int] = (640, 400)) -> Image.Image:
    """Lines (name, xs, ys) on shared linear axes with ticks, labels and a legend."""
    f, small = font(13), font(11)
    W, H = size
    left, right, top, bottom = 64, 16, 30, 46
    xs = [x for _, sx, _ in series for x in sx]
    ys = [y for _, _, sy in series for y in sy if math.isfinite(y)]
    x_lo, x_hi = 0.0, max(xs)
    y_lo, y_hi = min(ys), max(ys)
    pad = 0.05 * (y_hi - y_lo or 1.0)
    y_lo, y_hi = y_lo - pad, y_hi + pad
    canvas = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(canvas)

    def px(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x_lo) / (x_hi - x_lo or 1.0) * (W - left - right),
                H - bottom - (y - y_lo) / (y_hi - y_lo or 1.0) * (H - top - bottom))

    draw.rectangle([left, top, W - right, H - bottom], outline=BLACK)
    for t in _nice_ticks(x_lo, x_hi):
        x, _ = px(t, y_lo)
        draw.line([(x, H - bottom), (x, H - bottom + 4)], fill=BLACK)
        label = f"{t:g}"
        draw.text((x - _text_width(draw, label, small) / 2, H - bottom + 6), label, fill=BLACK, font=small)
    for t in _nice_ticks(y_lo, y_hi):
        _, y = px(x_lo, t)
        draw.line([(left - 4, y), (left, y)], fill=BLACK)
        draw.line([(left + 1, y), (W - right - 1, y)], fill=(235, 235, 235))
        label = f"{t:.3g}"
        draw.text((left - 6 - _text_width(draw, label, small), y - 6), label, fill=BLACK, font=small)
    for k, (name, sx, sy) in enumerate(series):
        points = [px(x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        colour = COLOURS[k % len(COLOURS)]
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
        lx, ly = W - right - 190, top + 8 + 16 * k
        draw.line([(lx, ly + 7), (lx + 20, ly + 7)], fill=colour, width=3)
        draw.text((lx + 26, ly), name, fill=BLACK, font=small)
    draw.text((left, 8), title, fill=BLACK, font=f)
    draw.text((left + (W - left - right - _text_width(draw, x_label, small)) / 2, H - 18), x_label, fill=BLACK,
              font=small)
    label = Image.new("RGB", (_text_width(draw, y_label, small) + 4, 14), WHITE)
    ImageDraw.Draw(label).text((2, 0), y_label, fill=BLACK, font=small)
    rotated = label.rotate(90, expand=True)
    canvas.paste(rotated, (4, top + (H - top - bottom - rotated.height) // 2))
    return canvas


def heatmap_panels(images: np.ndarray, entropy: torch.Tensor, patching: PatchingConfig, grid: int,
                   names: Sequence[str], scale: int, vmin: float, vmax: float) -> list[Image.Image]:
    """Heatmap figures (entropy_tools.heatmaps) of images (B, S, S, 3) uint8 with their token
    entropies (B, T), the patches of `patching`, upscaled `scale` times so tokens are visible."""
    starts = patching.starts(entropy.float(), grid)  # (B, T)
    return [entropy_heatmap_figure(upscale(images[b], scale), entropy[b].reshape(grid, grid), starts[b],
                                   row_width=grid, vmin=vmin, vmax=vmax, title=panel_title(names[b], starts[b]))
            for b in range(len(images))]


def generated_heatmaps(entropy_model: torch.nn.Module, vq: torch.nn.Module, codes: torch.Tensor,
                       patching: PatchingConfig, grid: int, names: Sequence[str], scale: int,
                       vmin: Optional[float] = None, vmax: Optional[float] = None) -> list[Image.Image]:
    """Heatmap figures of generated token sequences (B, T): decoded by the VQ, entropies
    recomputed with the entropy model (entropy_tools.heatmaps.code_panels)."""
    images, entropy = code_panels(entropy_model, vq, codes, grid)  # (B, S, S, 3), (B, T)
    return heatmap_panels(images, entropy, patching, grid, names, scale, vmin, vmax)


def tile(figures: Sequence[Image.Image], path: str, columns: Optional[int] = None) -> Image.Image:
    return save_figure_grid(figures, path, columns)
