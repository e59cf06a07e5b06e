"""The resolved settings of one sampling run (sample_c2i.py), built once from the flags and the
generator checkpoint (autoregressive.sample.cli.build_sampler) and only read afterwards."""
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SampleRun:
    """Flags as given, except the resolved ones: gpt_model (the checkpoint's), image_size (the
    model's grid times the VQ's downsampling), image_size_eval (default image_size), cfg_scale and
    top_k (the mode's defaults when unset), precision ("fp32" / "bf16" / "fp16", as run), patching
    (the DPAR rule as a dict, None for a GPT), entropy_ckpt (the entropy model file a DPAR run
    patches with: --entropy-ckpt or the checkpoint's recorded one; None otherwise) and weights ("ema" or "raw")."""

    gpt_model: str
    gpt_ckpt: str
    vq_model: str
    vq_ckpt: str
    image_size: int
    image_size_eval: int
    cfg_scale: float
    cfg_interval: int
    temperature: float
    top_k: int
    top_p: float
    seed: int
    precision: str
    patching: Optional[dict]
    entropy_ckpt: Optional[str]
    weights: str
    per_proc_batch_size: int
    num_fid_samples: Optional[int]
    sample_dir: Optional[str]
    class_labels: Optional[Sequence[int]]
    out: Optional[str]
    nrow: int
