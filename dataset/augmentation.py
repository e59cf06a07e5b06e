"""Resize-and-crop augmentations of ADM / LlamaGen (same semantics, for matching codes)."""
import math
import random

import numpy as np
import torch
from PIL import Image


def _resize_min_side(pil_image: Image.Image, min_side: int) -> Image.Image:
    """Halve with BOX filtering while the short side stays >= 2 * min_side, then BICUBIC so
    the short side equals min_side (ADM's anti-aliased downsampling)."""
    while min(*pil_image.size) >= 2 * min_side:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = min_side / min(*pil_image.size)
    return pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """Resize so the short side is image_size, then crop the central image_size square."""
    arr = np.array(_resize_min_side(pil_image, image_size))  # (H', W', C), min(H', W') = image_size
    top = (arr.shape[0] - image_size) // 2
    left = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def random_crop_arr(pil_image: Image.Image, image_size: int, min_crop_frac: float = 0.8,
                    max_crop_frac: float = 1.0, rng: random.Random | None = None) -> Image.Image:
    """Resize the short side to a random length in [image_size / max_crop_frac,
    image_size / min_crop_frac] (integers, both ends included), then crop a random
    image_size square. Draws from Python's `random` module unless `rng` is given."""
    rng = rng if rng is not None else random
    min_side = rng.randrange(math.ceil(image_size / max_crop_frac), math.ceil(image_size / min_crop_frac) + 1)
    arr = np.array(_resize_min_side(pil_image, min_side))  # (H', W', C), min(H', W') = min_side
    top = rng.randrange(arr.shape[0] - image_size + 1)
    left = rng.randrange(arr.shape[1] - image_size + 1)
    return Image.fromarray(arr[top:top + image_size, left:left + image_size])


def five_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) -> (5, ..., size, size): top-left, top-right, bottom-left, bottom-right,
    center crops (torchvision's five_crop order and rounding)."""
    h, w = x.shape[-2:]
    if size > h or size > w:
        raise ValueError(f"crop size {size} exceeds the image size {h}x{w}")
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    corners = [(0, 0), (0, w - size), (h - size, 0), (h - size, w - size), (top, left)]
    return torch.stack([x[..., i:i + size, j:j + size] for i, j in corners])


def ten_crops(x: torch.Tensor, size: int) -> torch.Tensor:
    """(..., H, W) -> (10, ..., size, size): five_crops of x, then five_crops of x flipped
    horizontally (torchvision's ten_crop order)."""
    return torch.cat([five_crops(x, size), five_crops(x.flip(-1), size)])
