"""Entropy-driven patch boundaries as small, pure, vectorised tensor functions.

Tokens x_0..x_{T-1} of an image (raster order) are grouped into patches, contiguous
runs that cover 0..T-1. Token 0 opens the first patch; token i > 0 opens a new patch if

- its entropy e_i (rounded to float16, the storage precision) exceeds the threshold tau
  (mode "entropy"; mode "relative" uses BLT's rule e_i - e_{i-1} > tau instead),
- it is the first token of a grid row (row reset), or
- the open patch already holds max_patch_length tokens (length cap).

The cap acts inside each segment opened by a gate or a row start: the token at offset o
from its segment's first token opens a patch iff o % max_patch_length == 0, which gives
the closed form below (a cummax of segment-start indices) instead of a loop over T.

Two gate-free modes serve as ablations: "token" (every token is its own patch) and
"static": fixed-length patches of max_patch_length (honouring the row reset), or, with a
`static_length` L (which may be fractional, e.g. the authors' 1.8191), uniform patches of mean
length L laid out by a fixed pattern (see `static_pattern_starts`).

`patch_starts` applies the rule to whole sequences (training, scoring); `StepRule` applies it
one token at a time (generation) and is tested against it column by column.

Shapes: B = batch, T = tokens per image, M = patches (padded to the batch maximum).
Patch lengths are int64, zero-padded on the right.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any, Mapping

import numpy as np
import torch

PATCH_MODES = ("entropy", "relative", "token", "static")
GATED_MODES = ("entropy", "relative")

# The paper's settings (the authors' configs, dsrivastavv/PixelAR, configs/main_{256,384,512}.yaml;
# row reset on at every size). tau belongs to the entropy model it was chosen for (GPT-B,
# unconditional, trained on that size's ImageNet codes): with any other entropy model choose tau by
# calibration to the compression instead.
@dataclass(frozen=True)
class PaperSetting:
    """The authors' patching setting at one image size (VQ-16 tokens, row reset on).

    threshold: tau in nats. max_patch_length: P_max. compression: the mean tokens per patch the
    paper reports at this size (None where it reports none)."""

    threshold: float
    max_patch_length: int
    compression: float | None = None


PAPER_SETTINGS = {
    256: PaperSetting(threshold=7.8, max_patch_length=4, compression=1.81),
    384: PaperSetting(threshold=7.9, max_patch_length=4, compression=2.06),
    512: PaperSetting(threshold=8.1, max_patch_length=6),
}
PAPER_THRESHOLDS = {size: s.threshold for size, s in PAPER_SETTINGS.items()}  # tau in nats, by image size
PAPER_MAX_PATCH_LENGTHS = {size: s.max_patch_length for size, s in PAPER_SETTINGS.items()}  # P_max, by image size
PAPER_COMPRESSION = {size: s.compression for size, s in PAPER_SETTINGS.items() if s.compression is not None}
PAPER_STATIC_LENGTH = 1.8191  # mean length of the authors' uniform (static) baseline at 256 px


TRAINING_REMEDY = "pass --target-compression (or --threshold) and --max-patch-length"


def unpublished_size_message(image_size: int, remedy: str = TRAINING_REMEDY) -> str:
    """The one-line refusal for an image size without a published setting; `remedy` names the flags."""
    published = ", ".join(str(size) for size in PAPER_SETTINGS)
    return f"the paper publishes no patching setting for {image_size} px images (only {published} px): {remedy}"


def paper_setting(image_size: int, remedy: str = TRAINING_REMEDY) -> PaperSetting:
    """The authors' setting at `image_size`; ValueError (one line, naming `remedy`) at a size they
    publish none for."""
    if image_size not in PAPER_SETTINGS:
        raise ValueError(unpublished_size_message(image_size, remedy))
    return PAPER_SETTINGS[image_size]


def paper_threshold(image_size: int = 256) -> float:
    """The paper's tau at `image_size`; ValueError at a size without a published setting."""
    return paper_setting(image_size).threshold


def paper_max_patch_length(image_size: int = 256) -> int:
    """The paper's P_max at `image_size`; ValueError at a size without a published setting."""
    return paper_setting(image_size).max_patch_length


def quantize_entropy(entropy: torch.Tensor) -> torch.Tensor:
    """Round entropies to float16 (the storage precision) and return them as float32.

    Training (stored float16 entropies) and generation (float32 entropies computed on the
    fly) compare the same rounded values, so the same tokens give the same patches.
    """
    return entropy.to(torch.float16).to(torch.float32)


def gate_scores(entropy: torch.Tensor, mode: str = "entropy") -> torch.Tensor:
    """The values a gated mode compares against tau, float32: quantized entropies (B, T) for
    "entropy", differences of consecutive quantized entropies (B, T - 1) for "relative"
    (column i is token i + 1's score; token 0 has none)."""
    if mode not in GATED_MODES:
        raise ValueError(f"mode {mode!r} has no threshold; expected one of {GATED_MODES}")
    q = quantize_entropy(entropy)  # (B, T)
    if mode == "relative":
        q = q[:, 1:] - q[:, :-1]  # (B, T - 1)
    return q


def patch_starts(
    entropy: torch.Tensor | None,
    threshold: float | None = None,
    max_patch_length: int | None = None,
    row_width: int | None = None,
    mode: str = "entropy",
    shape: tuple[int, int] | None = None,
    device: torch.device | str | None = None,
    static_length: float | None = None,
) -> torch.Tensor:
    """Boolean (B, T) mask of the tokens that open a patch.

    entropy: (B, T) float of any dtype (float16 storage included), in nats. May be None
        for modes "token" and "static"; then `shape` = (B, T) and `device` place the output.
    threshold: tau, compared as `quantize_entropy(e) > threshold` in float32 (mode
        "entropy") or on differences of quantized entropies (mode "relative").
    max_patch_length: length cap (None = no cap); required for mode "static".
    row_width: grid width; when given, the first token of every row opens a patch.
    static_length: mode "static" only: the mean patch length L >= 1 (may be fractional) of the
        fixed pattern of `static_pattern_starts`; max_patch_length, when given, still caps it.
    """
    if mode not in PATCH_MODES:
        raise ValueError(f"unknown patching mode {mode!r}; expected one of {PATCH_MODES}")
    if max_patch_length is not None and max_patch_length < 1:
        raise ValueError(f"max_patch_length must be >= 1, got {max_patch_length}")
    if row_width is not None and row_width < 1:
        raise ValueError(f"row_width must be >= 1, got {row_width}")
    if static_length is not None and mode != "static":
        raise ValueError(f"static_length applies to mode 'static' only, not {mode!r}")
    if mode == "static" and max_patch_length is None and static_length is None:
        raise ValueError("mode 'static' needs max_patch_length (the fixed patch length) or static_length")
    if entropy is not None:
        if entropy.ndim != 2 or not entropy.is_floating_point():
            raise ValueError(f"entropy must be a (B, T) float tensor, got {tuple(entropy.shape)} {entropy.dtype}")
        (B, T), device = entropy.shape, entropy.device
    elif mode in GATED_MODES:
        raise ValueError(f"mode {mode!r} needs entropies")
    elif shape is None:
        raise ValueError("patch_starts without entropies needs shape=(B, T)")
    else:
        (B, T), device = shape, torch.device("cpu") if device is None else device
    if mode in GATED_MODES and threshold is None:
        raise ValueError(f"mode {mode!r} needs a threshold")

    if mode == "token":
        return torch.ones(B, T, dtype=torch.bool, device=device)
    pos = torch.arange(T, dtype=torch.int32, device=device)  # (T,) int32: faster than int64 here
    if static_length is not None:
        opens = static_pattern_starts(T, static_length, row_width, device)
    else:
        opens = pos == 0
        if row_width is not None:
            opens = opens | (pos % row_width == 0)
    opens = opens.expand(B, T)  # (B, T)
    if mode in GATED_MODES:
        gate = gate_scores(entropy, mode) > threshold  # (B, T) or (B, T - 1) for the tokens after the first
        opens = torch.cat([opens[:, : T - gate.shape[1]], opens[:, T - gate.shape[1]:] | gate], dim=1)  # (B, T)
    if max_patch_length is None:
        return opens
    # Offset of each token from the first token of its segment (opened by a gate or a row).
    segment_start = torch.where(opens, pos, 0).cummax(dim=1).values  # (B, T)
    return torch.fmod(pos - segment_start, max_patch_length) == 0  # offsets are >= 0


def static_pattern_starts(
    T: int, mean_length: float, row_width: int | None = None, device: torch.device | str | None = None
) -> torch.Tensor:
    """(T,) bool starts of uniform patches whose mean length is `mean_length` = L >= 1 (fractional
    allowed), spread evenly. The pattern is fixed (it depends on the token index and the grid
    only, never on T), so a prefix of an image gets the same starts as the whole image, and
    generation can apply it token by token.

    - row_width None (no row reset): token i opens a patch iff i = ceil(k * L) for some integer k;
      an image of T tokens holds floor((T - 1) / L) + 1 patches.
    - row_width W (row reset): row r holds c_r = round((r + 1) * W / L) - round(r * W / L) patches
      (clamped to 1..W), whose starts are the offsets ceil(j * W / c_r), j < c_r, from the row's
      first token. The counts telescope, so an H x W grid holds round(H * W / L) patches: the mean
      length is the nearest a whole patch count allows (256 tokens at L = 1.8191: 141 patches,
      mean 1.8156), and the lengths within a row differ by at most one (they are L rounded down
      or up when W / L is large, as at 16 or 24 tokens per row with L <= 4).
    round() rounds halves up. L is taken as the nearest fraction with a denominator up to 10^6
    (1.8191 = 18191/10000) and the pattern is computed in exact integer arithmetic.
    """
    if not mean_length >= 1.0:
        raise ValueError(f"the static mean patch length must be >= 1, got {mean_length}")
    ratio = Fraction(mean_length).limit_denominator(10**6)
    num, den = ratio.numerator, ratio.denominator  # L = num / den
    pos = torch.arange(T, dtype=torch.int64, device=device)  # (T,)
    if row_width is None:  # floor(i / L) steps up exactly at i = ceil(k * L)
        return pos * den // num > (pos - 1) * den // num
    row, offset = pos // row_width, pos % row_width

    def rounded(x_num: torch.Tensor) -> torch.Tensor:  # round(x_num / num), halves up
        return (2 * x_num + num) // (2 * num)

    count = rounded((row + 1) * row_width * den) - rounded(row * row_width * den)
    count = count.clamp(1, row_width)  # (T,) patches in the token's row
    return offset * count // row_width > (offset - 1) * count // row_width


def _check_starts(starts: torch.Tensor) -> None:
    if starts.dtype != torch.bool or starts.ndim != 2:
        raise ValueError(f"starts must be a (B, T) bool tensor, got {tuple(starts.shape)} {starts.dtype}")
    if starts.shape[1] == 0 or not bool(starts[:, 0].all()):
        raise ValueError("every row of starts must open a patch at token 0")


def patch_ids_from_starts(starts: torch.Tensor) -> torch.Tensor:
    """(B, T) int64 index m(i) of the patch holding token i, from a (B, T) bool start mask."""
    _check_starts(starts)
    return starts.long().cumsum(dim=1) - 1


def patch_lengths_from_starts(starts: torch.Tensor, num_patches: int | None = None) -> torch.Tensor:
    """Patch lengths (B, M) int64, zero-padded, from a (B, T) bool start mask.

    M = the batch's largest patch count, or `num_patches` when given (static shapes).
    """
    ids = patch_ids_from_starts(starts)  # (B, T)
    B = starts.shape[0]
    M = int(ids[:, -1].max()) + 1 if B > 0 else 0
    if num_patches is not None:
        if num_patches < M:
            raise ValueError(f"num_patches={num_patches} is below the batch's {M} patches")
        M = num_patches
    lengths = torch.zeros(B, M, dtype=torch.int64, device=starts.device)
    return lengths.scatter_add_(1, ids, torch.ones_like(ids))  # (B, M)


def _check_lengths(lengths: torch.Tensor) -> int:
    """Validate zero-padded (B, M) lengths covering the same T per row; return T."""
    if lengths.ndim != 2 or lengths.is_floating_point() or lengths.dtype == torch.bool:
        raise ValueError(f"lengths must be a (B, M) integer tensor, got {tuple(lengths.shape)} {lengths.dtype}")
    if lengths.numel() == 0:
        return 0
    if bool((lengths < 0).any()):
        raise ValueError("patch lengths must be >= 0")
    real = lengths > 0
    if bool((real[:, 1:] & ~real[:, :-1]).any()):
        raise ValueError("zero (padding) patch lengths must all come after the real patches")
    totals = lengths.sum(dim=1)
    if bool((totals != totals[0]).any()):
        raise ValueError(f"patch lengths must cover the same token count in every row, got {totals.tolist()}")
    return int(totals[0])


def starts_from_lengths(lengths: torch.Tensor) -> torch.Tensor:
    """(B, T) bool start mask from zero-padded (B, M) patch lengths."""
    T = _check_lengths(lengths)
    lengths = lengths.long()
    first = lengths.cumsum(dim=1) - lengths  # (B, M) index of each patch's first token
    first = torch.where(lengths > 0, first, T)  # padded patches write to a spare column
    starts = torch.zeros(lengths.shape[0], T + 1, dtype=torch.bool, device=lengths.device)
    starts.scatter_(1, first, True)
    return starts[:, :T]


def patch_geometry(lengths: torch.Tensor, row_width: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Grid position of each patch, for dynamic RoPE.

    lengths: (B, M) zero-padded patch lengths over raster-order tokens of a grid row_width wide.
    Returns (row, col_start, col_end), each (B, M) int64: the row and column of the patch's
    first token and the column of its last token (which may lie on a later row when a patch
    crosses a row). Padded patches get 0.
    """
    if row_width < 1:
        raise ValueError(f"row_width must be >= 1, got {row_width}")
    _check_lengths(lengths)
    lengths = lengths.long()
    first = lengths.cumsum(dim=1) - lengths  # (B, M)
    last = first + lengths - 1  # (B, M)
    real = lengths > 0
    zero = torch.zeros_like(first)
    row = torch.where(real, first // row_width, zero)
    col_start = torch.where(real, first % row_width, zero)
    col_end = torch.where(real, last % row_width, zero)
    return row, col_start, col_end


@dataclass
class PatchingConfig:
    """Patching settings, stored in DPAR checkpoints (to_dict / from_dict).

    mode: "entropy" (paper), "relative" (BLT), "token" (no merging), "static" (uniform).
    threshold: entropy threshold tau in nats (gated modes).
    max_patch_length: length cap P_max (None = no cap); for "static" without static_length,
        the fixed patch length.
    row_reset: whether the first token of every grid row opens a patch.
    static_length: "static" only: mean patch length of the fixed uniform pattern
        (static_pattern_starts), e.g. PAPER_STATIC_LENGTH; None = max_patch_length's fixed length.

    The defaults are the paper's 256 px setting; paper_patching gives another size's.
    """

    mode: str = "entropy"
    threshold: float | None = PAPER_SETTINGS[256].threshold
    max_patch_length: int | None = PAPER_SETTINGS[256].max_patch_length
    row_reset: bool = True
    static_length: float | None = None

    def __post_init__(self):
        if self.mode not in PATCH_MODES:
            raise ValueError(f"unknown patching mode {self.mode!r}; expected one of {PATCH_MODES}")
        if self.mode in GATED_MODES and self.threshold is None:
            raise ValueError(f"patching mode {self.mode!r} needs a threshold")
        if self.max_patch_length is not None and self.max_patch_length < 1:
            raise ValueError(f"max_patch_length must be >= 1, got {self.max_patch_length}")
        if self.static_length is not None and self.mode != "static":
            raise ValueError(f"static_length applies to patching mode 'static' only, not {self.mode!r}")
        if self.static_length is not None and not self.static_length >= 1.0:
            raise ValueError(f"static_length must be >= 1, got {self.static_length}")
        if self.mode == "static" and self.max_patch_length is None and self.static_length is None:
            raise ValueError("patching mode 'static' needs max_patch_length or static_length")

    @property
    def needs_entropy(self) -> bool:
        return self.mode in GATED_MODES

    def starts(
        self,
        entropy: torch.Tensor | None,
        grid_width: int,
        shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
    ) -> torch.Tensor:
        """(B, T) bool patch starts for entropies (B, T) on a grid `grid_width` tokens wide.

        `shape` and `device` place the output when entropy is None (modes "token", "static").
        """
        return patch_starts(
            entropy,
            self.threshold,
            max_patch_length=self.max_patch_length,
            row_width=grid_width if self.row_reset else None,
            mode=self.mode,
            shape=shape,
            device=device,
            static_length=self.static_length,
        )

    def lengths(
        self,
        entropy: torch.Tensor | None,
        grid_width: int,
        shape: tuple[int, int] | None = None,
        device: torch.device | str | None = None,
        num_patches: int | None = None,
    ) -> torch.Tensor:
        """(B, M) int64 zero-padded patch lengths for entropies (B, T)."""
        return patch_lengths_from_starts(self.starts(entropy, grid_width, shape, device), num_patches)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict; static_length only when set, so other modes' records stay as they were."""
        d = asdict(self)
        if d["static_length"] is None:
            del d["static_length"]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "PatchingConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown patching settings {unknown}; expected a subset of {sorted(known)}")
        return cls(**dict(d))


def paper_patching(image_size: int, remedy: str = TRAINING_REMEDY) -> PatchingConfig:
    """The paper's rule at `image_size` (mode "entropy", its tau and P_max, row reset);
    ValueError (one line, naming `remedy`) at a size without a published setting."""
    setting = paper_setting(image_size, remedy)
    return PatchingConfig("entropy", setting.threshold, setting.max_patch_length, row_reset=True)


class StepRule:
    """The patching rule one token at a time, for generation: step i of `opens` decides the same
    start as column i of `patch_starts` for the same (rounded) entropies.

    Gated modes apply the gate, the row reset and the cap to the current step. The gate-free
    modes ("token", "static") depend on the position alone, so their decisions are read from
    the whole-sequence rule, computed once for one row of `num_tokens` tokens.
    """

    def __init__(self, config: PatchingConfig, grid_width: int, num_tokens: int,
                 device: torch.device | str | None = None):
        if grid_width < 1 or num_tokens < 1:
            raise ValueError(f"grid_width and num_tokens must be >= 1, got {grid_width} and {num_tokens}")
        self.config, self.grid_width, self.num_tokens = config, grid_width, num_tokens
        self.fixed = None  # (T,) bool starts of the gate-free modes
        if not config.needs_entropy:
            self.fixed = config.starts(None, grid_width, shape=(1, num_tokens), device=device)[0]

    @property
    def max_patch_length(self) -> int:
        """An upper bound on any patch's length under this rule (what pooling gathers per patch)."""
        if self.fixed is not None:
            return int(patch_lengths_from_starts(self.fixed[None].cpu()).max())
        bound = self.num_tokens
        if self.config.max_patch_length is not None:
            bound = min(bound, self.config.max_patch_length)
        if self.config.row_reset:
            bound = min(bound, self.grid_width)
        return bound

    def opens(
        self,
        step: int,
        entropy: torch.Tensor | None,
        prev_entropy: torch.Tensor | None,
        open_length: torch.Tensor,
    ) -> torch.Tensor:
        """Whether token `step` (0 < step < num_tokens) opens a patch, (B,) bool.

        entropy, prev_entropy: e_step and e_{step-1} (B,) (gated modes; float of any dtype);
        open_length: (B,) int tokens already in the open patch.
        """
        if not 0 < step < self.num_tokens:
            raise ValueError(f"step must be in 1..{self.num_tokens - 1}, got {step}")
        cfg = self.config
        if self.fixed is not None:
            return self.fixed[step].expand(open_length.shape[0])
        recent = [entropy] if cfg.mode == "entropy" else [prev_entropy, entropy]
        recent = torch.stack([quantize_entropy(e) for e in recent], dim=1)  # (B, 1) or (B, 2)
        opens = gate_scores(recent, cfg.mode)[:, -1] > cfg.threshold  # (B,)
        if cfg.row_reset and step % self.grid_width == 0:
            opens = torch.ones_like(opens)
        if cfg.max_patch_length is not None:
            opens = opens | (open_length >= cfg.max_patch_length)
        return opens


def _to_tensor(x: Any) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    arr = np.asarray(x)
    # Copy (memory-mapped stores are read-only); codes are stored as uint16, which torch lacks.
    return torch.from_numpy(np.array(arr, dtype=np.int64 if arr.dtype.kind == "u" else None))


def build_patch_batch(
    batch: Mapping[str, Any],
    config: PatchingConfig,
    grid_width: int,
    num_patches: int | None = None,
) -> dict[str, torch.Tensor]:
    """Turn a batch of codes, labels and entropies into DPAR training inputs.

    batch: "codes" (B, T) integer (uint16 arrays accepted), "labels" (B,) integer and,
        for gated modes, "entropy" (B, T) float (tensors or numpy arrays).
    Returns {"tokens": (B, T) int64, "labels": (B,) int64, "patch_lengths": (B, M) int64},
    M = the batch's largest patch count or `num_patches`.
    """
    tokens = _to_tensor(batch["codes"]).long()
    labels = _to_tensor(batch["labels"]).long()
    if tokens.ndim != 2 or labels.shape != (tokens.shape[0],):
        raise ValueError(f"expected codes (B, T) and labels (B,), got {tuple(tokens.shape)} and {tuple(labels.shape)}")
    entropy = None
    if config.needs_entropy:
        if batch.get("entropy") is None:
            raise ValueError(f"patching mode {config.mode!r} needs 'entropy' in the batch")
        entropy = _to_tensor(batch["entropy"]).to(tokens.device)
        if entropy.shape != tokens.shape:
            raise ValueError(f"entropy {tuple(entropy.shape)} does not match codes {tuple(tokens.shape)}")
    lengths = config.lengths(entropy, grid_width, tuple(tokens.shape), tokens.device, num_patches)
    return {"tokens": tokens, "labels": labels, "patch_lengths": lengths}

