"""Entropy heatmaps with patch outlines (the paper's Figure 2), drawn with numpy and Pillow.

A figure shows the image on top and, below it, the per-token entropy upsampled to the
image size in a perceptual colormap (viridis), with lines on the edges between tokens of
different patches, a colour bar in nats and a caption. Panels of token sequences decode
the codes with the VQ and recompute their entropies with the entropy model.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from dataset.source_images import to_uint8_images
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig, patch_ids_from_starts, starts_from_lengths

# Viridis sampled at 10 evenly spaced points; linear interpolation between them keeps it
# perceptually uniform to the eye at heatmap resolution.
VIRIDIS = np.array(
    [
        [0x44, 0x01, 0x54], [0x48, 0x28, 0x78], [0x3E, 0x49, 0x89], [0x31, 0x68, 0x8E], [0x26, 0x82, 0x8E],
        [0x1F, 0x9E, 0x89], [0x35, 0xB7, 0x79], [0x6E, 0xCE, 0x58], [0xB5, 0xDE, 0x2B], [0xFD, 0xE7, 0x25],
    ],
    dtype=np.float64,
)
BACKGROUND = (255, 255, 255)
TEXT = (0, 0, 0)
LINE_SPACING = 2  # pixels between title lines


def colormap(values: np.ndarray) -> np.ndarray:
    """Viridis colours (..., 3) uint8 for values (...) in [0, 1] (clipped)."""
    x = np.clip(np.nan_to_num(np.asarray(values, dtype=np.float64)), 0.0, 1.0) * (len(VIRIDIS) - 1)
    lo = np.minimum(np.floor(x).astype(np.int64), len(VIRIDIS) - 2)
    frac = (x - lo)[..., None]
    return np.round(VIRIDIS[lo] * (1 - frac) + VIRIDIS[lo + 1] * frac).astype(np.uint8)


def _patch_id_grid(patches: np.ndarray | torch.Tensor, num_tokens: int) -> np.ndarray:
    """Patch index (T,) of each token from starts (T,) bool or lengths (M,) integer (zero-padded)."""
    patches = torch.as_tensor(np.asarray(patches))
    if patches.ndim != 1:
        raise ValueError(f"patches must be starts (T,) or lengths (M,), got shape {tuple(patches.shape)}")
    starts = patches if patches.dtype == torch.bool else starts_from_lengths(patches.long()[None])[0]
    if starts.numel() != num_tokens:
        raise ValueError(f"patches cover {starts.numel()} tokens but the entropy grid has {num_tokens}")
    return patch_ids_from_starts(starts[None])[0].numpy()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _font(size: int = 12) -> ImageFont.ImageFont:
    """Pillow's built-in font at a size whose spaces are visible (one bitmap size before Pillow 10.1)."""
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def fit_lines(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """text split at its newlines, each part wrapped at spaces into lines of at most `width`
    pixels (a single word wider than that gets a line of its own)."""
    lines = []
    for part in text.split("\n"):
        line = ""
        for word in part.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and _text_size(draw, candidate, font)[0] > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return lines


def entropy_heatmap_figure(
    image: np.ndarray,
    entropy: np.ndarray | torch.Tensor,
    patches: np.ndarray | torch.Tensor,
    row_width: int | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    title: str | None = None,
    outline: tuple[int, int, int] = (255, 255, 255),
    margin: int = 8,
    bar_height: int = 10,
) -> Image.Image:
    """Figure of an image (H, W, 3) uint8 above its entropy heatmap with patch outlines.

    entropy: (h, w) token entropies in nats, or (T,) with row_width giving the grid width.
    patches: the image's patch starts (T,) bool or zero-padded lengths (M,) integer.
    vmin, vmax: colour range in nats (default: this image's min and max), so several
        figures can share one scale. title: caption (default: patch and token counts).
    Returns an RGB image of width W + 2 * margin.
    """
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be (H, W, 3) uint8, got {image.shape} {image.dtype}")
    entropy = np.asarray(torch.as_tensor(entropy).float(), dtype=np.float64)
    if entropy.ndim == 1:
        if row_width is None or entropy.size % row_width:
            raise ValueError(f"flat entropy of {entropy.size} tokens needs a row_width that divides it")
        entropy = entropy.reshape(-1, row_width)  # (h, w)
    if entropy.ndim != 2 or (row_width is not None and entropy.shape[1] != row_width):
        raise ValueError(f"entropy must be (h, w) with w = row_width, got {entropy.shape}")
    H, W, _ = image.shape
    h, w = entropy.shape
    if H < h or W < w:
        raise ValueError(f"image {H}x{W} is smaller than the token grid {h}x{w}")
    ids = _patch_id_grid(patches, h * w).reshape(h, w)
    lo = float(entropy.min()) if vmin is None else vmin
    hi = float(entropy.max()) if vmax is None else vmax
    scale = (entropy - lo) / (hi - lo) if hi > lo else np.zeros_like(entropy)

    # Token grid -> pixels (nearest); also works when H, W are not multiples of h, w.
    rows = np.arange(H) * h // H  # (H,)
    cols = np.arange(W) * w // W  # (W,)
    heat = colormap(scale)[rows][:, cols]  # (H, W, 3)
    pid = ids[rows][:, cols]  # (H, W)
    edge = np.zeros((H, W), dtype=bool)
    edge[:, 1:] |= pid[:, 1:] != pid[:, :-1]  # first pixel column of a token right of a boundary
    edge[1:, :] |= pid[1:, :] != pid[:-1, :]  # first pixel row of a token below a boundary
    heat[edge] = outline

    font = _font()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    if title is None:
        num_patches = int(ids.max()) + 1
        title = f"{num_patches} patches / {h * w} tokens ({h * w / num_patches:.2f} tokens per patch)"
    text_h = max(_text_size(probe, s, font)[1] for s in ("Ag0123456789.nats", title.replace("\n", " ")))
    lines = fit_lines(probe, title, font, W)
    width = W + 2 * margin
    title_y = margin
    image_y = title_y + len(lines) * (text_h + LINE_SPACING) + margin
    heat_y = image_y + H + margin
    bar_y = heat_y + H + margin
    ticks_y = bar_y + bar_height + 3
    height = ticks_y + text_h + margin

    fig = Image.new("RGB", (width, height), BACKGROUND)
    fig.paste(Image.fromarray(image), (margin, image_y))
    fig.paste(Image.fromarray(heat), (margin, heat_y))
    bar = colormap(np.linspace(0.0, 1.0, W))[None].repeat(bar_height, axis=0)  # (bar_height, W, 3)
    fig.paste(Image.fromarray(bar), (margin, bar_y))
    draw = ImageDraw.Draw(fig)
    for k, line in enumerate(lines):
        draw.text((margin, title_y + k * (text_h + LINE_SPACING)), line, fill=TEXT, font=font)
    low_text, high_text, label = f"{lo:.2f}", f"{hi:.2f}", "entropy (nats)"
    draw.text((margin, ticks_y), low_text, fill=TEXT, font=font)
    draw.text((margin + W - _text_size(draw, high_text, font)[0], ticks_y), high_text, fill=TEXT, font=font)
    draw.text((margin + (W - _text_size(draw, label, font)[0]) // 2, ticks_y), label, fill=TEXT, font=font)
    for x in (margin, margin + W - 1):  # tick marks at the bar's ends
        draw.line([(x, bar_y + bar_height), (x, bar_y + bar_height + 2)], fill=TEXT)
    return fig


def save_figure_grid(
    figures: Sequence[Image.Image],
    path: str | None = None,
    columns: int | None = None,
    spacing: int = 4,
) -> Image.Image:
    """Tile figures left to right in rows of `columns` (default: one row) and save as PNG if path is given."""
    if not figures:
        raise ValueError("no figures to tile")
    columns = len(figures) if columns is None else max(1, columns)
    num_rows = math.ceil(len(figures) / columns)
    cell_w = max(f.width for f in figures)
    cell_h = max(f.height for f in figures)
    grid = Image.new(
        "RGB",
        (columns * cell_w + (columns - 1) * spacing, num_rows * cell_h + (num_rows - 1) * spacing),
        BACKGROUND,
    )
    for i, f in enumerate(figures):
        r, c = divmod(i, columns)
        grid.paste(f.convert("RGB"), (c * (cell_w + spacing), r * (cell_h + spacing)))
    if path is not None:
        grid.save(path, format="PNG")
    return grid


def _grid_shape(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


@torch.no_grad()
def decode_codes(vq: torch.nn.Module, codes: torch.Tensor, grid: int | tuple[int, int]) -> np.ndarray:
    """Codes (B, h*w) raster order -> decoded images (B, H, W, 3) uint8."""
    h, w = _grid_shape(grid)
    device = next(vq.parameters()).device
    return to_uint8_images(vq.decode_code(codes.long().reshape(-1, h, w).to(device)))  # (B, H, W, 3)


def code_panels(
    entropy_model: torch.nn.Module, vq: torch.nn.Module, codes: torch.Tensor, grid: int | tuple[int, int]
) -> tuple[np.ndarray, torch.Tensor]:
    """Decoded images (B, H, W, 3) uint8 and teacher-forced entropies (B, T) float32 (nats) of
    token sequences codes (B, T) on the token grid (h, w) (an int = square)."""
    h, w = _grid_shape(grid)
    codes = torch.as_tensor(codes).long().reshape(-1, h * w)  # (B, T)
    if vq.config.codebook_size != entropy_model.config.vocab_size:
        raise ValueError(f"the VQ has {vq.config.codebook_size} codes but the entropy model "
                         f"{entropy_model.config.vocab_size}")
    device = next(entropy_model.parameters()).device
    entropy = teacher_forced_entropy(entropy_model, codes.to(device)).cpu()  # (B, T)
    return decode_codes(vq, codes, (h, w)), entropy


def heatmaps_for_codes(
    entropy_model: torch.nn.Module,
    vq: torch.nn.Module,
    codes: torch.Tensor,
    patching: PatchingConfig,
    grid: int | tuple[int, int],
    titles: Sequence[str] | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
) -> list[Image.Image]:
    """Figures for token sequences codes (B, T), e.g. generated samples: entropies recomputed
    with the entropy model (teacher forced), images decoded with the VQ, patch outlines from
    `patching` on the token grid (h, w) (an int = square). Returns B RGB images."""
    h, w = _grid_shape(grid)
    images, entropy = code_panels(entropy_model, vq, codes, (h, w))  # (B, H, W, 3), (B, T)
    starts = patching.starts(entropy, w)  # (B, T)
    return [
        entropy_heatmap_figure(images[b], entropy[b].reshape(h, w), starts[b], row_width=w, vmin=vmin, vmax=vmax,
                               title=None if titles is None else titles[b])
        for b in range(len(images))
    ]


def panel_title(name: str, starts: torch.Tensor) -> str:
    """Caption of one image's starts (T,): the name on its own line, then patch count and tokens per patch."""
    patches = int(starts.sum())
    return f"{name}\n{patches} patches, {starts.numel() / patches:.2f} tokens/patch"
