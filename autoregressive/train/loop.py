"""train_c2i.py's main: setup, run folder, model, optimizer, data, loop, teardown.

One loop for every model kind: the GPT baseline, the unconditional entropy model and DPAR
differ only in the registry entry and the batch builder (DPAR's adds patch lengths).
"""
import argparse
import dataclasses
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from autoregressive.models import model_family
from autoregressive.models.loss import LossConfig
from autoregressive.train.args import parse_args
from autoregressive.train.data import (
    BatchStream, OpenedEntropies, build_stream, entropy_dir, open_entropies, open_training_store, per_rank_batch,
    require_chosen_threshold, resolve_workers, steps_per_epoch, training_patching)
from autoregressive.train.ema import ModelEMA
from autoregressive.train.guards import StepGuard, StopRequest, TrainingError
from autoregressive.train.logger import TrainLogger, truncate_log
from autoregressive.train.model import (
    autocast_context, create_model, create_optimizer, flop_params, gradient_sync, learning_rate, model_config, parallelize,
    uses_fsdp)
from autoregressive.train.settings import IDENTITY, TrainRun, describe_changes, identity_changes
from dataset.code_store import CODES, CODES_HASH, CodeStore
from entropy_model.patching import GATED_MODES
from utils import checkpoint as ckpt
from utils.distributed import DistInfo, decide_on_main, init_distributed, teardown_distributed
from utils.identity import FileChange, FileWatch, code_store_hash, path_state, write_json_atomic
from utils.run_lock import RunFolderLock, lock_run_folder


@dataclass
class Trainer:
    run: TrainRun  # the resolved settings, read only
    info: DistInfo
    run_dir: Path
    model: nn.Module  # unwrapped (FSDP shards it in place): state dicts use registry names
    module: nn.Module  # what the loop calls (DDP wrapper or the model)
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    stream: BatchStream
    generator: torch.Generator  # label dropout
    total_steps: int
    step: int = 0
    skipped: int = 0  # non-finite steps skipped (--skip-nonfinite)
    logger: Optional[TrainLogger] = None
    ema: Optional[ModelEMA] = None  # --ema
    lock: Optional[RunFolderLock] = None  # rank 0: the run folder's lock, held until main ends
    watches: tuple = ()  # rank 0: FileWatch of codes.npy and (gated DPAR) entropy.npy
    watched: bool = False  # every rank: whether rank 0 watches any input (check_inputs is collective)


def configure_torch(info: DistInfo) -> None:
    """Global torch settings for the device (TF32 matmuls on CUDA)."""
    if info.device.type == "cuda":
        torch.set_float32_matmul_precision("high")
        torch.backends.cudnn.allow_tf32 = True


def device_settings(args: argparse.Namespace, info: DistInfo) -> dict:
    """The 'auto' flags decided for the device, and the checks that need the device."""
    mixed_precision = args.mixed_precision
    if mixed_precision == "auto":
        mixed_precision = "bf16" if info.device.type == "cuda" else "none"
    if mixed_precision == "fp16" and (info.device.type != "cuda" or uses_fsdp(args, info)):
        raise ValueError("--mixed-precision fp16 needs CUDA and DDP; use bf16")
    compiled = info.device.type == "cuda" if args.compile is None else args.compile
    return dict(mixed_precision=mixed_precision, compile=compiled, world_size=info.world_size)


def resolve_run(args: argparse.Namespace, info: DistInfo) -> Tuple[TrainRun, CodeStore, Optional[OpenedEntropies]]:
    """The one step from parsed flags to a TrainRun: device settings, the code store's sizes and
    identity, the model config, the patching rule (DPAR; a gated mode opens and checks the
    entropies), workers, batch split, run folder and step count. args is only read. Returns
    (TrainRun, opened store, OpenedEntropies or None)."""
    resolved = device_settings(args, info)
    store, sizes = open_training_store(args)
    resolved.update(sizes)
    resolved["model_config"] = model_config(argparse.Namespace(**{**vars(args), **resolved}))
    opened = None
    if model_family(args.gpt_model).patched:
        require_chosen_threshold(args, resolved["image_size"])
        if args.patching_mode in GATED_MODES:
            opened = open_entropies(args, store, info)
            resolved.update(code_store_hash=opened.code_store_hash, entropy_model_hash=opened.entropy_model_hash,
                            entropy_sha256=opened.sha256)
        patching, resolved["achieved_compression"] = training_patching(
            args, resolved["image_size"], opened.values if opened else None, store.grid_width)
        resolved.update(threshold=patching.threshold, max_patch_length=patching.max_patch_length or 0,
                        patching=patching.to_dict())
    if "code_store_hash" not in resolved:
        resolved["code_store_hash"] = decide_on_main(lambda: code_store_hash(store.path, verify=args.verify_store),
                                                     info.is_main)
    batch = per_rank_batch(args, info.world_size)
    run_name, run_dir = run_dir_path(args)
    per_epoch = steps_per_epoch(len(store), info.world_size, batch, args.grad_accum_steps)
    run = TrainRun.from_flags(vars(args), loss=LossConfig.from_flags(vars(args)), num_workers=resolve_workers(args),
                              per_rank_batch_size=batch, run_name=run_name, run_dir=str(run_dir),
                              total_steps=args.max_steps or args.epochs * per_epoch, **resolved)
    return run, store, opened


def prepare_run_dir(run: TrainRun, info: DistInfo) -> Path:
    """RESULTS/<run-name>/ with checkpoints/; leftovers of an interrupted save are removed."""
    run_dir = Path(run.run_dir)
    if info.is_main:
        ckpt.checkpoint_dir(run_dir).mkdir(parents=True, exist_ok=True)
        ckpt.remove_partial_checkpoints(ckpt.checkpoint_dir(run_dir))
    return run_dir


def run_dir_path(args: argparse.Namespace) -> Tuple[str, Path]:
    """(run name, RESULTS/<run-name>): --run-name, by default the model, -uncond and the store's name."""
    run_name = args.run_name
    if run_name is None:
        kind = "-uncond" if args.unconditional else ""
        run_name = f"{args.gpt_model}{kind}-{Path(args.code_path).resolve().name}"
    return run_name, Path(args.results_dir) / run_name


def resume_source(run: TrainRun, run_dir: Path) -> Tuple[Optional[Path], list, dict]:
    """(checkpoint to continue from, notes, identity changes): the run folder's newest readable
    checkpoint (newer unreadable ones are renamed *.unreadable, never deleted), else --resume /
    --gpt-ckpt, else None; checked to hold this run's architecture and, for our checkpoints, this
    run's identity (autoregressive.train.settings.IDENTITY) before anything trains: a change is
    refused in one line unless --continue-with-new-settings, and then returned."""
    ckpt_dir = ckpt.checkpoint_dir(run_dir)
    source, bad = ckpt.newest_readable(ckpt_dir)
    if bad and source is None:
        raise ValueError(f"{bad[0][1]}; the run folder {run_dir} has no readable checkpoint to resume from")
    notes = [f"note: {reason}; kept as {ckpt.set_aside(path).name}, resuming from {source.name} instead"
             for path, reason in bad]
    hint = f" (the run folder {run_dir} holds it: choose another --run-name)" if source is not None else ""
    if source is None and run.resume is not None:
        source = Path(run.resume)
        if not source.exists():
            raise ValueError(f"--resume {source}: no such checkpoint")
    if source is None:
        return None, notes, {}
    saved = ckpt.read_checkpoint_args(source)
    try:
        ckpt.check_same_architecture(saved, run, source)
    except ValueError as e:
        raise ValueError(f"{e}{hint}") from None
    changes = identity_changes(saved, run.args_dict()) if "model_config" in saved else {}  # LlamaGen's: weights only
    if changes and not run.continue_with_new_settings:
        where = f"entropies {entropy_dir(run) / 'entropy.npy'}: " if "entropy_sha256" in changes else ""
        raise ValueError(f"checkpoint {source} belongs to a run with other settings ({where}{describe_changes(changes)}"
                         f"); pass --continue-with-new-settings to continue it with these (recorded in the run), or "
                         f"another --run-name for a new run")
    return source, notes, changes


def take_run_folder(args: argparse.Namespace, info: DistInfo) -> Optional[RunFolderLock]:
    """Rank 0 takes the run folder's lock (one trainer per folder: utils.run_lock) before any
    other work, so a second trainer is refused at once; every rank learns of a refusal (one-line
    ValueError). Returns the lock on rank 0, None on the others."""
    held = []

    def take() -> None:
        held.append(lock_run_folder(run_dir_path(args)[1]))

    decide_on_main(take, info.is_main)
    return held[0] if held else None


def changed_args(saved: dict, run: TrainRun) -> list:
    """Flags outside the run's identity that differ from the checkpoint's run (reported)."""
    ignore = {"resume", "gpt_ckpt", "init_weights", "max_steps", "epochs", "run_dir", "world_size",
              "per_rank_batch_size", "total_steps", "setting_changes", "continue_with_new_settings", *IDENTITY}
    current = run.args_dict()
    return [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in sorted(current)
            if k in saved and k not in ignore and saved[k] != current[k]]


def restore(t: Trainer, source: Path, changes: dict) -> None:
    """Weights, optimizer, EMA, step, data position and (same world size) RNG states from source.
    LlamaGen's files have no data position: the stream continues at the step's batch. The
    run's record of setting changes carries over, plus `changes` (accepted identity changes)
    from the next step on."""
    state = ckpt.load_training_checkpoint(source, t.model, t.optimizer, uses_fsdp(t.run, t.info), t.ema)
    t.step, t.skipped = int(state["step"]), int(state.get("skipped", 0))
    position = state.get("data_position") or {
        "epoch": t.step // t.stream.steps_per_epoch,
        "samples": t.step % t.stream.steps_per_epoch * t.run.global_batch_size}
    t.stream.seek(position)
    if t.scaler is not None and state.get("scaler"):
        t.scaler.load_state_dict(state["scaler"])
    if t.ema is not None and not state["ema_loaded"]:
        t.logger.print(f"note: {source} has no EMA weights; the EMA starts at its weights")
    rng = state.get("rng") or []
    if len(rng) == t.info.world_size:
        ckpt.restore_rng(rng[t.info.rank], t.generator)
    else:
        ckpt.seed_rng(t.run.seed + t.step, t.info.rank, t.generator)
        t.logger.print(f"note: checkpoint has RNG states for {len(rng)} ranks, this run has {t.info.world_size}; "
                       f"dropout randomness is reseeded")
    if t.run.resume is not None and Path(t.run.resume).resolve() != source.resolve():
        t.logger.print(f"note: --resume {t.run.resume} ignored: the run folder has its own checkpoints")
    saved = state.get("args") or {}
    for line in changed_args(saved, t.run):
        t.logger.print(f"note: changed since the checkpoint: {line}")
    history = [dict(c) for c in saved.get("setting_changes") or []]
    if changes and t.step < t.total_steps:  # a change that would not train is not recorded
        history.append({"from_step": t.step + 1, "changes": changes})
        t.logger.print(f"note: continuing with new settings from step {t.step + 1} (--continue-with-new-settings): "
                       f"{describe_changes(changes)}")
    t.run = dataclasses.replace(t.run, setting_changes=tuple(history))
    t.logger.print(f"resumed from {source} at step {t.step} (epoch {t.stream.epoch})")


def setup(args: argparse.Namespace, info: DistInfo) -> Trainer:
    """Everything before the first step; every bad input stops here with a one-line ValueError.
    args is only read: the run's settings are resolved once into a TrainRun. On rank 0 the
    returned Trainer holds the run folder's lock (released by main)."""
    configure_torch(info)
    lock = take_run_folder(args, info)
    try:
        codes_state = path_state(Path(args.code_path) / CODES)  # before the store's checks
        run, store, opened = resolve_run(args, info)
        model = create_model(run)
        source, notes, changes = decide_on_main(lambda: resume_source(run, Path(run.run_dir)), info.is_main)
        run_dir = prepare_run_dir(run, info)
        stream = build_stream(run, store, opened.values if opened else None, info, model)
        flops = flop_params(model)
        model.to(info.device)
        module = parallelize(model, run, info)
        optimizer = create_optimizer(model, run, info)
        scaler = torch.amp.GradScaler("cuda") if run.mixed_precision == "fp16" else None
        t = Trainer(run, info, run_dir, model, module, optimizer, scaler, stream, torch.Generator(), run.total_steps,
                    lock=lock)
        t.watched, t.watches = input_watches(store, opened, codes_state, info)
        ckpt.seed_rng(run.seed, info.rank, t.generator)
        t.logger = TrainLogger(run_dir, run, info, t.total_steps, flops)
        for line in notes:
            t.logger.print(line)
        if run.ema:
            t.ema = ModelEMA(model, run.ema_decay)
        if source is not None:
            restore(t, source, changes)
        elif run.init_weights is not None:
            ckpt.load_initial_weights(Path(run.init_weights), model, uses_fsdp(run, info))
            if t.ema is not None:
                t.ema.copy_from_model()
            t.logger.print(f"new run from the weights of {run.init_weights}")
        if info.is_main:
            truncate_log(run_dir / "log.jsonl", t.step)  # records past the checkpoint (or of a run that saved none)
    except BaseException:
        if lock is not None:
            lock.release(remove_folder=True)  # a run refused before it wrote anything leaves no folder
        raise
    return t


def write_run_record(t: Trainer) -> None:
    """args.json: the settings of the run as it trains from here (rank 0), written only when a
    step is about to train, so it never names settings that did not train."""
    if t.info.is_main:
        write_json_atomic(t.run_dir / "args.json", t.run.args_dict())


def input_watches(store: CodeStore, opened: Optional[OpenedEntropies], codes_state: Optional[tuple],
                  info: DistInfo) -> Tuple[bool, tuple]:
    """(whether any input is watched, rank 0's watches): codes.npy of a store whose manifest
    records its hash (from its state before the store's checks), and the entropies of a gated
    DPAR run. The first value is the same on every rank."""
    codes_sha256 = store.manifest.get(CODES_HASH) if store.layout != "llamagen" else None
    watched = codes_sha256 is not None or opened is not None
    if not info.is_main:
        return watched, ()
    codes = (FileWatch(store.path / CODES, codes_sha256, seen=codes_state),) if codes_sha256 else ()
    return watched, codes + ((opened.watch,) if opened is not None else ())


def check_inputs(t: Trainer) -> Optional[FileChange]:
    """Whether the codes and entropies at their paths are still the ones this run started with
    (rank 0 checks, every rank gets the answer; a stat per file, a hash only after a change)."""
    if not t.watched:
        return None
    return decide_on_main(lambda: next((c for c in (w.check() for w in t.watches) if c is not None), None),
                          t.info.is_main)


def stop_for_changed_inputs(t: Trainer, change: FileChange) -> None:
    """Stop the run (TrainingError, one line). After an atomic switch the run's own mapping still
    holds the inputs it started with, so the steps since the last checkpoint are saved first;
    after an in-place rewrite they may have read the new values, and nothing is saved."""
    if change.replaced:
        save(t)
        kept = f"saved step {t.step} (trained on the inputs it started with) and stopped"
    else:
        last, _ = ckpt.newest_readable(ckpt.checkpoint_dir(t.run_dir))
        kept = f"stopped without saving; it resumes from {last}" if last else "stopped without saving"
    raise TrainingError(f"{change.message}: a run trains only on the inputs it started with; it {kept} (rerun "
                        f"with --continue-with-new-settings to continue on the new ones)")


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------
def train_step(t: Trainer, batches: list) -> tuple:
    """Forward/backward over the step's micro-batches (gradient sync on the last only), clip,
    optimizer step. Returns (mean loss, grad norm, weight) as device tensors; weight is 0 when
    --skip-nonfinite skipped the update."""
    n = len(batches)
    total = torch.zeros((), device=t.info.device)
    for i, batch in enumerate(batches):
        with gradient_sync(t.module, sync=i == n - 1):
            with autocast_context(t.run, t.info):
                _, loss = t.module(**batch.inputs, loss_config=t.run.loss)  # chunked: no (B, T, V) logits
            scaled = loss / n
            (t.scaler.scale(scaled) if t.scaler is not None else scaled).backward()
        total += loss.detach().float()
    if t.scaler is not None:
        t.scaler.unscale_(t.optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(t.model.parameters(), t.run.max_grad_norm or float("inf"))
    grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
    loss = total / n
    weight = torch.ones((), device=t.info.device)
    if t.run.skip_nonfinite and not _all_finite(loss, grad_norm, t.scaler is not None):
        t.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, weight.zero_()
    if t.scaler is not None:
        t.scaler.step(t.optimizer)
        t.scaler.update()
    else:
        t.optimizer.step()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.update()
    return loss, grad_norm, weight


def _all_finite(loss: torch.Tensor, grad_norm: torch.Tensor, scaled: bool) -> bool:
    """Synchronous check over all ranks (--skip-nonfinite); with fp16 the scaler handles
    non-finite gradients itself, so only the loss counts."""
    from utils.distributed import all_reduce

    finite = torch.isfinite(loss) if scaled else torch.isfinite(loss) & torch.isfinite(grad_norm)
    return bool(all_reduce(finite.float(), "min").item())


def save(t: Trainer) -> None:
    """Checkpoint the step (all ranks); a full disk stops the run with one line (TrainingError)."""
    pos = t.stream.position()
    state = {"step": t.step, "epoch": pos["epoch"], "data_position": pos, "args": t.run.args_dict(),
             "skipped": t.skipped}
    if t.scaler is not None:
        state["scaler"] = t.scaler.state_dict()
    sharded = uses_fsdp(t.run, t.info)
    ckpt_dir = ckpt.checkpoint_dir(t.run_dir)
    try:
        path = ckpt.save_training_checkpoint(ckpt_dir, t.model, t.optimizer, state, t.info, sharded, t.generator,
                                             t.ema)
        if sharded and t.run.export_consolidated:
            export = t.run_dir / "exports" / f"{t.step:07d}.pt"
            ckpt.export_weights(t.model, {k: v for k, v in state.items() if k != "optimizer"}, export, t.info, t.ema,
                                ckpt_dir)
    except ckpt.NoSpaceError as e:
        raise TrainingError(str(e)) from e
    if t.info.is_main:
        ckpt.prune_checkpoints(ckpt_dir, t.run.keep_last, t.run.keep_every)
    t.logger.print(f"saved checkpoint {path}")


def train(t: Trainer, stop: StopRequest) -> None:
    run, guard = t.run, StepGuard(stop)
    if t.step >= t.total_steps:
        t.logger.print(f"already at step {t.step} of {t.total_steps}; nothing to train")
        return
    write_run_record(t)
    parallel = run.data_parallel if t.info.distributed else "single process"
    ema = f", EMA decay {run.ema_decay}" if t.ema is not None else ""
    t.logger.print(f"training {run.gpt_model} ({sum(p.numel() for p in t.model.parameters()):,} parameters), "
                   f"steps {t.step} -> {t.total_steps} ({t.stream.steps_per_epoch} per epoch) on {t.info.world_size} x "
                   f"{t.info.device.type} ({parallel}, {run.mixed_precision}), batch {run.per_rank_batch_size} x "
                   f"{run.grad_accum_steps} accumulation per rank{ema}; run folder {t.run_dir}")
    t.module.train()
    while t.step < t.total_steps:
        lr = learning_rate(t.step, run, t.total_steps)
        for group in t.optimizer.param_groups:
            group["lr"] = lr
        batches = t.stream.next_step(t.generator)
        loss, grad_norm, weight = train_step(t, batches)
        t.skipped += int(weight.item() == 0) if run.skip_nonfinite else 0
        if t.skipped > run.skip_nonfinite:
            raise TrainingError(f"more than {run.skip_nonfinite} non-finite steps (the last at step {t.step + 1})")
        t.step += 1
        finite = torch.isfinite(loss) if t.scaler is not None else torch.isfinite(loss) & torch.isfinite(grad_norm)
        stopping = guard.after_step(t.step, finite | (weight == 0))
        t.logger.update(t.step, t.stream.epoch, lr, loss, grad_norm, weight, batches)
        saving = stopping or t.step == t.total_steps or t.step % run.ckpt_every == 0
        if saving or t.step % run.log_every == 0:
            change = check_inputs(t)
            if change is not None:
                guard.flush()
                stop_for_changed_inputs(t, change)
        if saving:
            stopping = guard.flush() or stopping
            save(t)
        if stopping:
            name = signal.Signals(stop.signum).name if stop.signum else "a signal on another rank"
            t.logger.print(f"stopped by {name} at step {t.step}; rerun the same command to continue")
            return
    t.logger.print(f"done: {t.step} steps")


def main(argv: Optional[Sequence[str]] = None) -> None:
    """Parse, set up, train, tear down. Bad input and deliberate stops end with one line on
    stderr and exit status 1; a signal ends with a checkpoint and status 0."""
    args = parse_args(argv)
    stop = StopRequest().install()
    info, t = None, None
    try:
        try:
            info = init_distributed(args.device)
            t = setup(args, info)
        except (ValueError, FileNotFoundError) as e:
            raise SystemExit(_error_line(e, info))
        try:
            train(t, stop)
        except TrainingError as e:
            raise SystemExit(_error_line(e, info))
    finally:
        if t is not None and t.logger is not None:
            t.logger.close()
        if t is not None and t.lock is not None:
            t.lock.release()
        stop.restore()
        teardown_distributed()


def _error_line(e: Exception, info: Optional[DistInfo]) -> str:
    where = f" (rank {info.rank})" if info is not None and info.distributed else ""
    return f"error{where}: {str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
