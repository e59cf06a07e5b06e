"""Sampling for sample_c2i.py: model loading (loading.py), the seeded sampler (sampler.py),
PNG grids (grid.py) and distributed, resumable FID sample folders packed into .npz (fid.py)."""
from autoregressive.sample.cli import build_sampler, main, parse_args
from autoregressive.sample.sampler import Sampler, image_seed, to_uint8

__all__ = ["Sampler", "build_sampler", "image_seed", "main", "parse_args", "to_uint8"]
