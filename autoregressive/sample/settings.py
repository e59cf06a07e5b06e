"""The resolved settings of one sampling run (sample_c2i.py), built once from the flags and the
generator checkpoint (autoregressive.sample.cli.build_sampler) and only read afterwards."""
from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass(frozen=True)
class SampleRun:
    """The flags of the same names as given (utils.cli.settings_from_flags), except the resolved
    ones: from the checkpoint's recorded args (TrainRun.args_dict) gpt_model, weights ("ema" or
    "raw"), patching (the DPAR rule with the flags' overrides, None for a GPT) and entropy_ckpt
    (--entropy-ckpt or the recorded one, for a gated rule); image_size (the model's grid times the
    VQ's downsampling), image_size_eval (default image_size), cfg_scale and top_k (the mode's
    defaults when unset) and precision ("fp32" / "bf16" / "fp16", as run)."""

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
