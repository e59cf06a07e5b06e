"""A run is what its record says: one trainer per run folder (a lock a killed trainer does not
leave behind), resuming only with the run's own settings (or an explicit, recorded change), the
entropies a run started with and no others, finite entropies, a named tau, and one-line stops
for a full disk during a checkpoint save."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from autoregressive.train import main
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    GRID, REPO, assert_same_weights, final_state, make_store, one_thread, read_log, subprocess_env, train_argv)
from utils import checkpoint as ckpt
from utils.checkpoint import list_checkpoints, load_checkpoint
from utils.identity import FileWatch, code_store_hash, file_sha256, record_file


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("codes") / "toy")


def error_line(stop: pytest.ExceptionInfo) -> str:
    text = str(stop.value.code)
    assert text.startswith("error: ") and "\n" not in text, text
    return text


def write_entropies(path, values: np.ndarray) -> dict:
    """entropy.npy + entropy.json as the scorer records them (with entropy.npy's hash and stat)."""
    np.save(path / "entropy.npy", values)
    record = {"entropy_model_hash": "e" * 64, "code_store_hash": code_store_hash(path), "count": len(values),
              "entropy_file": record_file(path / "entropy.npy"), "complete": True}
    (path / "entropy.json").write_text(json.dumps(record))
    return record


def random_entropies(seed: int, count: int = 32) -> np.ndarray:
    return np.random.default_rng(seed).uniform(0.0, 4.0, size=(count, 2, GRID * GRID)).astype(np.float16)


DPAR = dict(gpt_model="DPAR-T", threshold=2.0, max_patch_length=4)


# ---------------------------------------------------------------------------------------
# One trainer per run folder
# ---------------------------------------------------------------------------------------
def test_second_trainer_is_refused_and_a_killed_holder_leaves_no_lock(store, tmp_path):
    """A trainer paused after its step-4 checkpoint holds the folder: a second one on the same
    folder stops with one line naming the folder and the holder's pid; once the holder is
    SIGKILLed, the same command resumes from step 4."""
    argv = [str(a) for a in train_argv(store, tmp_path, "shared", max_steps=8)]
    marker = tmp_path / "paused"
    holder = subprocess.Popen([sys.executable, "tests/train_faults.py", *argv], cwd=REPO,
                              env=subprocess_env(FAULT="pause", FAULT_AT_STEP="4", FAULT_MARKER=str(marker)),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert holder.poll() is None, holder.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the holder never reached step 4"
            time.sleep(0.2)
        second = subprocess.run([sys.executable, "train_c2i.py", *argv], cwd=REPO, env=subprocess_env(),
                                capture_output=True, text=True, timeout=240)
        assert second.returncode == 1 and second.stdout == ""
        assert second.stderr.splitlines() == [
            f"error: run folder {tmp_path / 'shared'} is in use by another trainer (pid {holder.pid} on "
            f"{os.uname().nodename}); wait for it to end, or choose another --run-name"]
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=60)
    assert [s for s, _ in list_checkpoints(tmp_path / "shared" / "checkpoints")] == [4]
    main(argv)
    assert [r["step"] for r in read_log(tmp_path / "shared")] == list(range(1, 9))
    assert final_state(tmp_path / "shared")["step"] == 8


# ---------------------------------------------------------------------------------------
# A run's identity is its settings
# ---------------------------------------------------------------------------------------
def test_other_settings_are_refused_unless_continued_explicitly(store, tmp_path, capsys):
    main(train_argv(store, tmp_path, "run", max_steps=4))
    run = tmp_path / "run"
    recorded = (run / "args.json").read_bytes()
    for flags, change in ((dict(lr=1e-3), "lr 0.003 -> 0.001"), (dict(seed=1), "seed 0 -> 1"),
                          (dict(global_batch_size=16), "global_batch_size 8 -> 16")):
        with pytest.raises(SystemExit) as stop:
            main(train_argv(store, tmp_path, "run", max_steps=8, **flags))
        text = error_line(stop)
        assert f"belongs to a run with other settings ({change})" in text and "--continue-with-new-settings" in text
    assert (run / "args.json").read_bytes() == recorded  # never rewritten with settings that did not train
    assert [s for s, _ in list_checkpoints(run / "checkpoints")] == [4]
    capsys.readouterr()
    main(train_argv(store, tmp_path, "run", max_steps=4, num_workers=1))  # not identity: same run
    assert "already at step 4 of 4; nothing to train" in capsys.readouterr().out
    assert (run / "args.json").read_bytes() == recorded
    # an explicit change is recorded with the step it applies from, and carried on
    main(train_argv(store, tmp_path, "run", "--continue-with-new-settings", max_steps=6, lr=1e-3))
    assert "note: continuing with new settings from step 5 (--continue-with-new-settings): lr 0.003 -> 0.001" in \
        (run / "log.txt").read_text()
    history = [{"from_step": 5, "changes": {"lr": [3e-3, 1e-3]}}]
    assert json.loads((run / "args.json").read_text())["setting_changes"] == history
    main(train_argv(store, tmp_path, "run", max_steps=8, lr=1e-3))  # the run's settings now
    state = final_state(run)
    assert state["step"] == 8 and state["args"]["setting_changes"] == history and state["args"]["lr"] == 1e-3
    assert [r["step"] for r in read_log(run)] == list(range(1, 9))
    # a change that would not train is not recorded
    recorded = (run / "args.json").read_bytes()
    main(train_argv(store, tmp_path, "run", "--continue-with-new-settings", max_steps=8, lr=2e-3))
    assert (run / "args.json").read_bytes() == recorded and "0.001 -> 0.002" not in (run / "log.txt").read_text()


def test_default_run_folder_refuses_a_new_experiment(store, tmp_path):
    """Without --run-name a new --seed names the same folder: refused, not resumed."""
    argv = train_argv(store, tmp_path, "unused", max_steps=4)
    i = argv.index("--run-name")
    del argv[i:i + 2]
    main(argv)
    folder = tmp_path / f"GPT-T-{store.name}"
    assert [s for s, _ in list_checkpoints(folder / "checkpoints")] == [4]
    with pytest.raises(SystemExit) as stop:
        main([*argv, "--seed", "1", "--max-steps", "8"])
    text = error_line(stop)
    assert str(folder) in text and "seed 0 -> 1" in text and "another --run-name" in text
    assert [s for s, _ in list_checkpoints(folder / "checkpoints")] == [4]


def test_patching_rule_is_part_of_the_run(tmp_path):
    codes = make_store(tmp_path / "codes")
    write_entropies(codes, random_entropies(1))
    main(train_argv(codes, tmp_path, "dpar", max_steps=2, **DPAR))
    for flags, change in ((dict(threshold=3.0), "patching.threshold 2.0 -> 3.0"),
                          (dict(max_patch_length=2), "patching.max_patch_length 4 -> 2")):
        with pytest.raises(SystemExit) as stop:
            main(train_argv(codes, tmp_path, "dpar", max_steps=4, **{**DPAR, **flags}))
        assert change in error_line(stop)
    with pytest.raises(SystemExit) as stop:
        main(train_argv(codes, tmp_path, "dpar", "--no-row-reset", max_steps=4, **DPAR))
    assert "patching.row_reset True -> False" in error_line(stop)


# ---------------------------------------------------------------------------------------
# Entropies: the ones a run started with, finite, with a named tau
# ---------------------------------------------------------------------------------------
def test_entropies_switched_under_a_run_stop_it(tmp_path, monkeypatch):
    """The scorer's atomic switch (a new file renamed over entropy.npy) after step 3: the run,
    which still reads its own mapping, saves step 3 (equal to a run that never saw the switch)
    and stops naming the file; resuming on the new entropies needs the explicit flag."""
    from autoregressive.train import loop

    codes = make_store(tmp_path / "codes")
    npy = codes / "entropy.npy"
    write_entropies(codes, random_entropies(1))
    main(train_argv(codes, tmp_path, "reference", max_steps=4, ckpt_every=2, **DPAR))
    first = file_sha256(npy)
    step = loop.train_step

    def switching(t, batches):
        if t.step == 3:  # the switch happens while step 4 trains
            new = codes / ".entropy.npy.new"
            with open(new, "wb") as f:
                np.save(f, random_entropies(2))
            os.replace(new, npy)
        return step(t, batches)

    monkeypatch.setattr(loop, "train_step", switching)
    with pytest.raises(SystemExit) as stop:
        main(train_argv(codes, tmp_path, "switched", max_steps=8, ckpt_every=2, log_every=2, **DPAR))
    monkeypatch.undo()
    text = error_line(stop)
    second = file_sha256(npy)
    assert second != first  # precondition: other bytes
    assert text.startswith(f"error: {npy} was replaced by another file (sha256 {second[:12]}, this run's "
                           f"{first[:12]}): a run trains only on the inputs it started with; it saved step 4")
    assert [s for s, _ in list_checkpoints(tmp_path / "switched" / "checkpoints")] == [2, 4]
    assert_same_weights(final_state(tmp_path / "reference")["model"], final_state(tmp_path / "switched")["model"])
    # the scorer records the new file: a resume is refused, naming it, unless asked for
    record = json.loads((codes / "entropy.json").read_text())
    (codes / "entropy.json").write_text(json.dumps({**record, "entropy_file": record_file(npy)}))
    with pytest.raises(SystemExit) as stop:
        main(train_argv(codes, tmp_path, "switched", max_steps=8, ckpt_every=2, **DPAR))
    assert f"(entropies {npy}: entropy_sha256 {first[:12]} -> {second[:12]})" in error_line(stop)
    main(train_argv(codes, tmp_path, "switched", "--continue-with-new-settings", max_steps=6, ckpt_every=2, **DPAR))
    args = final_state(tmp_path / "switched")["args"]
    assert args["setting_changes"] == [{"from_step": 5, "changes": {"entropy_sha256": [first, second]}}]


def test_codes_rewritten_in_place_stop_the_run_without_saving(tmp_path, monkeypatch):
    """codes.npy rewritten in place after step 3 (the run's mapping then reads the new codes):
    the run stops at its next log line without saving, naming the file and the checkpoint it
    resumes from."""
    from autoregressive.train import loop

    codes = make_store(tmp_path / "codes")
    npy = codes / "codes.npy"
    step = loop.train_step

    def rewriting(t, batches):
        if t.step == 3:
            with open(npy, "r+b") as f:
                f.seek(-2, os.SEEK_END)
                f.write(np.uint16(15 - int(np.load(npy, mmap_mode="r")[-1, -1, -1])).tobytes())
        return step(t, batches)

    monkeypatch.setattr(loop, "train_step", rewriting)
    with pytest.raises(SystemExit) as stop:
        main(train_argv(codes, tmp_path, "rewritten", max_steps=8, ckpt_every=2, log_every=1))
    folder = tmp_path / "rewritten" / "checkpoints"
    assert error_line(stop).startswith(f"error: {npy} was rewritten in place (sha256 ")
    assert error_line(stop).endswith(f"a run trains only on the inputs it started with; it stopped without saving; "
                                     f"it resumes from {folder / '0000002.pt'} (rerun with "
                                     f"--continue-with-new-settings to continue on the new ones)")
    assert [s for s, _ in list_checkpoints(folder)] == [2]


def test_file_watch_tells_a_switch_from_an_in_place_rewrite(tmp_path):
    path = tmp_path / "entropy.npy"
    values = random_entropies(3)
    np.save(path, values)
    watch = FileWatch(path, file_sha256(path))
    assert watch.check() is None
    np.save(tmp_path / "same.npy", values)  # the same bytes under a new inode pass
    os.replace(tmp_path / "same.npy", path)
    assert watch.check() is None and watch.check() is None
    with open(path, "r+b") as f:  # one value changed in place
        f.seek(-2, os.SEEK_END)
        f.write(np.float16(9.5).tobytes())
    change = watch.check()
    assert change is not None and not change.replaced and "rewritten in place" in change.message
    watch = FileWatch(path, file_sha256(path))
    np.save(tmp_path / "other.npy", random_entropies(4))
    os.replace(tmp_path / "other.npy", path)
    change = watch.check()
    assert change is not None and change.replaced and "replaced by another file" in change.message
    path.unlink()
    assert watch.check() == (f"{path} was removed", True)


def test_nonfinite_entropies_are_refused_at_start(tmp_path):
    codes = make_store(tmp_path / "codes")
    values = random_entropies(5)
    values[3, 1, 7], values[10, 0, 0], values[31, 1, 15] = np.nan, np.inf, -np.inf
    write_entropies(codes, values)
    with pytest.raises(SystemExit) as stop:
        main(train_argv(codes, tmp_path, "nan", max_steps=1, **DPAR))
    assert error_line(stop) == (f"error: {codes / 'entropy.npy'} holds 3 NaN or infinite entropies (the first at image "
                                f"3, view 1, token 7); rescore the code store with python -m entropy_tools.score")
    assert not (tmp_path / "nan").exists()


def test_gated_patching_needs_a_named_threshold(tmp_path):
    """The paper's tau belongs to the authors' unreleased entropy model: no silent default."""
    codes = make_store(tmp_path / "codes")
    manifest = json.loads((codes / "manifest.json").read_text())
    (codes / "manifest.json").write_text(json.dumps({**manifest, "image_size": 256}))  # a size the paper publishes
    write_entropies(codes, random_entropies(6))
    for mode in ("entropy", "relative"):
        with pytest.raises(SystemExit) as stop:
            main(train_argv(codes, tmp_path, "tau", "--patching-mode", mode, gpt_model="DPAR-T", max_steps=1))
        assert error_line(stop) == (
            f"error: --patching-mode {mode} needs --threshold or --target-compression: the paper's tau 7.8 at 256 px "
            f"belongs to the authors' entropy model (not released), not to the one that scored "
            f"{codes / 'entropy.npy'} (the paper's compression at 256 px is 1.81)")
    main(train_argv(codes, tmp_path, "calibrated", "--target-compression", "1.5", gpt_model="DPAR-T", max_steps=1))
    assert abs(final_state(tmp_path / "calibrated")["args"]["achieved_compression"] - 1.5) < 0.2


# ---------------------------------------------------------------------------------------
# Checkpoint saves: a full disk, a vanished file
# ---------------------------------------------------------------------------------------
def full_disk_save(real_save, fail_from: int):
    """torch.save that writes part of a file, then fails as a full disk does (the file object's
    write raises ENOSPC), from the fail_from-th call on."""
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < fail_from:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"PK\x03\x04" + bytes(1000))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    return save


def test_full_disk_during_a_save_says_so_and_the_run_resumes(store, tmp_path, monkeypatch):
    main(train_argv(store, tmp_path, "reference", max_steps=8))
    monkeypatch.setattr(torch, "save", full_disk_save(torch.save, fail_from=2))
    with pytest.raises(SystemExit) as stop:
        main(train_argv(store, tmp_path, "full", max_steps=8))
    monkeypatch.undo()
    folder = tmp_path / "full" / "checkpoints"
    assert error_line(stop) == (f"error: no space left on device while saving {folder / '0000008.pt'}: free space "
                                f"and rerun; the run resumes from {folder / '0000004.pt'}")
    assert sorted(p.name for p in folder.iterdir()) == ["0000004.pt"]  # the partial file is gone
    main(train_argv(store, tmp_path, "full", max_steps=8))
    assert_same_weights(final_state(tmp_path / "reference")["model"], final_state(tmp_path / "full")["model"])


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_full_disk_during_a_distributed_checkpoint_save(tmp_path, monkeypatch):
    """The FSDP format (torch.distributed.checkpoint; here in one process): a shard write that
    runs out of space raises NoSpaceError naming the checkpoint and the last good one, and the
    partial directory is removed."""
    import torch.distributed.checkpoint.filesystem as dcp_files

    from autoregressive.models.gpt import GPT_models
    from utils.distributed import DistInfo

    model = GPT_models["GPT-T"](vocab_size=16, block_size=16, num_classes=4)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randint(0, 16, (2, 15)), torch.randint(0, 4, (2,)), targets=torch.randint(0, 16, (2, 16)))[1].backward()
    optimizer.step()
    info, folder = DistInfo(0, 1, 0, torch.device("cpu")), tmp_path / "checkpoints"
    state = {"step": 4, "epoch": 0, "data_position": {"epoch": 0, "samples": 32}, "args": {}}
    good = ckpt.save_training_checkpoint(folder, model, optimizer, state, info, True, torch.Generator())
    assert ckpt.is_dcp_checkpoint(good)  # precondition: the distributed format

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(dcp_files, "_write_item", no_space)
    with pytest.raises(ckpt.NoSpaceError) as refused:
        ckpt.save_training_checkpoint(folder, model, optimizer, {**state, "step": 8}, info, True, torch.Generator())
    assert str(refused.value) == (f"no space left on device while saving {folder / '0000008'}: free space and rerun; "
                                  f"the run resumes from {good}")
    assert sorted(p.name for p in folder.iterdir()) == ["0000004"]


def test_pruning_tolerates_a_checkpoint_that_vanished(tmp_path, monkeypatch):
    """Another process (or a person) removes an old checkpoint between listing and deletion."""
    for step in (1, 2, 3, 4):
        (tmp_path / f"{step:07d}.pt").write_bytes(b"x")
    newest = ckpt.newest_readable

    def racing(folder):
        (tmp_path / "0000001.pt").unlink()
        return newest(folder)

    monkeypatch.setattr(ckpt, "newest_readable", racing)
    ckpt.prune_checkpoints(tmp_path, keep_last=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 4]
