"""train_c2i.py under torchrun on CPU (gloo, 2 processes): DDP and FSDP2 reproduce the
single-process run on the same global batch; a rank that dies is restarted by
torchrun --max-restarts and the run resumes to the same weights; an FSDP checkpoint
directory resumes a single-process run."""
import subprocess
import sys

import numpy as np
import pytest

from autoregressive.train import main
from autoregressive.train.checkpointing import latest_checkpoint
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    NO_DROPOUT, REPO, assert_same_weights, final_state, free_port, make_store, one_thread, read_log, subprocess_env,
    train_argv)

STEPS = 8  # two epochs of 4 steps; checkpoints at 4 and 8


def torchrun(argv: list, *launcher: str, timeout: int = 240, **env) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           *launcher, "train_c2i.py", *argv]
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


class Runs:
    """The tiny store, a results folder, and the runs several tests compare with (fp32,
    dropouts off), each made once per module on first use."""

    def __init__(self, root):
        self.store = make_store(root / "toy")
        self.results = root / "results"

    def get(self, name: str):
        run_dir = self.results / name
        if latest_checkpoint(run_dir / "checkpoints") is None:
            argv = train_argv(self.store, self.results, name, *NO_DROPOUT, max_steps=STEPS)
            if name == "single":
                main(argv)
            else:
                torchrun([*argv, "--data-parallel", name])
        return run_dir


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Runs:
    return Runs(tmp_path_factory.mktemp("dist"))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_match_one(runs, mode):
    single, multi = runs.get("single"), runs.get(mode)
    assert [r["step"] for r in read_log(multi)] == list(range(1, STEPS + 1))
    losses = [[r["loss"] for r in read_log(d)] for d in (single, multi)]
    assert np.allclose(*losses, atol=1e-5, rtol=0), losses
    # Adam and clipping hide a constant gradient scale from the weights; the logged
    # (pre-clipping) gradient norm shows it
    norms = [[r["grad_norm"] for r in read_log(d)] for d in (single, multi)]
    assert np.allclose(*norms, rtol=1e-4, atol=0), norms
    assert_same_weights(final_state(single)["model"], final_state(multi)["model"], atol=1e-5)
    ckpt = final_state(multi)
    assert len(ckpt["rng"]) == 2 and ckpt["args"]["world_size"] == 2 and ckpt["args"]["per_rank_batch_size"] == 4
    if mode == "fsdp":  # a distributed checkpoint directory, optimizer shards included
        assert (multi / "checkpoints" / f"{STEPS:07d}" / ".metadata").is_file()
        assert ckpt["optimizer"]["state"]["output.weight"]["exp_avg"].shape == (16, 64)


def test_fsdp_checkpoint_resumes_a_single_process_run(runs):
    """Model and optimizer shards of the step-4 FSDP checkpoint continue on one process."""
    fsdp_ckpt = runs.get("fsdp") / "checkpoints" / f"{4:07d}"
    main(train_argv(runs.store, runs.results, "from-fsdp", *NO_DROPOUT, "--resume", str(fsdp_ckpt),
                    max_steps=STEPS))
    assert [r["step"] for r in read_log(runs.results / "from-fsdp")] == list(range(5, STEPS + 1))
    assert_same_weights(final_state(runs.get("single"))["model"], final_state(runs.results / "from-fsdp")["model"],
                        atol=1e-5)


def test_killed_rank_is_restarted_and_finishes(runs, tmp_path):
    """Rank 1 dies after step 5; torchrun restarts both ranks, which resume from the step-4
    checkpoint and reach step 8 with exactly the weights of the uninterrupted DDP run."""
    marker = tmp_path / "rank1-died"
    argv = train_argv(runs.store, runs.results, "killed", *NO_DROPOUT, max_steps=STEPS)
    proc = torchrun(argv, "--max-restarts", "1",
                    DPAR_TEST_EXIT_AT_STEP="5", DPAR_TEST_EXIT_RANK="1", DPAR_TEST_EXIT_MARKER=str(marker))
    assert marker.exists()
    assert f"resumed from {runs.results / 'killed' / 'checkpoints' / '0000004.pt'} at step 4" in proc.stdout
    ckpt = final_state(runs.results / "killed")
    assert ckpt["step"] == STEPS and ckpt["data_position"] == {"epoch": 1, "samples": 32}
    assert [r["step"] for r in read_log(runs.results / "killed")] == list(range(1, STEPS + 1))
    assert_same_weights(final_state(runs.get("ddp"))["model"], ckpt["model"])
