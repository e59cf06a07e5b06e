"""ImageFolder datasets (root/<class>/<image>) for tokenizer training and code extraction.

Classes, labels and sample order follow torchvision's ImageFolder rules (sorted class folder
names; files walked recursively in sorted order, filtered by extension), so labels agree with
any other tool reading the same folder. torchvision itself is not imported: it is slow to load.

Refused, with one line naming the file or folder:
- a class folder without images (as torchvision refuses it): it would still take a label, so
  labels and class counts would no longer match the folder's classes;
- images the pipeline cannot represent faithfully: floating-point or 32-bit integer pixels
  (mode "F", or "I" outside a PNG), and, for a given crop size, images whose shorter side is below
  image_size / MAX_UPSCALE (the resize-and-crop would enlarge them more than MAX_UPSCALE times,
  e.g. below 32 px for a 256 px crop).
16-bit grayscale PNGs (mode "I;16", or "I" in older Pillow) are converted faithfully: each value
v in 0..65535 becomes round(v / 257) in 0..255 (RGB's convert() would clip them to white).
"""
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from dataset.augmentation import center_crop_arr, random_crop_arr

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# What PIL raises for unreadable, truncated or hostile files.
IMAGE_ERRORS = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)
MAX_UPSCALE = 8  # largest enlargement of an image's shorter side that the crop may make
SIXTEEN_BIT_SCALE = 257  # 65535 / 255: 16-bit value -> 8-bit value


class UnrepresentableImage(ValueError):
    """An image the pipeline cannot represent faithfully; str() is one line naming the file."""


def list_image_folder(root: str | Path) -> tuple[list[str], list[tuple[str, int]]]:
    """(class names, [(path, label)]) of an ImageFolder; ValueError with one line when the
    folder is missing, has no class folders, or holds no images."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"data folder not found: {root}")
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {root} (expected {root}/<class>/<image>)")
    samples, empty = [], []
    for label, name in enumerate(classes):
        before = len(samples)
        for dirpath, _, filenames in sorted(os.walk(root / name, followlinks=True)):
            samples += [(os.path.join(dirpath, f), label) for f in sorted(filenames)
                        if f.lower().endswith(IMG_EXTENSIONS)]
        if len(samples) == before:
            empty.append(name)
    if not samples:
        raise ValueError(f"no images in the class folders of {root} (extensions: {', '.join(IMG_EXTENSIONS)})")
    if empty:
        raise ValueError(f"class folder {root / empty[0]} holds no images"
                         + (f" (nor do {len(empty) - 1} other class folders)" if len(empty) > 1 else "")
                         + "; remove it or add images: an empty class would still take a label and shift the "
                           "labels of the classes after it")
    return classes, samples


def min_image_side(image_size: int) -> int:
    """Shortest side an image may have for an image_size crop (at most MAX_UPSCALE x enlargement)."""
    return math.ceil(image_size / MAX_UPSCALE)


def _unsupported_mode(img: Image.Image) -> str | None:
    """Why PIL's mode of img cannot be turned into 8-bit RGB faithfully, or None."""
    if img.mode == "F":
        return "floating-point pixels (mode F)"
    if img.mode == "I" and img.format != "PNG":  # a PNG's "I" holds 16-bit values (older Pillow)
        return "32-bit integer pixels (mode I)"
    return None


def image_problem(path: str | Path, image_size: int) -> str | None:
    """Why the image at path cannot be represented faithfully by an image_size crop (one line
    naming the file), or None; reads the header only. Unreadable files give None: decoding them
    reports them."""
    try:
        with Image.open(path) as img:
            width, height = img.size
            mode = _unsupported_mode(img)
    except IMAGE_ERRORS:
        return None
    if mode is not None:
        return f"{path} has {mode}, which 8-bit RGB cannot represent; convert it to 8 or 16 bits"
    if min(width, height) < min_image_side(image_size):
        return (f"{path} is {width}x{height}: too small for a {image_size} px crop (shorter side below "
                f"{min_image_side(image_size)} px = {image_size}/{MAX_UPSCALE}, more than {MAX_UPSCALE}x "
                f"enlargement); remove it or use a smaller --image-size")
    return None


def load_rgb(path: str | Path) -> Image.Image:
    """Decode an image fully (so truncated files fail here) and convert it to 8-bit RGB; 16-bit
    grayscale is scaled (v -> round(v / 257)), not clipped. UnrepresentableImage for float or
    32-bit integer pixels."""
    with Image.open(path) as img:
        problem = _unsupported_mode(img)
        if problem is not None:
            raise UnrepresentableImage(f"{path} has {problem}, which 8-bit RGB cannot represent; "
                                       f"convert it to 8 or 16 bits")
        if img.mode.startswith("I;16") or img.mode == "I":
            wide = np.asarray(img, dtype=np.int64)  # (H, W) in 0..65535
            gray = np.clip((wide + SIXTEEN_BIT_SCALE // 2) // SIXTEEN_BIT_SCALE, 0, 255).astype(np.uint8)
            return Image.fromarray(gray).convert("RGB")
        return img.convert("RGB")


def to_tensor(pil_image: Image.Image) -> torch.Tensor:
    """RGB PIL image -> float32 (3, H, W) in [-1, 1] (LlamaGen's ToTensor + Normalize(0.5, 0.5))."""
    arr = np.asarray(pil_image, dtype=np.uint8)  # (H, W, 3)
    x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0  # (3, H, W) in [0, 1]
    return x * 2.0 - 1.0


def image_transform(image_size: int, random_crop: bool = False,
                    flip: bool = False) -> Callable[[Image.Image], torch.Tensor]:
    """Training transform: center (or random, 0.8-1.0 of the short side) crop to image_size,
    optional random horizontal flip, -> (3, image_size, image_size) in [-1, 1]."""
    def transform(pil_image: Image.Image) -> torch.Tensor:
        if random_crop:
            pil_image = random_crop_arr(pil_image, image_size)
        else:
            pil_image = center_crop_arr(pil_image, image_size)
        x = to_tensor(pil_image)
        if flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x
    return transform


class ImageFolderDataset(Dataset):
    """Items (transform(image), label, index); an unreadable image raises."""

    def __init__(self, root: str | Path, transform: Callable[[Image.Image], torch.Tensor]):
        self.root = Path(root)
        self.classes, self.samples = list_image_folder(self.root)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def relative_path(self, index: int) -> str:
        return Path(self.samples[index][0]).relative_to(self.root).as_posix()

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int]:
        path, label = self.samples[index]
        return self.transform(load_rgb(path)), label, index


class CheckedImageFolderDataset(ImageFolderDataset):
    """Items (transform(image), label, index, error): error is "" for a good image; for an
    unreadable one it is the reason, and the tensor is a placeholder of the right shape that
    callers must drop."""

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, int, str]:
        path, label = self.samples[index]
        try:
            image = load_rgb(path)
        except IMAGE_ERRORS as e:
            placeholder = self.transform(Image.new("RGB", (32, 32)))
            return placeholder, label, index, f"{type(e).__name__}: {e}"
        return self.transform(image), label, index, ""
