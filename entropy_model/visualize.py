"""Entropy heatmaps with patch outlines (the paper's Figure 2), drawn with numpy and Pillow.

A figure shows the image on top and, below it, the per-token entropy upsampled to the
image size in a perceptual colormap (viridis), with lines on the edges between tokens of
different patches, a colour bar in nats and a caption.

    python -m entropy_model.visualize --code-path STORE --indices 0 5 9 --vq-ckpt vq.pt \
        --target-compression 1.81 --out fig.png
    python -m entropy_model.visualize --code-path STORE --indices 0 5 --data-path IMAGEFOLDER \
        --vq-ckpt vq.pt --entropy-ckpt entropy.pt --generate-ckpt dpar.pt --classes 207 360 --out fig.png

Stored images use the stored entropies (entropy.npy, checked against the store's hash and,
with --entropy-ckpt, the model's). Their pixels are the codes decoded by the VQ (exactly what
the tokens hold, for every view and store layout), or with --data-path the source image's
view as extract_codes.py cropped it: the store keeps no file list, so the ImageFolder's
images are listed again in torchvision's order, the files the manifest records as skipped
are dropped, and the counts and labels must match the store. Generated panels (a GPT or
DPAR checkpoint, --generate-ckpt) go through heatmaps_for_codes: entropies recomputed with
the entropy model, images decoded with the VQ. Every panel draws the patches of the given
patching settings (a DPAR model also generates with them).
"""
from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from autoregressive.models.generate import generate
from dataset.augmentation import center_crop_arr, ten_crops
from dataset.code_store import CodeStore, code_store_hash, open_code_store
from dataset.imagefolder import list_image_folder, load_rgb, to_tensor
from entropy_model.calibrate import PAPER_THRESHOLD, load_entropies, sample_entropies, threshold_for_compression
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import GATED_MODES, PATCH_MODES, PatchingConfig, patch_ids_from_starts, starts_from_lengths
from entropy_model.score import load_entropy_model
from tokenizer.vq_model import VQ_models, load_vq_checkpoint
from utils.checkpoint import checkpoint_sha256, model_from_checkpoint
from utils.cli import HelpFormatter
from utils.distributed import pick_device

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


# ---------------------------------------------------------------------------------------
# Panels from codes
# ---------------------------------------------------------------------------------------
def _grid_shape(grid: int | tuple[int, int]) -> tuple[int, int]:
    return (grid, grid) if isinstance(grid, int) else (int(grid[0]), int(grid[1]))


def to_uint8_images(x: torch.Tensor) -> np.ndarray:
    """Images (B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()


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


# ---------------------------------------------------------------------------------------
# Stored images
# ---------------------------------------------------------------------------------------
def store_image_paths(store: CodeStore, data_path: str | Path) -> list[str]:
    """Source file of each stored image: the ImageFolder's images in torchvision's order minus
    those the manifest records as skipped; ValueError (one line) if the folder does not match."""
    manifest = store.manifest
    if "source_count" not in manifest or "skipped" not in manifest:
        raise ValueError(f"code store {store.path} records no image order; drop --data-path to show decoded codes")
    _, samples = list_image_folder(data_path)
    if len(samples) != manifest["source_count"]:
        raise ValueError(f"{data_path} holds {len(samples)} images but {store.path} was made from "
                         f"{manifest['source_count']}")
    skipped = {int(s["index"]) for s in manifest["skipped"]}
    kept = [(p, label) for i, (p, label) in enumerate(samples) if i not in skipped]
    labels = np.asarray(store.labels)
    if len(kept) != len(labels) or any(label != int(labels[i]) for i, (_, label) in enumerate(kept)):
        raise ValueError(f"the images of {data_path} do not match the labels of {store.path}")
    return [p for p, _ in kept]


def stored_view_pixels(path: str | Path, manifest: dict, view: int) -> np.ndarray:
    """(S, S, 3) uint8: view `view` of an image as extract_codes.py made it (manifest
    "image_size", "views", "augmentation": center crop, its flip, or ten-crop)."""
    size = manifest["image_size"]
    augmentation = manifest.get("augmentation") or {}
    image = load_rgb(path)
    if augmentation.get("ten_crop"):
        x = to_tensor(center_crop_arr(image, int(size * augmentation["crop_range"])))  # (3, C, C)
        return to_uint8_images(ten_crops(x, size)[view][None])[0]  # (S, S, 3)
    pixels = np.asarray(center_crop_arr(image, size))  # (S, S, 3)
    return np.ascontiguousarray(pixels[:, ::-1]) if manifest["views"][view].startswith("flip_") else pixels


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------
def _load_models(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module | None, torch.nn.Module | None, str | None]:
    """(vq or None, entropy model or None, entropy model hash or None) from the flags."""
    vq = load_vq_checkpoint(args.vq_ckpt, args.vq_model).to(device) if args.vq_ckpt else None
    entropy_model, model_hash = None, None
    if args.entropy_ckpt:
        entropy_model = load_entropy_model(args.entropy_ckpt)[0].to(device)
        model_hash = checkpoint_sha256(args.entropy_ckpt)
    return vq, entropy_model, model_hash


def _patching(args: argparse.Namespace, entropy: np.ndarray, grid_width: int) -> PatchingConfig:
    cap = args.max_patch_length or None
    threshold = args.threshold
    if args.target_compression is not None:
        sample = sample_entropies(entropy, 10000, seed=0)  # (S, T)
        threshold, achieved = threshold_for_compression(sample, args.target_compression, cap,
                                                        None if args.no_row_reset else grid_width, args.mode)
        print(f"calibrated tau={threshold:.4f} (compression {achieved:.3f} tokens per patch)")
    return PatchingConfig(args.mode, threshold, cap, not args.no_row_reset)


def _stored_panels(
    args: argparse.Namespace, store: CodeStore, entropy: np.ndarray, vq: torch.nn.Module | None
) -> list[tuple[np.ndarray, torch.Tensor, str]]:
    """(pixels (H, W, 3) uint8, entropies (T,) float32, name) of each requested stored image."""
    paths = store_image_paths(store, args.data_path) if args.data_path else None
    panels = []
    for i in args.indices:
        e = torch.from_numpy(np.asarray(entropy[i, args.view], dtype=np.float32))  # (T,)
        if paths is not None:
            pixels = stored_view_pixels(paths[i], store.manifest, args.view)
        else:
            codes = torch.from_numpy(np.asarray(store.codes[i, args.view], dtype=np.int64))  # (T,)
            pixels = decode_codes(vq, codes, store.grid)[0]
        panels.append((pixels, e, f"#{i}" if store.num_views == 1 else f"#{i} view {args.view}"))
    return panels


@torch.no_grad()
def _generated_codes(
    args: argparse.Namespace,
    entropy_model: torch.nn.Module,
    model_hash: str,
    patching: PatchingConfig,
    device: torch.device,
) -> tuple[torch.Tensor, list[str]]:
    """(B, T) codes sampled from the --generate-ckpt model for --classes, and a name for each."""
    model, model_args = model_from_checkpoint(args.generate_ckpt)
    model.to(device)
    unconditional = getattr(model.config, "model_type", "c2i") == "uncond"
    if not unconditional and not all(0 <= c < model.config.num_classes for c in args.classes):
        raise ValueError(f"--classes must lie in 0..{model.config.num_classes - 1} for {args.generate_ckpt}")
    if (model.config.vocab_size, model.config.block_size) != \
            (entropy_model.config.vocab_size, entropy_model.config.block_size):
        raise ValueError(f"{args.generate_ckpt} makes {model.config.block_size} tokens of {model.config.vocab_size} "
                         f"codes; the entropy model scores {entropy_model.config.block_size} of "
                         f"{entropy_model.config.vocab_size}")
    kwargs = {}
    if getattr(model, "is_dpar", False):
        recorded = model_args.get("entropy_model_hash")
        if recorded is not None and recorded != model_hash:
            raise ValueError(f"{args.generate_ckpt} was trained with entropy model {recorded[:16]}, "
                             f"not {args.entropy_ckpt} ({model_hash[:16]})")
        kwargs = {"entropy_model": entropy_model, "patching": patching}
    cond = torch.tensor(args.classes, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(args.seed)
    codes = generate(model, cond, model.config.block_size, cfg_scale=args.cfg_scale, temperature=args.temperature,
                     top_k=args.top_k, top_p=args.top_p, generator=generator, **kwargs).tokens
    names = [f"sample {b}" if unconditional else f"class {c} sample" for b, c in enumerate(args.classes)]
    return codes, names


def make_figure(args: argparse.Namespace) -> Image.Image:
    """The figure the command line describes (stored images, then generated samples)."""
    device = pick_device(args.device)
    store = open_code_store(args.code_path, codebook_size=args.codebook_size)
    if not 0 <= args.view < store.num_views:
        raise ValueError(f"--view {args.view} is outside the store's {store.num_views} views")
    bad = [i for i in args.indices if not 0 <= i < len(store)]
    if bad:
        raise ValueError(f"indices {bad} are outside the store's {len(store)} images")
    vq, entropy_model, model_hash = _load_models(args, device)
    entropy, _ = load_entropies(str(args.entropy_path or args.code_path), code_store_hash(args.code_path), model_hash)
    patching = _patching(args, entropy, store.grid_width)
    panels = _stored_panels(args, store, entropy, vq)
    if args.generate_ckpt:
        codes, names = _generated_codes(args, entropy_model, model_hash, patching, device)  # (B, T)
        images, e = code_panels(entropy_model, vq, codes, store.grid)  # (B, H, W, 3), (B, T)
        panels += [(images[b], e[b], name) for b, name in enumerate(names)]
    everything = torch.cat([e for _, e, _ in panels])
    vmin, vmax = (None, None) if args.per_image_scale else (float(everything.min()), float(everything.max()))
    figures = []
    for pixels, e, name in panels:
        starts = patching.starts(e[None], store.grid_width)[0]  # (T,)
        figures.append(entropy_heatmap_figure(pixels, e, starts, store.grid_width, vmin, vmax,
                                              panel_title(name, starts)))
    return save_figure_grid(figures, args.out, args.columns)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Entropy heatmaps with patch outlines (the paper's Figure 2).",
                                     formatter_class=HelpFormatter)
    parser.add_argument("--code-path", required=True, help="code store directory holding entropy.npy")
    parser.add_argument("--entropy-path", default=None, help="directory holding entropy.npy (default: the store)")
    parser.add_argument("--codebook-size", type=int, default=None, help="for LlamaGen's store layout only")
    parser.add_argument("--indices", type=int, nargs="*", default=[0], help="stored images to show")
    parser.add_argument("--view", type=int, default=0, help="stored view to show (0 = center)")
    parser.add_argument("--data-path", default=None,
                        help="ImageFolder the store was extracted from: show source pixels, not decoded codes")
    parser.add_argument("--vq-model", choices=list(VQ_models), default="VQ-16", help="tokenizer registry name")
    parser.add_argument("--vq-ckpt", default=None, help="VQ tokenizer, decodes codes to images")
    parser.add_argument("--entropy-ckpt", default=None,
                        help="entropy model: checks the stored entropies' model hash; scores generated samples")
    parser.add_argument("--generate-ckpt", default=None, help="GPT or DPAR checkpoint: add panels of its samples")
    parser.add_argument("--classes", type=int, nargs="*", default=[],
                        help="class of each generated sample (an unconditional model draws one sample per entry)")
    parser.add_argument("--cfg-scale", type=float, default=1.0, help="guidance scale of --generate-ckpt sampling")
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="softmax temperature of --generate-ckpt sampling")
    parser.add_argument("--top-k", type=int, default=0, help="top-k of --generate-ckpt sampling (0 = off)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus mass of --generate-ckpt sampling (1.0 = off)")
    parser.add_argument("--seed", type=int, default=0, help="seed of --generate-ckpt sampling")
    target = parser.add_mutually_exclusive_group()
    target.add_argument("--threshold", type=float, default=None, help=f"tau in nats (default {PAPER_THRESHOLD})")
    target.add_argument("--target-compression", type=float, default=None,
                        help="calibrate tau on the stored entropies to this many tokens per patch")
    parser.add_argument("--mode", choices=PATCH_MODES, default="entropy", help="patch boundary rule")
    parser.add_argument("--max-patch-length", type=int, default=4, help="length cap; 0 = no cap")
    parser.add_argument("--no-row-reset", action="store_true", help="let patches run across grid rows")
    parser.add_argument("--per-image-scale", action="store_true", help="colour range per image (default: shared)")
    parser.add_argument("--columns", type=int, default=None, help="figures per row (default: one row)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    parser.add_argument("--out", required=True, help="PNG to write")
    args = parser.parse_args(argv)
    if args.max_patch_length < 0:
        parser.error("--max-patch-length must be >= 0")
    if not args.indices and not args.generate_ckpt:
        parser.error("nothing to show: give --indices and/or --generate-ckpt")
    if args.indices and not (args.data_path or args.vq_ckpt):
        parser.error("stored images need --vq-ckpt (decode their codes) or --data-path (source images)")
    if args.generate_ckpt and not (args.vq_ckpt and args.entropy_ckpt and args.classes):
        parser.error("--generate-ckpt needs --vq-ckpt, --entropy-ckpt and --classes (one sample per class)")
    if args.mode not in GATED_MODES and args.target_compression is not None:
        parser.error(f"mode {args.mode!r} has a fixed compression; drop --target-compression")
    if args.mode in GATED_MODES and args.threshold is None and args.target_compression is None:
        args.threshold = PAPER_THRESHOLD
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        figure = make_figure(args)
    except (OSError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(f"wrote {args.out} ({figure.width}x{figure.height})")


if __name__ == "__main__":
    main()
