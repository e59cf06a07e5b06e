"""The paper's patching settings by image size: tau and P_max defaults at 256 / 384 / 512 px, a
one-line refusal at other sizes, explicit flags first, and the 512 px rule from the trainer's
checkpoint to sampling."""
import json
from pathlib import Path

import numpy as np
import pytest

from autoregressive.sample.loading import PatchingOverrides, load_generator, sampling_patching
from autoregressive.train import main
from autoregressive.train.args import parse_args
from autoregressive.train.data import training_patching
from dataset.code_store import CodeStoreWriter
from entropy_model.patching import PAPER_SETTINGS, PatchingConfig, paper_patching, paper_setting
from utils.checkpoint import latest_checkpoint
from utils.identity import code_store_hash, record_file

DPAR = ["--code-path", "x", "--gpt-model", "DPAR-T"]
AUTHORS = {256: (7.8, 4), 384: (7.9, 4), 512: (8.1, 6)}  # the authors' configs: tau, P_max


def one_line(e: BaseException) -> str:
    text = str(e)
    assert text and "\n" not in text, text
    return text


def test_defaults_by_image_size():
    assert {size: (s.threshold, s.max_patch_length) for size, s in PAPER_SETTINGS.items()} == AUTHORS
    for size, (tau, cap) in AUTHORS.items():
        config, achieved = training_patching(parse_args(DPAR), size, None, size // 16)
        assert config == PatchingConfig("entropy", tau, cap, row_reset=True) and achieved is None
        assert paper_patching(size) == config
    assert PatchingConfig() == paper_patching(256)  # the dataclass defaults are 256 px's


@pytest.mark.parametrize("size", [128, 192, 1024])
def test_unpublished_size_refuses_in_one_line(size):
    for flags in ([], ["--threshold", "3.0"], ["--target-compression", "1.81"], ["--patching-mode", "static"]):
        with pytest.raises(ValueError) as info:
            training_patching(parse_args(DPAR + flags), size, None, size // 16)
        text = one_line(info.value)
        assert f"{size} px" in text and "--target-compression" in text and "--max-patch-length" in text
    with pytest.raises(ValueError) as info:
        paper_setting(size)
    assert f"{size} px" in one_line(info.value)


def test_explicit_flags_win():
    rng = np.random.default_rng(7)
    entropies = rng.uniform(0.0, 4.0, size=(40, 1, 64)).astype(np.float16)  # (N, views, T), fresh draws
    explicit = training_patching(parse_args(DPAR + ["--threshold", "2.5", "--max-patch-length", "2"]), 512, None, 32)
    assert explicit[0] == PatchingConfig("entropy", 2.5, 2, True)
    uncapped = training_patching(parse_args(DPAR + ["--max-patch-length", "0"]), 512, None, 32)[0]
    assert uncapped.max_patch_length is None and uncapped.threshold == 8.1  # the cap flag alone keeps 512's tau
    assert training_patching(parse_args(DPAR + ["--threshold", "3", "--max-patch-length", "5"]), 128, None, 8)[0] == \
        PatchingConfig("entropy", 3.0, 5, True)
    calibrated, achieved = training_patching(
        parse_args(DPAR + ["--target-compression", "1.5", "--max-patch-length", "3"]), 128, entropies, 8)
    assert calibrated.max_patch_length == 3 and abs(achieved - 1.5) < 0.1 and calibrated.threshold != 7.8
    # rules whose lengths need no cap train at any size without one
    token = training_patching(parse_args(DPAR + ["--patching-mode", "token"]), 128, None, 8)[0]
    static = training_patching(parse_args(DPAR + ["--patching-mode", "static", "--static-length", "1.8"]), 128, None, 8)
    assert token.max_patch_length is None and static[0].max_patch_length is None
    for bad in (["--max-patch-length", "-1"], ["--gpt-model", "GPT-T", "--max-patch-length", "4"]):
        with pytest.raises(SystemExit):
            parse_args(["--code-path", "x", "--gpt-model", "DPAR-T", *bad])


def make_store(path: Path, image_size: int, grid: int, count: int = 8, seed: int = 0) -> Path:
    """Random codes (N, 1, grid * grid) over 16 codes with entropies below every published tau."""
    rng = np.random.default_rng(seed)
    tokens = grid * grid
    writer = CodeStoreWriter.create(path, count, 1, tokens)
    writer.write(np.arange(count), rng.integers(0, 16, size=(count, 1, tokens)), rng.integers(0, 2, count))
    writer.finalize({"image_size": image_size, "grid_height": grid, "grid_width": grid, "codebook_size": 16,
                     "num_views": 1, "tokenizer_hash": "test", "num_classes": 2})
    np.save(path / "entropy.npy", rng.uniform(0.0, 2.5, size=(count, 1, tokens)).astype(np.float16))
    record = {"entropy_model_hash": "e" * 64, "code_store_hash": code_store_hash(path), "count": count,
              "entropy_file": record_file(path / "entropy.npy")}
    (path / "entropy.json").write_text(json.dumps(record))
    return path


def train_argv(store: Path, results: Path, run: str, *extra: str) -> list:
    return ["--code-path", str(store), "--results-dir", str(results), "--run-name", run, "--gpt-model", "DPAR-T",
            "--global-batch-size", "8", "--num-workers", "0", "--max-steps", "1", "--log-every", "1",
            "--ckpt-every", "1", "--device", "cpu", *extra]


def test_512_checkpoint_records_and_sampling_reads_the_cap(tmp_path):
    """At 512 px (a 32 x 32 grid) the trainer uses P_max 6 unasked (tau must be named: the paper's
    8.1 here), records them, and sampling rebuilds exactly that rule; the entropies (< 2.5) open no
    gate below 8.1, so every row is 6 + 6 + 6 + 6 + 6 + 2 tokens: mean patch length 32 / 6."""
    store = make_store(tmp_path / "codes512", 512, 32)
    main(train_argv(store, tmp_path, "dpar512", "--threshold", "8.1"))
    log = [json.loads(line) for line in (tmp_path / "dpar512" / "log.jsonl").read_text().splitlines()]
    assert log and all(abs(r["mean_patch_length"] - 32 / 6) < 1e-9 for r in log)
    ckpt_path = latest_checkpoint(tmp_path / "dpar512" / "checkpoints")
    model, args = load_generator(str(ckpt_path), None, 16, None, 2)  # what sample_c2i.py loads
    assert args["patching"] == {"mode": "entropy", "threshold": 8.1, "max_patch_length": 6, "row_reset": True}
    assert (args["threshold"], args["max_patch_length"], args["image_size"]) == (8.1, 6, 512)
    assert json.loads((tmp_path / "dpar512" / "args.json").read_text())["max_patch_length"] == 6
    assert sampling_patching(args, PatchingOverrides()) == PatchingConfig("entropy", 8.1, 6, True)
    assert sampling_patching(args, PatchingOverrides(max_patch_length=3)).max_patch_length == 3  # the flag wins
    assert model.config.block_size == 32 * 32
    # a checkpoint without a rule takes its size's published one, and refuses at other sizes
    bare = {k: v for k, v in args.items() if k != "patching"}
    assert sampling_patching(bare, PatchingOverrides()) == PatchingConfig("entropy", 8.1, 6, True)
    with pytest.raises(ValueError) as info:
        sampling_patching({**bare, "image_size": 128}, PatchingOverrides())
    assert "--threshold and --max-patch-length" in one_line(info.value)


def test_trainer_refuses_an_unpublished_size_in_one_line(tmp_path, capsys):
    store = make_store(tmp_path / "codes128", 128, 8)
    for extra in ([], ["--threshold", "3.0"]):
        with pytest.raises(SystemExit) as info:
            main(train_argv(store, tmp_path, "dpar128", *extra))
        text = one_line(info.value)
        assert text.startswith("error: the paper publishes no patching setting for 128 px images")
    main(train_argv(store, tmp_path, "dpar128", "--target-compression", "1.5", "--max-patch-length", "3"))
    args = json.loads((tmp_path / "dpar128" / "args.json").read_text())
    assert args["max_patch_length"] == 3 and abs(args["achieved_compression"] - 1.5) < 0.1
