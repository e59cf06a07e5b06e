"""Entropy-driven patching: patch boundaries (whole sequences and step by step), threshold calibration, statistics.

The entropy model itself is a GPT registry entry run unconditionally; this package turns
its per-token entropies into patches.
"""
from entropy_model.patching import (
    PATCH_MODES,
    PatchingConfig,
    build_patch_batch,
    patch_geometry,
    patch_ids_from_starts,
    patch_lengths_from_starts,
    patch_starts,
    quantize_entropy,
    starts_from_lengths,
)

__all__ = [
    "PATCH_MODES",
    "PatchingConfig",
    "build_patch_batch",
    "patch_geometry",
    "patch_ids_from_starts",
    "patch_lengths_from_starts",
    "patch_starts",
    "quantize_entropy",
    "starts_from_lengths",
]
