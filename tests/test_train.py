"""train_c2i.py single-process: learning, exact resume (max-steps and SIGTERM), gradient
accumulation, the data position, DPAR batches, non-finite stops and one-line input errors.

Helpers here are shared with test_train_distributed.py."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from autoregressive.models import model_from_checkpoint
from autoregressive.train import main
from autoregressive.train.args import parse_args
from autoregressive.train.data import BatchStream, GPTBatches, build_stream
from autoregressive.train.loop import resolve_run
from autoregressive.train.model import create_model, learning_rate
from autoregressive.train.settings import IDENTITY, TrainRun
from dataset.code_store import CodeDataset, CodeStoreWriter, open_code_store
import train_faults
from utils.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints
from utils.distributed import DistInfo
from utils.identity import code_store_hash, record_file

REPO = Path(__file__).resolve().parents[1]
GRID, VOCAB, CLASSES = 4, 16, 4


def make_store(path: Path, count: int = 32, views: int = 2, seed: int = 0, tagged: bool = False) -> Path:
    """A learnable code store: view v of an image with label c is (t % 4 + 3c + v) mod 16 at
    token t, so the next token is a function of the class, the view and the previous token.
    tagged: the first three tokens hold (i mod 16, i // 16, v) instead, naming image i and view v."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, count)
    t = np.arange(GRID * GRID)
    codes = np.stack([[(t % 4 + 3 * c + v) % VOCAB for v in range(views)] for c in labels])  # (N, views, T)
    if tagged:
        codes[:, :, 0] = np.arange(count)[:, None] % VOCAB
        codes[:, :, 1] = np.arange(count)[:, None] // VOCAB
        codes[:, :, 2] = np.arange(views)[None, :]
    writer = CodeStoreWriter.create(path, count, views, GRID * GRID)
    writer.write(np.arange(count), codes, labels)
    writer.finalize({"image_size": GRID * 16, "grid_height": GRID, "grid_width": GRID, "codebook_size": VOCAB,
                     "num_views": views, "tokenizer_hash": "test", "num_classes": CLASSES})
    return path


def train_argv(store: Path, results: Path, run: str, *extra: str, **flags) -> list:
    """Flags of a tiny CPU run (GPT-T, global batch 8: 4 steps per epoch on 32 images)."""
    base = {"code-path": store, "results-dir": results, "run-name": run, "gpt-model": "GPT-T",
            "global-batch-size": 8, "num-workers": 0, "log-every": 1, "ckpt-every": 4, "lr": 3e-3, "device": "cpu"}
    base.update({k.replace("_", "-"): v for k, v in flags.items()})
    return [x for k, v in base.items() for x in (f"--{k}", str(v))] + list(extra)


NO_DROPOUT = ("--dropout-p", "0", "--token-dropout-p", "0", "--class-dropout-prob", "0")


def read_log(run_dir: Path) -> list:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def final_state(run_dir: Path) -> dict:
    return load_checkpoint(latest_checkpoint(run_dir / "checkpoints"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), k
        else:
            assert torch.allclose(a[k], b[k], atol=atol, rtol=0), (k, (a[k] - b[k]).abs().max())


def subprocess_env(**extra) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """In-process runs use one thread, like the subprocesses (OMP_NUM_THREADS=1): tiny models
    gain nothing from more, and a busy machine makes threads spin."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return make_store(tmp_path_factory.mktemp("codes") / "toy")


# ---------------------------------------------------------------------------------------
# Training runs
# ---------------------------------------------------------------------------------------
def test_gpt_learns_and_writes_a_complete_run_folder(store, tmp_path):
    main(train_argv(store, tmp_path, "run", max_steps=24, log_every=4, keep_last=2))
    run = tmp_path / "run"
    log = read_log(run)
    assert [r["step"] for r in log] == [4, 8, 12, 16, 20, 24]
    losses = [r["loss"] for r in log]
    assert all(np.isfinite(losses)) and losses[0] > 2.0  # starts near ln 16 = 2.77
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(r["tokens_per_s"] > 0 and "mfu" not in r for r in log)  # MFU on GPU only
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [20, 24]  # keep_last=2
    args = json.loads((run / "args.json").read_text())
    assert (args["vocab_size"], args["num_classes"], args["block_size"], args["image_size"]) == (16, 4, 16, 64)
    ckpt = final_state(run)
    assert ckpt["step"] == 24 and ckpt["data_position"] == {"epoch": 5, "samples": 32}
    assert len(ckpt["rng"]) == 1 and ckpt["args"]["gpt_model"] == "GPT-T"
    model, margs = model_from_checkpoint(latest_checkpoint(run / "checkpoints"))
    assert margs["model_config"]["model_type"] == "c2i" and model.config.vocab_size == VOCAB


def test_unconditional_builds_the_entropy_model(store, tmp_path):
    main(train_argv(store, tmp_path, "entropy", "--unconditional", max_steps=2))
    model, args = model_from_checkpoint(latest_checkpoint(tmp_path / "entropy" / "checkpoints"))
    assert model.config.model_type == "uncond" and args["unconditional"] is True


def test_resume_after_max_steps_and_sigterm_is_bit_exact(store, tmp_path, monkeypatch):
    """Dropout, label dropout and two views per image are on, and the interruptions fall
    mid-epoch (4 steps per epoch): every RNG and the data position must be restored."""
    main(train_argv(store, tmp_path, "full", max_steps=10))
    main(train_argv(store, tmp_path, "split", max_steps=6))
    main(train_argv(store, tmp_path, "split", max_steps=10))
    handler = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as patch:
        train_faults.inject(patch, "sigterm", at_step=5)
        main(train_argv(store, tmp_path, "killed", max_steps=10))
    assert signal.getsignal(signal.SIGTERM) == handler  # main restores the handlers
    # the signal arrives after step 5; all ranks agree one step later and checkpoint there
    assert [s for s, _ in list_checkpoints(tmp_path / "killed" / "checkpoints")] == [4, 7]
    assert "stopped by SIGTERM at step 7" in (tmp_path / "killed" / "log.txt").read_text()
    main(train_argv(store, tmp_path, "killed", max_steps=10))
    full = final_state(tmp_path / "full")
    for run in ("split", "killed"):
        other = final_state(tmp_path / run)
        assert other["step"] == 10 and other["data_position"] == full["data_position"]
        assert_same_weights(full["model"], other["model"])
        assert_same_weights(full["optimizer"]["state"]["output.weight"], other["optimizer"]["state"]["output.weight"])
    # the killed run's log has no records past its last checkpoint, then continues
    assert [r["step"] for r in read_log(tmp_path / "killed")] == list(range(1, 11))


def test_gradient_accumulation_matches_the_full_batch(store, tmp_path):
    main(train_argv(store, tmp_path, "whole", *NO_DROPOUT, max_steps=4))
    main(train_argv(store, tmp_path, "accum", *NO_DROPOUT, max_steps=4, grad_accum_steps=4))
    a, b = read_log(tmp_path / "whole"), read_log(tmp_path / "accum")
    assert np.allclose([r["loss"] for r in a], [r["loss"] for r in b], atol=1e-5, rtol=0)
    assert np.allclose([r["grad_norm"] for r in a], [r["grad_norm"] for r in b], rtol=1e-4, atol=0)
    assert_same_weights(final_state(tmp_path / "whole")["model"], final_state(tmp_path / "accum")["model"], atol=1e-5)


def test_loss_flags_reach_the_training_step(store, tmp_path):
    """--z-loss is in the trained loss: the output head starts at zero, so every first-step logit
    is 0, its cross-entropy ln V and its z-loss term z_loss * (ln V)^2. The flag is recorded."""
    main(train_argv(store, tmp_path, "z", *NO_DROPOUT, max_steps=1, z_loss=0.5))
    first = read_log(tmp_path / "z")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(np.log(VOCAB) + 0.5 * np.log(VOCAB) ** 2, rel=1e-5)
    assert final_state(tmp_path / "z")["args"]["z_loss"] == 0.5


def test_dpar_batches_carry_patch_lengths(tmp_path):
    """Entropies with threshold gates: rising along each row, above tau at columns 2 and 3."""
    entropy_store = make_store(tmp_path / "codes")
    entropy = np.tile(np.array([0.5, 1.0, 3.0, 4.0] * GRID, dtype=np.float16), (32, 2, 1))  # (N, views, T)
    np.save(entropy_store / "entropy.npy", entropy)
    record = {"entropy_model_hash": "e" * 64, "code_store_hash": code_store_hash(entropy_store), "count": 32,
              "entropy_file": record_file(entropy_store / "entropy.npy")}
    (entropy_store / "entropy.json").write_text(json.dumps(record))
    main(train_argv(entropy_store, tmp_path, "dpar", gpt_model="DPAR-T", threshold=2.0, max_patch_length=4,
                    max_steps=3))
    log = read_log(tmp_path / "dpar")
    # per row: [0 1] [2] [3] -> 3 patches of 4 tokens: mean length 4/3
    assert all(abs(r["mean_patch_length"] - 4 / 3) < 1e-9 and r["patches_per_s"] > 0 for r in log)
    args = final_state(tmp_path / "dpar")["args"]
    assert args["patching"] == {"mode": "entropy", "threshold": 2.0, "max_patch_length": 4, "row_reset": True}
    assert args["entropy_model_hash"] == "e" * 64 and args["code_store_hash"] == record["code_store_hash"]
    flags = vars(parse_args(train_argv(entropy_store, tmp_path, "dpar", gpt_model="DPAR-T", threshold=2.0,
                                       max_patch_length=4, max_steps=3)))
    derived = {"world_size", "block_size", "model_config", "run_dir", "per_rank_batch_size", "total_steps",
               "code_store_hash", "entropy_model_hash", "entropy_sha256", "achieved_compression", "patching"}
    assert set(args) == set(flags) | derived and args["achieved_compression"] is None and args["total_steps"] == 3
    assert json.loads((tmp_path / "dpar" / "args.json").read_text()) == args  # one record of the run
    record["code_store_hash"] = "0" * 64  # entropies of other codes are refused
    (entropy_store / "entropy.json").write_text(json.dumps(record))
    with pytest.raises(SystemExit, match="^error: entropies in .* were made for code store 0000"):
        main(train_argv(entropy_store, tmp_path, "dpar2", gpt_model="DPAR-T", threshold=2.0, max_patch_length=4,
                        max_steps=1))


def test_dpar_batches_from_workers_equal_the_in_process_ones(tmp_path):
    """A DPAR batch (codes, labels and a packed layout of a dozen tensors) travels from a worker
    as two buffers (pack_tensors) and arrives equal to the batch built in the main process."""
    from autoregressive.models.dpar import DPAR_models
    from autoregressive.train.data import DPARBatches, pack_tensors
    from entropy_model.patching import PatchingConfig

    store = open_code_store(make_store(tmp_path / "codes", count=24))
    rng = np.random.default_rng(5)
    entropies = (rng.random((24, 2, GRID * GRID)) * 4).astype(np.float16)
    config = DPAR_models["DPAR-T"](vocab_size=VOCAB, block_size=GRID * GRID, num_classes=CLASSES,
                                   pack_multiple=8).config
    builder = DPARBatches(VOCAB, CLASSES, 0.1, PatchingConfig("entropy", 2.0, 4, True), GRID, config)
    dataset = CodeDataset(store, seed=1, entropies=entropies)
    order = [int(i) for i in rng.permutation(24)]
    raw = builder.collate(dataset.__getitems__(order[:8]))
    buffers, _ = pack_tensors(raw)
    assert len(buffers) == 2 and set(buffers) == {torch.int64, torch.int32}  # every tensor in two buffers

    def batches(workers):
        loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=order, num_workers=workers,
                                             collate_fn=builder.collate)
        generator = torch.Generator().manual_seed(0)
        return [builder(r, generator) for r in loader]

    def flat(batch):
        layout = batch.inputs["patch_lengths"]
        docs = layout.documents
        assert docs is not None  # precondition: packed layouts, with their documents
        tensors = [batch.inputs["idx"], batch.inputs["cond_idx"], batch.inputs["targets"], layout.token_slot,
                   layout.decoder_slot, layout.class_slot, layout.slot_geometry, docs.cu_seqlens, docs.doc_ids,
                   docs.grid_index, docs.slot_index]
        return tensors, (docs.max_seqlen, batch.patches)

    here, there = batches(0), batches(2)
    assert len(here) == len(there) == 3
    counts = set()
    for a, b in zip(here, there):
        (ta, ma), (tb, mb) = flat(a), flat(b)
        assert ma == mb and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(ta, tb))
        counts.add(a.patches)
    assert len(counts) > 1  # precondition: the batches' patchings differ


def test_nonfinite_loss_stops_naming_the_step(store, tmp_path):
    """lr 1e30 makes step 2's loss non-finite; the step-2 checkpoint is never written."""
    with pytest.raises(SystemExit, match=r"^error: non-finite loss or gradient at step 2;"):
        main(train_argv(store, tmp_path, "nan", max_steps=6, lr=1e30, ckpt_every=1))
    assert [s for s, _ in list_checkpoints(tmp_path / "nan" / "checkpoints")] == [1]
    with pytest.raises(SystemExit, match=r"^error: more than 2 non-finite steps \(the last at step 4\)"):
        main(train_argv(store, tmp_path, "skip", max_steps=6, lr=1e30, skip_nonfinite=2))


# ---------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------
def _stream(store: Path, rank: int, world: int, accum: int, global_batch: int = 8) -> BatchStream:
    args = parse_args(["--code-path", str(store), "--global-batch-size", str(global_batch), "--num-workers", "0",
                       "--grad-accum-steps", str(accum)])
    dataset = CodeDataset(open_code_store(store), seed=0)
    info = DistInfo(rank, world, 0, torch.device("cpu"))
    return BatchStream(dataset, GPTBatches(VOCAB, CLASSES, 0.0), info, args)


def _step_samples(streams: list) -> list:
    """The (image, view) pairs of one optimizer step over all ranks and micro-batches, sorted."""
    gen = torch.Generator()
    tags = [tuple(r[:3]) for s in streams for b in s.next_step(gen) for r in b.inputs["targets"].tolist()]
    return sorted((i + VOCAB * j, v) for i, j, v in tags)


def test_global_batches_do_not_depend_on_world_size_or_accumulation(tmp_path):
    """Global batch j of an epoch is the same samples (and views) for 1 process, 2 ranks or 2
    micro-batches, and seeking to a saved position continues with exactly the next batches."""
    store = make_store(tmp_path / "tagged", tagged=True)
    single = [_stream(store, 0, 1, 1)]
    pairs = [_stream(store, r, 2, 1) for r in range(2)]
    accum = [_stream(store, 0, 1, 2)]
    reference = [_step_samples(single) for _ in range(7)]  # crosses into epoch 1 after 4 steps
    assert reference == [_step_samples(pairs) for _ in range(7)] == [_step_samples(accum) for _ in range(7)]
    assert single[0].position() == {"epoch": 1, "samples": 24}
    epoch0 = [i for step in reference[:4] for i, _ in step]
    assert sorted(epoch0) == list(range(32)) and epoch0 != sorted(epoch0)  # a shuffled pass over the store
    views = {v for step in reference for _, v in step}
    assert views == {0, 1}  # a random view per image and epoch
    resumed = [_stream(store, r, 2, 1) for r in range(2)]
    for s in resumed:
        s.seek({"epoch": 0, "samples": 16})  # after step 2
    assert [_step_samples(resumed) for _ in range(5)] == reference[2:]


def test_label_dropout_rate_in_training_batches(tmp_path):
    """The trainer's batch path (flags -> model config -> build_stream) replaces each label by
    the null class (num_classes) independently with probability --class-dropout-prob, and
    keeps the others: the class of a view is recoverable from its first code, (3c + v) mod 16."""
    store = make_store(tmp_path / "many", count=512)
    prob, steps = 0.25, 8
    args = parse_args(train_argv(store, tmp_path, "drop", "--class-dropout-prob", str(prob), global_batch_size=512))
    info = DistInfo(0, 1, 0, torch.device("cpu"))
    run, store, entropies = resolve_run(args, info)
    stream = build_stream(run, store, entropies, info, create_model(run))
    generator = torch.Generator().manual_seed(0)
    batches = [b.inputs for _ in range(steps) for b in stream.next_step(generator)]
    labels = torch.cat([b["cond_idx"] for b in batches])  # (steps * 512,)
    classes = torch.cat([b["targets"][:, 0] // 3 for b in batches])
    dropped = labels == CLASSES
    n = labels.numel()
    assert n == 4096 and len(set(classes.tolist())) == CLASSES  # precondition: every class present
    assert abs(dropped.float().mean().item() - prob) < 5 * (prob * (1 - prob) / n) ** 0.5  # 5 sigma
    assert torch.equal(labels[~dropped], classes[~dropped])
    per_batch = torch.stack([(b["cond_idx"] == CLASSES).float().mean() for b in batches])
    assert (per_batch > 0.15).all() and (per_batch < 0.35).all()  # per label, not per batch
    for c in range(CLASSES):  # independent of the class
        assert abs(dropped[classes == c].float().mean().item() - prob) < 0.06


def test_run_settings_resolve_once_and_stay_frozen(tmp_path):
    """resolve_run reads the parsed flags without writing to them and returns a frozen TrainRun
    whose derived values match their plain references (DistributedSampler's per-rank share for
    the step count); args_dict() is the flags with the resolved values plus the derived ones."""
    import copy
    import dataclasses

    from torch.utils.data import DistributedSampler

    store = make_store(tmp_path / "odd", count=33)
    args = parse_args(train_argv(store, tmp_path, "frozen", "--epochs", "3", global_batch_size=9))
    before = copy.deepcopy(vars(args))
    run, opened, entropies = resolve_run(args, DistInfo(0, 3, 0, torch.device("cpu")))
    assert vars(args) == before  # only read
    share = DistributedSampler(range(33), num_replicas=3, rank=0, shuffle=True, drop_last=False).num_samples
    assert share == 11 and run.per_rank_batch_size == 3  # precondition: a padded, uneven share
    assert run.total_steps == 3 * (share // 3)
    assert (run.vocab_size, run.block_size, run.num_classes, run.world_size) == (VOCAB, GRID * GRID, CLASSES, 3)
    assert run.run_dir == str(tmp_path / "frozen") and entropies is None and len(opened) == 33
    assert run.model_config == dataclasses.asdict(create_model(run).config) and run.lr == args.lr
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.total_steps = 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.lr = 1.0
    with pytest.raises(AttributeError):  # no fall-through to raw flags: every setting is a declared field
        run.flags
    values = {f.name: getattr(run, f.name) for f in dataclasses.fields(run)}
    nested = {f.name for v in values.values() if dataclasses.is_dataclass(v) for f in dataclasses.fields(v)}
    assert nested and set(IDENTITY) <= set(values) | nested  # identity and every flag: declared fields, or
    assert set(before) <= set(values) | nested  # fields of a declared settings dataclass (the loss)
    with pytest.raises(TypeError, match="no field for the flags"):
        TrainRun.from_flags({**vars(args), "undeclared_flag": 1}, **values)
    recorded = run.args_dict()
    derived = {"world_size", "block_size", "model_config", "run_dir", "per_rank_batch_size", "total_steps",
               "code_store_hash"}
    assert set(recorded) == set(before) | derived and json.loads(json.dumps(recorded)) == recorded
    assert recorded["code_store_hash"] == code_store_hash(store)
    assert recorded["vocab_size"] == VOCAB and before["vocab_size"] is None and recorded["lr"] == args.lr
    # a flag may instead land in a resolved settings dataclass (one field of the run), recorded by its name
    Extra = dataclasses.make_dataclass("Extra", [("extra_weight", float)], frozen=True)
    WithExtra = dataclasses.make_dataclass("WithExtra", [("extra", Extra, dataclasses.field(default=None))],
                                           bases=(TrainRun,), frozen=True)
    weight = float(torch.rand(()))
    with_extra = WithExtra.from_flags({**vars(args), "extra_weight": weight}, extra=Extra(weight), **values)
    assert with_extra.args_dict() == {**recorded, "extra_weight": weight}


def test_learning_rate_schedule():
    args = parse_args(["--code-path", "x", "--lr", "1e-3", "--warmup-steps", "4", "--lr-schedule", "cosine",
                       "--min-lr", "1e-4"])
    lrs = [learning_rate(s, args, 14) for s in range(14)]
    assert np.allclose(lrs[:4], [2.5e-4, 5e-4, 7.5e-4, 1e-3])
    assert abs(lrs[9] - (1e-4 + 0.5 * 9e-4)) < 1e-12 and lrs[4] == 1e-3 and lrs[-1] > 1e-4
    constant = parse_args(["--code-path", "x"])
    assert {learning_rate(s, constant, 10) for s in range(10)} == {1e-4}


def test_training_compiles_with_cuda_and_not_on_cpu_unless_a_flag_says():
    """--compile's default in one sentence: on with CUDA, off on CPU; --compile / --no-compile win."""
    from autoregressive.train.loop import device_settings

    base = ["--code-path", "x"]
    for device, default in (("cuda", True), ("cpu", False)):
        info = DistInfo(0, 1, 0, torch.device(device))
        assert device_settings(parse_args(base), info)["compile"] is default
        assert device_settings(parse_args(base + ["--compile"]), info)["compile"] is True
        assert device_settings(parse_args(base + ["--no-compile"]), info)["compile"] is False


def test_pruning_keeps_the_newest_and_the_milestones(tmp_path):
    for step in (100, 200, 300, 400, 500):
        (tmp_path / f"{step:07d}.pt").write_bytes(b"x")
    (tmp_path / "0000600").mkdir()  # a distributed checkpoint directory
    (tmp_path / ".0000700.tmp").mkdir()  # an interrupted save is never "latest"
    assert latest_checkpoint(tmp_path) == tmp_path / "0000600"
    prune_checkpoints(tmp_path, keep_last=2, keep_every=200)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [200, 400, 500, 600]


# ---------------------------------------------------------------------------------------
# Bad input: one line, no traceback, before any training
# ---------------------------------------------------------------------------------------
def test_bad_inputs_stop_with_one_line(store, tmp_path, capsys):
    main(train_argv(store, tmp_path, "gpt-t", max_steps=1))
    other = latest_checkpoint(tmp_path / "gpt-t" / "checkpoints")
    capsys.readouterr()
    cases = {
        "grid": (["--image-size", "128"], "--image-size 128 contradicts the code store"),
        "labels": (["--num-classes", "3"], "holds class ids 0..3, outside 0..2"),
        "arch-run-folder": (["--run-name", "gpt-t", "--gpt-model", "GPT-XS"], "is a GPT-T, but this run builds GPT-XS"),
        "arch-resume": (["--resume", str(other), "--dropout-p", "0", "--class-dropout-prob", "0"],
                        "has GPT-T with class_dropout_prob=0.1, but this run builds class_dropout_prob=0.0"),
    }
    for name, (flags, message) in cases.items():
        with pytest.raises(SystemExit) as stop:
            main(train_argv(store, tmp_path, name, *flags, max_steps=1))
        text = str(stop.value.code)
        assert text.startswith("error: ") and message in text and "\n" not in text, (name, text)
        assert "step" not in capsys.readouterr().out  # stopped before training
    # end to end: the process prints exactly that one line, no traceback
    argv = train_argv(store, tmp_path, "codebook", "--vocab-size", "32", max_steps=1)
    proc = subprocess.run([sys.executable, "train_c2i.py", *argv], cwd=REPO, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.splitlines() == [f"error: code store {store} has codebook size 16, but the model expects 32"]
