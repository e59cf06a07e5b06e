"""The resolved settings of one training run (train_c2i.py), built once from the flags, the code
store and the device (autoregressive.train.loop.resolve_run) and only read afterwards."""
import dataclasses
import json
from dataclasses import dataclass
from typing import Any, Mapping, Optional

from autoregressive.models.loss import LossConfig
from utils.cli import settings_from_flags


@dataclass(frozen=True)
class TrainRun:
    """Every setting of a run as one field: the flags (autoregressive.train.args, in its order)
    under their names, those left 'auto' or unset holding the value as used: mixed_precision and
    compile (for the device), vocab_size, image_size, downsample_size and num_classes (from the
    code store), num_workers, run_name, threshold (tau as used) and max_patch_length (DPAR: P_max
    as used, 0 = no cap); the loss flags as one LossConfig (`loss`); then the values derived from
    them."""

    code_path: str
    vocab_size: int
    image_size: int
    downsample_size: int
    num_classes: int
    num_workers: int
    gpt_model: str
    unconditional: bool
    cls_token_num: int
    dropout_p: float
    token_dropout_p: float
    drop_path_rate: float
    class_dropout_prob: float
    loss: LossConfig  # the loss flags (autoregressive/models/loss.py)
    entropy_path: Optional[str]
    entropy_model: Optional[str]
    verify_store: bool
    patching_mode: str
    threshold: Optional[float]
    target_compression: Optional[float]
    max_patch_length: Optional[int]
    no_row_reset: bool
    encoder_layers: Optional[int]
    decoder_layers: Optional[int]
    patch_rope: str
    static_length: Optional[float]
    local_dropout: bool
    patch_init: str
    epochs: int
    max_steps: Optional[int]
    global_batch_size: int
    grad_accum_steps: int
    lr: float
    lr_schedule: str
    warmup_steps: int
    min_lr: float
    weight_decay: float
    beta1: float
    beta2: float
    max_grad_norm: float
    seed: int
    skip_nonfinite: int
    device: str
    data_parallel: str
    mixed_precision: str
    compile: bool
    compile_scope: str
    activation_checkpointing: bool
    results_dir: str
    run_name: str
    continue_with_new_settings: bool
    resume: Optional[str]
    ckpt_every: int
    keep_last: int
    keep_every: int
    init_weights: Optional[str]
    ema: bool
    ema_decay: float
    export_consolidated: bool
    log_every: int
    peak_tflops: float
    speed_warmup_steps: int
    wandb: bool
    wandb_project: str
    gpt_ckpt: Optional[str]  # LlamaGen's flags, recorded as given (parsing maps them onto resume, results_dir)
    gpt_type: str
    dataset: str
    cloud_save_path: Optional[str]
    no_local_save: bool
    world_size: int  # derived
    block_size: int  # tokens per image
    model_config: dict  # the registry config as a dict
    run_dir: str
    per_rank_batch_size: int
    total_steps: int
    code_store_hash: str
    entropy_model_hash: Optional[str] = None  # gated DPAR modes: the entropies' model and file
    entropy_sha256: Optional[str] = None
    achieved_compression: Optional[float] = None  # DPAR: mean patch length, and the rule as a dict
    patching: Optional[dict] = None
    setting_changes: tuple = ()  # ({"from_step", "changes": {setting: [old, new]}}, ...): --continue-with-new-settings

    @classmethod
    def from_flags(cls, flags: Mapping[str, Any], **resolved) -> "TrainRun":
        """Each field is resolved[name], else flags[name]. Every flag must land in a field, or in a
        field of a resolved settings dataclass, so that a new flag is declared where it is read."""
        names = {f.name for f in dataclasses.fields(cls)}
        nested = {f.name for v in resolved.values() if dataclasses.is_dataclass(v) for f in dataclasses.fields(v)}
        unplaced = sorted(set(flags) - names - nested)
        if unplaced:
            raise TypeError(f"{cls.__name__} has no field for the flags {unplaced}")
        return settings_from_flags(cls, flags, **resolved)

    def args_dict(self) -> dict:
        """What checkpoints, args.json and wandb record as "args": the fields as plain values, a
        settings dataclass's fields under their flag names; the entropies' hashes, the patching rule and setting_changes only when the run has them."""
        out = dataclasses.asdict(self)
        for f in dataclasses.fields(self):  # a settings dataclass (the loss) is recorded as its flags
            if dataclasses.is_dataclass(getattr(self, f.name)):
                out.update(out.pop(f.name))
        for key, companion in (("entropy_sha256", "entropy_model_hash"), ("patching", "achieved_compression"),
                               ("setting_changes", None)):
            if not out[key]:
                del out[key]
                out.pop(companion, None)
        return json.loads(json.dumps(out))  # plain values: tuples as lists


# What a run is (docs/design.md, "Run folders: lock, identity, inputs"): its model, data, entropies,
# patching rule and the optimisation settings that shape its weights. Not identity: how it is
# computed (world size, gradient accumulation, mixed precision, compile, workers, device), where
# it is written, how it logs, and how long it runs (except under a cosine decay, whose learning
# rates follow the total step count).
IDENTITY = ("gpt_model", "model_config", "code_store_hash", "entropy_model_hash", "entropy_sha256", "patching",
            "seed", "global_batch_size", "lr", "lr_schedule", "warmup_steps", "min_lr", "weight_decay", "beta1",
            "beta2", "max_grad_norm", "ema", "ema_decay", *(f.name for f in dataclasses.fields(LossConfig)))


def run_identity(args: Mapping[str, Any]) -> dict:
    """The settings that define a run, from its recorded args (a checkpoint's or args.json)."""
    decays = args.get("lr_schedule") == "cosine" and args.get("min_lr") != args.get("lr")
    keys = IDENTITY + (("total_steps",) if decays else ())
    return {k: args[k] for k in keys if k in args}


def identity_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict:
    """{setting: [saved, current]} for the identity settings that differ. A setting the saved
    record does not hold (written before it was recorded) is not compared."""
    ours, theirs = run_identity(current), run_identity(saved)
    return {k: [theirs[k], ours.get(k)] for k in sorted(theirs) if theirs[k] != ours.get(k)}


def describe_changes(changes: Mapping[str, list]) -> str:
    """'lr 0.001 -> 0.003, model_config.dropout_p 0.1 -> 0.0' (hashes shortened)."""
    def short(v):
        return f"{v[:12]}" if isinstance(v, str) and len(v) == 64 else repr(v)

    parts = []
    for key, (old, new) in changes.items():
        if isinstance(old, dict) and isinstance(new, dict):
            parts += [f"{key}.{k} {short(old.get(k))} -> {short(new.get(k))}" for k in sorted(set(old) | set(new))
                      if old.get(k) != new.get(k)]
        else:
            parts.append(f"{key} {short(old)} -> {short(new)}")
    return ", ".join(parts)
