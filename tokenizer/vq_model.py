"""VQ image tokenizer with LlamaGen's VQModel layout.

Parameter and buffer names follow LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so its released
VQ-16 / VQ-8 checkpoints load strict and unchanged. The architecture (VQGAN-style conv encoder/decoder,
GroupNorm(32, eps=1e-6), swish, single-head spatial attention at the lowest resolution, l2-normalised
codebook with nearest-code lookup) is re-implemented from that description.

Images are (B, 3, H, W) in [-1, 1]; latents are (B, C, h, w) with h = H / downsample_factor.
"""
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.checkpoint import load_checkpoint

USAGE_HISTORY = 65536  # length of LlamaGen's `quantize.codebook_used` buffer (recent code indices)
LOOKUP_CHUNK = 8192  # latent vectors per distance matrix in `VectorQuantizer.lookup` (8192 x 16384 floats)


@dataclass
class VQConfig:
    """Every knob of a VQModel; `VQModel(VQConfig(**asdict(config)))` rebuilds the same module."""
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    codebook_show_usage: bool = True  # keep the `codebook_used` buffer (present in released checkpoints)
    commit_loss_beta: float = 0.25
    entropy_loss_ratio: float = 0.0
    ch: int = 128
    ch_mult: list[int] = field(default_factory=lambda: [1, 1, 2, 2, 4])  # encoder and decoder
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    norm_groups: int = 32

    def __post_init__(self) -> None:
        self.ch_mult = [int(m) for m in self.ch_mult]
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        if self.codebook_size < 1 or self.codebook_embed_dim < 1:
            raise ValueError(f"codebook must be non-empty, got {self.codebook_size}x{self.codebook_embed_dim}")
        widths = sorted({self.ch * m for m in self.ch_mult} | {self.ch})
        bad = [w for w in widths if w % self.norm_groups]
        if bad:
            raise ValueError(f"norm_groups={self.norm_groups} must divide every block width {widths} "
                             f"(not {bad}); choose ch or norm_groups accordingly")

    @property
    def downsample_factor(self) -> int:
        """Image pixels per latent cell along each side: one stride-2 downsample between levels."""
        return 2 ** (len(self.ch_mult) - 1)


class QuantizerLoss(NamedTuple):
    """LlamaGen's quantizer losses (scalars): codebook, beta-weighted commitment, weighted entropy."""
    vq_loss: torch.Tensor
    commit_loss: torch.Tensor
    entropy_loss: torch.Tensor


class VQEncoding(NamedTuple):
    """Result of `VQModel.encode`; unpacks like LlamaGen's `quant, emb_loss, info` (info = the indices)."""
    quant: torch.Tensor      # (B, D, h, w) quantised latent, straight-through gradient to the encoder
    losses: QuantizerLoss
    indices: torch.Tensor    # (B, h, w) int64 nearest-code indices


class VQOutput(NamedTuple):
    """Result of `VQModel.forward`; unpacks like LlamaGen's `dec, diff`."""
    reconstruction: torch.Tensor  # (B, 3, H, W)
    losses: QuantizerLoss


def swish(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(x)


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """norm-swish-conv twice plus a residual; a 1x1 `nin_shortcut` when the width changes."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = group_norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)
        else:
            self.nin_shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(self.dropout(swish(self.norm2(h))))
        return self.nin_shortcut(x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, 1x1-conv projections, residual."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, kernel_size=1)
        self.k = nn.Conv2d(channels, channels, kernel_size=1)
        self.v = nn.Conv2d(channels, channels, kernel_size=1)
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        h = self.norm(x)
        q, k, v = (proj(h).reshape(B, 1, C, H * W).transpose(2, 3) for proj in (self.q, self.k, self.v))
        # q, k, v: (B, 1, H*W, C); softmax(q k^T / sqrt(C)) v
        out = F.scaled_dot_product_attention(q, k, v)  # (B, 1, H*W, C)
        out = out.transpose(2, 3).reshape(B, C, H, W)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    """Stride-2 3x3 conv after zero-padding one pixel on the right and bottom: (H, W) -> (H/2, W/2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv: (H, W) -> (2H, 2W)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class ConvLevel(nn.Module):
    """One resolution level's residual blocks, each followed by attention at the lowest resolution."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, config: VQConfig):
        super().__init__()
        groups = config.norm_groups
        self.res = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, config.dropout, groups)
            for i in range(num_blocks))
        self.attn = nn.ModuleList(AttnBlock(out_channels, groups) for _ in range(num_blocks if with_attn else 0))

    def blocks(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.res):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class EncoderLevel(ConvLevel):
    """Residual blocks then a stride-2 `downsample` (identity on the last level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, is_last: bool, config: VQConfig):
        super().__init__(in_channels, out_channels, num_blocks, with_attn=is_last, config=config)
        self.downsample = nn.Identity() if is_last else Downsample(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.downsample(self.blocks(h))


class DecoderLevel(ConvLevel):
    """Residual blocks then an x2 `upsample` (identity on the last, full-resolution level)."""

    def __init__(self, in_channels: int, out_channels: int, num_blocks: int, with_attn: bool, is_last: bool,
                 config: VQConfig):
        super().__init__(in_channels, out_channels, num_blocks, with_attn=with_attn, config=config)
        self.upsample = nn.Identity() if is_last else Upsample(out_channels)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.upsample(self.blocks(h))


def mid_blocks(channels: int, config: VQConfig) -> nn.ModuleList:
    """LlamaGen's `mid`: resnet, attention, resnet at constant width."""
    groups = config.norm_groups
    return nn.ModuleList([ResnetBlock(channels, channels, config.dropout, groups), AttnBlock(channels, groups),
                          ResnetBlock(channels, channels, config.dropout, groups)])


class Encoder(nn.Module):
    """(B, 3, H, W) -> (B, z_channels, H/f, W/f), f = 2**(len(ch_mult)-1)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, last = config.ch, config.ch_mult, len(config.ch_mult) - 1
        self.conv_in = nn.Conv2d(3, ch, kernel_size=3, stride=1, padding=1)
        in_mult = [1] + mult
        self.conv_blocks = nn.ModuleList(
            EncoderLevel(ch * in_mult[i], ch * mult[i], config.num_res_blocks, is_last=(i == last), config=config)
            for i in range(len(mult)))
        width = ch * mult[-1]
        self.mid = mid_blocks(width, config)
        self.norm_out = group_norm(width, config.norm_groups)
        self.conv_out = nn.Conv2d(width, config.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for level in self.conv_blocks:
            h = level(h)  # halves H, W at every level but the last
        for block in self.mid:
            h = block(h)
        return self.conv_out(swish(self.norm_out(h)))  # (B, z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> (B, 3, h*f, w*f); levels run from the widest (lowest resolution) up."""

    def __init__(self, config: VQConfig):
        super().__init__()
        ch, mult, last = config.ch, config.ch_mult, len(config.ch_mult) - 1
        width = ch * mult[-1]
        self.conv_in = nn.Conv2d(config.z_channels, width, kernel_size=3, stride=1, padding=1)
        self.mid = mid_blocks(width, config)
        levels = []
        for i in reversed(range(len(mult))):
            levels.append(DecoderLevel(width, ch * mult[i], config.num_res_blocks + 1, with_attn=(i == last),
                                       is_last=(i == 0), config=config))
            width = ch * mult[i]
        self.conv_blocks = nn.ModuleList(levels)
        self.norm_out = group_norm(width, config.norm_groups)
        self.conv_out = nn.Conv2d(width, 3, kernel_size=3, stride=1, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)  # doubles the resolution at every level but the last
        return self.conv_out(swish(self.norm_out(h)))  # (B, 3, h*f, w*f)


def entropy_loss(affinity: torch.Tensor, temperature: float = 0.01) -> torch.Tensor:
    """Per-token entropy minus the entropy of the batch-mean code distribution (LlamaGen's
    `compute_entropy_loss`, softmax variant): low per-token, high over the batch = confident and diverse.
    affinity: (N, K) negative distances."""
    logits = affinity / temperature
    probs = F.softmax(logits, dim=-1)
    sample_entropy = -(probs * F.log_softmax(logits + 1e-5, dim=-1)).sum(-1).mean()
    mean_probs = probs.mean(0)
    batch_entropy = -(mean_probs * torch.log(mean_probs + 1e-5)).sum()
    return sample_entropy - batch_entropy


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser. With l2 norm both latents and codes are normalised before the lookup
    and the quantised latent is the normalised code."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.codebook_size, config.codebook_embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / config.codebook_size, 1.0 / config.codebook_size)
        if config.codebook_l2_norm:
            self.embedding.weight.data = F.normalize(self.embedding.weight.data, p=2, dim=-1)
        if config.codebook_show_usage:
            self.register_buffer("codebook_used", torch.zeros(USAGE_HISTORY))

    def codebook(self) -> torch.Tensor:
        """(K, D) codes as used for lookup and decoding."""
        w = self.embedding.weight
        return F.normalize(w, p=2, dim=-1) if self.config.codebook_l2_norm else w

    def distances(self, z_flat: torch.Tensor) -> torch.Tensor:
        """Squared distances (N, K) from the (already normalised, if l2) latents z_flat (N, D) to every code.
        Always float32, also under autocast or in a half-precision model, so the chosen codes do not move."""
        with torch.autocast(device_type=z_flat.device.type, enabled=False):
            z, codes = z_flat.float(), self.codebook().float()
            return z.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2 * z @ codes.t()

    def normalised_latent(self, z: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, h, w, D), l2-normalised over D when the codebook is."""
        z = z.permute(0, 2, 3, 1).contiguous()
        return F.normalize(z, p=2, dim=-1) if self.config.codebook_l2_norm else z

    def lookup(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest-code indices (B, h, w) int64 for a latent z (B, D, h, w); chunked so the (N, K) distance
        matrix stays small for large batches."""
        zn = self.normalised_latent(z)  # (B, h, w, D)
        rows = zn.reshape(-1, zn.shape[-1])  # (B*h*w, D)
        indices = torch.cat([self.distances(chunk).argmin(dim=1) for chunk in rows.split(LOOKUP_CHUNK)])
        return indices.view(zn.shape[:3])

    def forward(self, z: torch.Tensor) -> VQEncoding:
        """z (B, D, h, w) -> quantised (B, D, h, w) with straight-through gradient, losses, indices (B, h, w)."""
        zn = self.normalised_latent(z)  # (B, h, w, D)
        d = self.distances(zn.reshape(-1, zn.shape[-1]))  # (B*h*w, K)
        indices = d.argmin(dim=1)  # (B*h*w,)
        zq = self.codebook()[indices].view(zn.shape)  # (B, h, w, D)
        losses = QuantizerLoss(
            vq_loss=torch.mean((zq - zn.detach()) ** 2),
            commit_loss=self.config.commit_loss_beta * torch.mean((zq.detach() - zn) ** 2),
            entropy_loss=(self.config.entropy_loss_ratio * entropy_loss(-d)
                          if self.config.entropy_loss_ratio > 0 else zn.new_zeros(())),
        )
        zq = zn + (zq - zn).detach()
        return VQEncoding(zq.permute(0, 3, 1, 2), losses, indices.view(zn.shape[:3]))

    @torch.no_grad()
    def record_usage(self, indices: torch.Tensor) -> None:
        """Append indices to the `codebook_used` history (LlamaGen's training-time usage tracker)."""
        if not self.config.codebook_show_usage:
            return
        recent = indices.reshape(-1)[-USAGE_HISTORY:].to(self.codebook_used.dtype)
        n = recent.numel()
        self.codebook_used.copy_(torch.cat([self.codebook_used[n:], recent]))

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, int, int, int]) -> torch.Tensor:
        """indices with B*h*w entries (any layout, raster order) -> codes (B, D, h, w) for shape (B, D, h, w)."""
        B, D, h, w = shape
        if indices.numel() != B * h * w:
            raise ValueError(f"got {indices.numel()} indices for latent shape {tuple(shape)}")
        if D != self.config.codebook_embed_dim:
            raise ValueError(f"shape has {D} channels but codes have {self.config.codebook_embed_dim}")
        zq = self.codebook()[indices.reshape(-1)]  # (B*h*w, D)
        return zq.view(B, h, w, D).permute(0, 3, 1, 2).contiguous()  # (B, D, h, w)


class VQModel(nn.Module):
    """Encoder -> quant_conv -> quantize -> post_quant_conv -> decoder (LlamaGen's VQModel)."""

    def __init__(self, config: VQConfig):
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, kernel_size=1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, kernel_size=1)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> pre-quantisation latent (B, D, H/f, W/f)."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != 3 or x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"expected images (B, 3, H, W) with H, W divisible by {f}, got {tuple(x.shape)}")
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> VQEncoding:
        """Images (B, 3, H, W) in [-1, 1] -> (quant (B, D, h, w), losses, indices (B, h, w))."""
        return self.quantize(self._latent(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Quantised latent (B, D, h, w) -> images (B, 3, h*f, w*f)."""
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, indices: torch.Tensor, shape: tuple[int, int, int, int] | None = None) -> torch.Tensor:
        """Code indices -> images (B, 3, h*f, w*f). `shape` = (B, D, h, w) as in LlamaGen; it may be
        omitted when indices are (B, h, w)."""
        if shape is None:
            if indices.ndim != 3:
                raise ValueError(f"pass shape=(B, D, h, w) for indices of shape {tuple(indices.shape)}")
            shape = (indices.shape[0], self.config.codebook_embed_dim, indices.shape[1], indices.shape[2])
        return self.decode(self.quantize.get_codebook_entry(indices, tuple(shape)))

    def forward(self, x: torch.Tensor) -> VQOutput:
        """Images (B, 3, H, W) -> (reconstruction (B, 3, H, W), quantiser losses)."""
        quant, losses, _ = self.encode(x)
        return VQOutput(self.decode(quant), losses)

    @torch.no_grad()
    def encode_to_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> nearest-code indices (B, H/f, W/f) int64, raster order."""
        return self.quantize.lookup(self._latent(images))


# Registry: name -> the config fields that define the architecture; every field can be overridden.
VQ_ARCHS: dict[str, dict] = {
    "VQ-16": {"ch_mult": [1, 1, 2, 2, 4]},  # downsample 16, 71.9M parameters at the default width
    "VQ-8": {"ch_mult": [1, 2, 2, 4]},      # downsample 8, 70.1M parameters at the default width
}


def vq_config(model_name: str, **overrides) -> VQConfig:
    """The registry config for `model_name` with `overrides` applied (no model is built)."""
    if model_name not in VQ_ARCHS:
        raise ValueError(f"unknown VQ model {model_name!r}; choose from {', '.join(VQ_ARCHS)}")
    return VQConfig(**{**VQ_ARCHS[model_name], **overrides})


def VQ_16(**kwargs) -> VQModel:
    return VQModel(vq_config("VQ-16", **kwargs))


def VQ_8(**kwargs) -> VQModel:
    return VQModel(vq_config("VQ-8", **kwargs))


VQ_models: dict[str, Callable[..., VQModel]] = {"VQ-16": VQ_16, "VQ-8": VQ_8}


def _shape_str(shape: tuple[int, ...]) -> str:
    return "x".join(str(s) for s in shape)


def _list_keys(keys: list[str], limit: int = 4) -> str:
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def check_state_dict(model: VQModel, state: dict[str, torch.Tensor], model_name: str) -> None:
    """Raise ValueError with one line naming what in `state` does not match `model`."""
    expected = model.state_dict()
    key = "quantize.embedding.weight"
    if key in state and key in expected and state[key].shape != expected[key].shape:
        raise ValueError(f"checkpoint codebook is {_shape_str(state[key].shape)} but {model_name} config "
                         f"expects {_shape_str(expected[key].shape)}")
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = ([f"missing keys {_list_keys(missing)}"] if missing else []) + \
                ([f"unexpected keys {_list_keys(unexpected)}"] if unexpected else [])
        raise ValueError(f"checkpoint is not a {model_name} state dict: " + "; ".join(parts))
    wrong = [k for k in expected if tuple(state[k].shape) != tuple(expected[k].shape)]
    if wrong:
        k = wrong[0]
        more = f" (+{len(wrong) - 1} more)" if len(wrong) > 1 else ""
        raise ValueError(f"checkpoint does not match the {model_name} config: {k} is "
                         f"{tuple(state[k].shape)} but the config expects {tuple(expected[k].shape)}{more} "
                         f"(check ch, z_channels, ch_mult)")


def load_vq_checkpoint(path: str | Path, model_name: str, **overrides) -> VQModel:
    """Build a VQ model and load a checkpoint into it (strict), returned in eval mode on CPU.

    Accepts a bare state dict or a dict with the state dict under "model" (LlamaGen and this project).
    A project checkpoint (args["model_config"]) is rebuilt from its stored config; otherwise the model is
    `vq_config(model_name, **overrides)`. Raises ValueError with one line when anything does not match.
    """
    if model_name not in VQ_ARCHS:
        raise ValueError(f"unknown VQ model {model_name!r}; choose from {', '.join(VQ_ARCHS)}")
    obj = load_checkpoint(path)  # weights_only; allows LlamaGen's pickled argparse.Namespace
    if not isinstance(obj, dict):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict or checkpoint dict")
    if isinstance(obj.get("model"), dict):
        state = obj["model"]
    elif obj and all(torch.is_tensor(v) for v in obj.values()):
        state = obj
    else:
        raise ValueError(f"{path} has no state dict under 'model' (top-level keys: {_list_keys(sorted(obj))})")

    args = obj.get("args")
    if isinstance(args, dict) and isinstance(args.get("model_config"), dict):
        stored_name = args.get("vq_model", model_name)
        if stored_name != model_name:
            raise ValueError(f"checkpoint holds a {stored_name} tokenizer but {model_name} was requested")
        try:
            config = VQConfig(**{**args["model_config"], **overrides})
        except TypeError as e:
            raise ValueError(f"checkpoint model_config does not fit VQConfig: {e}") from None
    else:
        config = vq_config(model_name, **overrides)
    model = VQModel(config)
    check_state_dict(model, state, model_name)
    model.load_state_dict(state, strict=True)
    return model.eval()
