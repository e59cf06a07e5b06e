"""The FID Inception-v3 (TensorFlow graph of 2015-12-05) in PyTorch.

The ADM evaluator runs `classify_image_graph_def.pb` in TensorFlow. This module rebuilds that
network with the parameter names of the widely used PyTorch ports of its weights
(pytorch-fid's `pt_inception-2015-12-05-6726825d.pth`, torch-fidelity's
`weights-inception-2015-12-05-6726825d.pth`): `Conv2d_1a_3x3.conv.weight`, `Conv2d_1a_3x3.bn.*`,
`Mixed_5b` .. `Mixed_7c`, `fc.weight` / `fc.bias` (1008 classes).

Where the graph differs from torchvision's Inception-v3:
- the average-pool branches of the A, C and E blocks do not count padded pixels
  (TensorFlow 'SAME' average pooling);
- the last block (Mixed_7c) pools its pool branch with a max-pool instead of an average-pool.

Inputs are NHWC batches with values in 0..255 (uint8 or float). The graph resizes them to
299x299 with TF1 `ResizeBilinear` (align_corners=False, no half-pixel centres) and maps them
to (x - 128) / 128. `resize_mode="tf1"` (default) implements that legacy resize formula;
`resize_mode="torch"` uses `F.interpolate(bilinear, align_corners=False)` instead, which samples
at half-pixel centres (pytorch-fid's choice) and therefore gives slightly different features.

Outputs (see `InceptionOutputs`): `pool_3` (2048-d, FID and precision/recall), the first 7
channels of `mixed_6/conv` = Mixed_6d.branch1x1 flattened in NHWC order (17x17x7 = 2023-d, sFID),
and the 1008 logits of `softmax/logits/MatMul` without the bias (Inception Score).
"""
import hashlib
import os
import socket
from typing import NamedTuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

WEIGHTS_FILENAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" + WEIGHTS_FILENAME
# torch-fidelity ships the same network under this name (same layout, same hash suffix).
ALTERNATIVE_FILENAMES = ("weights-inception-2015-12-05-6726825d.pth",)
WEIGHTS_HASH_PREFIX = "6726825d"  # torch.hub convention: first 8 hex digits of the file's SHA-256
WEIGHTS_ENV = "DPAR_INCEPTION_WEIGHTS"
OFFLINE_ENV = "DPAR_OFFLINE"  # "1" disables the download attempt
DOWNLOAD_TIMEOUT_S = 30.0

INPUT_SIZE = 299
POOL_DIM = 2048
SPATIAL_CHANNELS = 7
SPATIAL_DIM = 17 * 17 * SPATIAL_CHANNELS  # 2023
NUM_LOGITS = 1008
RESIZE_MODES = ("tf1", "torch")


class InceptionWeightsError(FileNotFoundError):
    """The Inception weights file is missing and could not be downloaded (message is one line)."""


class InceptionOutputs(NamedTuple):
    """Features of one batch of N images."""

    pool: torch.Tensor  # (N, 2048) pool_3
    spatial: torch.Tensor  # (N, 2023) mixed_6/conv[..., :7], NHWC-flattened
    logits: torch.Tensor  # (N, 1008) pool_3 @ W^T, no bias


class BasicConv2d(nn.Module):
    """Conv (no bias) -> BatchNorm (eps 1e-3) -> ReLU, the graph's 'conv' unit."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_channels, eps=0.001)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool_same(x: torch.Tensor) -> torch.Tensor:
    # TensorFlow 'SAME' average pooling averages over the in-image pixels only.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    """35x35 block (Mixed_5b/5c/5d): 1x1, 5x5, double 3x3 and pool branches."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = self.branch_pool(_avg_pool_same(x))
        return torch.cat([b1, b5, b3, bp], dim=1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3(x)
        b3d = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b3d, bp], dim=1)


class InceptionC(nn.Module):
    """17x17 block with factorised 7x7 convolutions (Mixed_6b..6e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def branches(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The four branch outputs, each (N, 192, 17, 17); the first is `branch1x1` (sFID taps it in Mixed_6d)."""
        b1 = self.branch1x1(x)
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        b7d = self.branch7x7dbl_1(x)
        b7d = self.branch7x7dbl_3(self.branch7x7dbl_2(b7d))
        b7d = self.branch7x7dbl_5(self.branch7x7dbl_4(b7d))
        bp = self.branch_pool(_avg_pool_same(x))
        return [b1, b7, b7d, bp]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.branches(x), dim=1)


class InceptionD(nn.Module):
    """Grid reduction 17 -> 8 (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        bp = F.max_pool2d(x, kernel_size=3, stride=2)
        return torch.cat([b3, b7, bp], dim=1)


class InceptionE(nn.Module):
    """8x8 block with split 3x3 convolutions (Mixed_7b: average pool branch, Mixed_7c: max pool branch)."""

    def __init__(self, in_channels: int, max_pool_branch: bool) -> None:
        super().__init__()
        self.max_pool_branch = max_pool_branch
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b1 = self.branch1x1(x)
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], dim=1)
        b3d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        b3d = torch.cat([self.branch3x3dbl_3a(b3d), self.branch3x3dbl_3b(b3d)], dim=1)
        if self.max_pool_branch:
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        else:
            pooled = _avg_pool_same(x)
        bp = self.branch_pool(pooled)
        return torch.cat([b1, b3, b3d, bp], dim=1)


def _tf1_resize_weights(in_size: int, out_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices (lower, upper) and lerp weights of TF1's legacy bilinear resize along one axis."""
    scale = np.float32(in_size) / np.float32(out_size)  # float32 division, as the TF kernel
    src = torch.arange(out_size, dtype=torch.float32, device=device) * torch.tensor(scale, device=device)
    src_floor = torch.floor(src)
    lower = src_floor.long().clamp(min=0)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    return lower, upper, src - src_floor


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False): (N, C, H, W) float -> (N, C, size, size).

    Output pixel i samples source coordinate i * in/out (no half-pixel offset), interpolated as
    top = tl + (tr - tl) * x_lerp, bottom = bl + (br - bl) * x_lerp, out = top + (bottom - top) * y_lerp.
    """
    y_lo, y_hi, y_lerp = _tf1_resize_weights(x.shape[2], size, x.device)
    x_lo, x_hi, x_lerp = _tf1_resize_weights(x.shape[3], size, x.device)
    top, bottom = x[:, :, y_lo], x[:, :, y_hi]  # (N, C, size, W) each
    top = top[..., x_lo] + (top[..., x_hi] - top[..., x_lo]) * x_lerp  # (N, C, size, size)
    bottom = bottom[..., x_lo] + (bottom[..., x_hi] - bottom[..., x_lo]) * x_lerp
    return top + (bottom - top) * y_lerp[:, None]


class FIDInceptionV3(nn.Module):
    """Inception-v3 of the FID / ADM evaluator; forward maps (N, H, W, 3) 0..255 images to `InceptionOutputs`."""

    def __init__(self, resize_mode: str = "tf1") -> None:
        super().__init__()
        if resize_mode not in RESIZE_MODES:
            raise ValueError(f"resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        self.resize_mode = resize_mode
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool_branch=False)
        self.Mixed_7c = InceptionE(2048, max_pool_branch=True)
        self.fc = nn.Linear(POOL_DIM, NUM_LOGITS)  # only fc.weight is used (IS logits have no bias)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """(N, H, W, 3) values 0..255 (uint8 or float) -> (N, 3, 299, 299) float32 in [-1, 1)."""
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"expected NHWC images with 3 channels, got shape {tuple(images.shape)}")
        x = images.to(torch.float32).permute(0, 3, 1, 2)  # (N, 3, H, W)
        if self.resize_mode == "tf1":
            x = resize_tf1_bilinear(x, INPUT_SIZE)
        else:
            x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return (x - 128.0) / 128.0

    def forward(self, images: torch.Tensor) -> InceptionOutputs:
        x = self.preprocess(images)  # (N, 3, 299, 299)
        x = self.Conv2d_1a_3x3(x)  # (N, 32, 149, 149)
        x = self.Conv2d_2a_3x3(x)  # (N, 32, 147, 147)
        x = self.Conv2d_2b_3x3(x)  # (N, 64, 147, 147)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 64, 73, 73)
        x = self.Conv2d_3b_1x1(x)  # (N, 80, 73, 73)
        x = self.Conv2d_4a_3x3(x)  # (N, 192, 71, 71)
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # (N, 192, 35, 35)
        x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))  # (N, 288, 35, 35)
        x = self.Mixed_6a(x)  # (N, 768, 17, 17)
        x = self.Mixed_6c(self.Mixed_6b(x))
        branches = self.Mixed_6d.branches(x)  # 4 x (N, 192, 17, 17)
        spatial = branches[0][:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1)  # (N, 17, 17, 7): the graph's NHWC order
        spatial = spatial.reshape(spatial.shape[0], -1)  # (N, 2023)
        x = torch.cat(branches, dim=1)  # (N, 768, 17, 17)
        x = self.Mixed_6e(x)
        x = self.Mixed_7a(x)  # (N, 1280, 8, 8)
        x = self.Mixed_7c(self.Mixed_7b(x))  # (N, 2048, 8, 8)
        pool = x.mean(dim=(2, 3))  # (N, 2048): pool_3 is an 8x8 average pool
        logits = pool @ self.fc.weight.t()  # (N, 1008)
        return InceptionOutputs(pool=pool, spatial=spatial, logits=logits)


def _random_init_(model: nn.Module, seed: int) -> None:
    """Seeded He-normal weights so activations stay O(1) through the 94 layers (tests only)."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * (2.0 / fan_in) ** 0.5)
                if module.bias is not None:
                    module.bias.zero_()


def _hub_checkpoint_dir() -> str:
    return os.path.join(torch.hub.get_dir(), "checkpoints")


def _missing_weights_message(reason: str) -> str:
    return (
        f"FID Inception weights not found ({reason}): download {WEIGHTS_FILENAME} from {WEIGHTS_URL} "
        f"and pass --inception-weights PATH, set {WEIGHTS_ENV}=PATH, or put it in {_hub_checkpoint_dir()}/"
    )


def _download_weights(destination: str) -> None:
    os.makedirs(os.path.dirname(destination), exist_ok=True)
    previous_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # an unreachable host should fail, not hang
    try:
        torch.hub.download_url_to_file(WEIGHTS_URL, destination, hash_prefix=WEIGHTS_HASH_PREFIX, progress=True)
    finally:
        socket.setdefaulttimeout(previous_timeout)


def resolve_inception_weights(path: str | None = None, allow_download: bool | None = None) -> str:
    """Path of the weights file: `path`, else $DPAR_INCEPTION_WEIGHTS, else the torch hub cache, else a download.

    allow_download=None means "download unless $DPAR_OFFLINE=1". Raises InceptionWeightsError with a
    one-line message naming the file, its URL and where to put it.
    """
    path = path or os.environ.get(WEIGHTS_ENV) or None
    if path is not None:
        if not os.path.isfile(path):
            raise InceptionWeightsError(_missing_weights_message(f"no file at {path}"))
        return path
    for name in (WEIGHTS_FILENAME, *ALTERNATIVE_FILENAMES):
        cached = os.path.join(_hub_checkpoint_dir(), name)
        if os.path.isfile(cached):
            return cached
    if allow_download is None:
        allow_download = os.environ.get(OFFLINE_ENV, "0") != "1"
    if not allow_download:
        raise InceptionWeightsError(_missing_weights_message("downloads disabled"))
    destination = os.path.join(_hub_checkpoint_dir(), WEIGHTS_FILENAME)
    try:
        _download_weights(destination)
    except Exception as error:  # network errors come in many types (URLError, socket.timeout, SSL, hash mismatch)
        reason = f"download failed: {type(error).__name__}: {error}".replace("\n", " ")
        raise InceptionWeightsError(_missing_weights_message(reason)) from None
    return destination


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_inception_state_dict(model: FIDInceptionV3, state_dict: dict[str, torch.Tensor]) -> None:
    """Load ported weights, tolerating only absent BatchNorm counters and auxiliary-classifier keys."""
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith("AuxLogits.")}
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k, v in state_dict.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"Inception state dict does not match the FID Inception-v3 layout: missing {missing[:3]}, "
            f"unexpected {unexpected[:3]}, shape mismatch {mismatched[:3]}"
        )
    model.load_state_dict(state_dict, strict=False)


def load_fid_inception(
    weights: str | None = None,
    *,
    allow_download: bool | None = None,
    random_init: bool = False,
    seed: int = 0,
    resize_mode: str = "tf1",
) -> FIDInceptionV3:
    """The FID Inception-v3 in eval mode on CPU, with ported weights (see resolve_inception_weights).

    random_init=True skips the weights and uses seeded random ones: for tests only, numbers are meaningless.
    """
    model = FIDInceptionV3(resize_mode=resize_mode)
    if random_init:
        _random_init_(model, seed)
    else:
        path = resolve_inception_weights(weights, allow_download)
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(state_dict, dict):
            raise ValueError(f"{path} does not hold a state dict")
        load_inception_state_dict(model, state_dict)
    return model.eval().requires_grad_(False)
