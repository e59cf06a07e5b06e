"""Run folders and checkpoint readers: a damaged newest checkpoint is skipped (and kept), the
rotation keeps a readable checkpoint, a failed --resume leaves nothing behind; the token grid
comes from the store's manifest; every reader takes a file or an FSDP directory and says in
one line what is wrong with a bad one."""
import dataclasses
import json
import os
import warnings

import numpy as np
import pytest
import torch

from autoregressive.train import main
from entropy_tools.score import load_entropy_model
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    assert_same_weights, final_state, make_store, one_thread, read_log, train_argv)
from utils.checkpoint import checkpoint_problem, latest_checkpoint, list_checkpoints, load_checkpoint, prune_checkpoints
from utils.identity import checkpoint_sha256, file_sha256


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("codes") / "toy")


def test_truncated_newest_checkpoint_falls_back_and_resumes_exactly(store, tmp_path, capsys):
    """Dropout and label dropout on: the fallback restores step 4's RNG states and data position."""
    main(train_argv(store, tmp_path, "full", max_steps=12))
    main(train_argv(store, tmp_path, "cut", max_steps=8))
    newest = tmp_path / "cut" / "checkpoints" / "0000008.pt"
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    main(train_argv(store, tmp_path, "cut", max_steps=12))
    out = capsys.readouterr().out
    notes = [line for line in out.splitlines() if "0000008.pt" in line and line.startswith("note:")]
    assert len(notes) == 1 and "kept as 0000008.pt.unreadable, resuming from 0000004.pt" in notes[0], out
    assert "resumed from" in out and "at step 4" in out
    kept = tmp_path / "cut" / "checkpoints" / "0000008.pt.unreadable"
    assert kept.read_bytes() == data[: len(data) // 2]
    assert [r["step"] for r in read_log(tmp_path / "cut")] == list(range(1, 13))
    full, cut = final_state(tmp_path / "full"), final_state(tmp_path / "cut")
    assert cut["step"] == 12 and cut["data_position"] == full["data_position"]
    assert_same_weights(full["model"], cut["model"])
    # with no readable checkpoint at all the run stops instead of starting over
    for _, path in list_checkpoints(tmp_path / "cut" / "checkpoints"):
        path.write_bytes(b"")
    with pytest.raises(SystemExit, match="has no readable checkpoint to resume from"):
        main(train_argv(store, tmp_path, "cut", max_steps=16))


def test_rotation_keeps_the_newest_readable_checkpoint(store, tmp_path):
    main(train_argv(store, tmp_path, "run", max_steps=4))
    good = latest_checkpoint(tmp_path / "run" / "checkpoints")
    folder = tmp_path / "ckpts"
    folder.mkdir()
    (folder / "0000100.pt").write_bytes(good.read_bytes())
    for step in (200, 300):
        (folder / f"{step:07d}.pt").write_bytes(b"PK\x03\x04 damaged")
    assert [checkpoint_problem(p) is None for _, p in list_checkpoints(folder)] == [True, False, False]
    prune_checkpoints(folder, keep_last=1)
    assert [s for s, _ in list_checkpoints(folder)] == [100, 300]


def test_failed_resume_leaves_no_run_folder(store, tmp_path):
    with pytest.raises(SystemExit, match="no such checkpoint"):
        main(train_argv(store, tmp_path, "never", "--resume", str(tmp_path / "missing.pt"), max_steps=1))
    (tmp_path / "text.pt").write_text("hello\n")
    with pytest.raises(SystemExit, match="not a torch.save file"):
        main(train_argv(store, tmp_path, "never", "--resume", str(tmp_path / "text.pt"), max_steps=1))
    assert not (tmp_path / "never").exists()


def test_grid_comes_from_the_manifest(tmp_path):
    """A store of 16 px images as 4x4 tokens: downsample 4, not the flag's LlamaGen default 16."""
    store = make_store(tmp_path / "ds4")
    manifest = json.loads((store / "manifest.json").read_text())
    (store / "manifest.json").write_text(json.dumps({**manifest, "image_size": 16}))
    main(train_argv(store, tmp_path, "ds4", max_steps=1))
    args = json.loads((tmp_path / "ds4" / "args.json").read_text())
    assert (args["image_size"], args["downsample_size"]) == (16, 4)
    assert args["num_workers"] == 0
    for flag, value in (("--downsample-size", "16"), ("--image-size", "64")):
        with pytest.raises(SystemExit) as stop:
            main(train_argv(store, tmp_path, "bad", flag, value, max_steps=1))
        text = str(stop.value.code)
        assert text.startswith(f"error: {flag} {value} contradicts the code store") and "downsample 4" in text, text


def test_default_workers_follow_the_available_cores(store, tmp_path):
    argv = [a for a in train_argv(store, tmp_path, "workers", max_steps=1)]
    i = argv.index("--num-workers")
    del argv[i:i + 2]
    main(argv)
    args = json.loads((tmp_path / "workers" / "args.json").read_text())
    assert args["num_workers"] == min(4, len(os.sched_getaffinity(0)))


def test_checkpoint_errors_say_what_is_wrong(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("step 100 looked fine\n")
    with pytest.raises(ValueError, match=r"not a torch.save file \(a text file\?\)$"):
        load_checkpoint(text)

    class Code:
        def __reduce__(self):
            return (os.getcwd, ())

    code = tmp_path / "code.pt"
    torch.save({"model": {}, "hook": Code()}, code)
    with pytest.raises(ValueError) as refused:
        load_checkpoint(code)
    message = str(refused.value)
    assert message == f"{code} holds code (pickled Python objects) and will not be loaded"
    assert "weights_only" not in message


def test_readers_take_an_fsdp_directory(tmp_path):
    """The entropy model as a torch.distributed.checkpoint directory (written without a process
    group) loads like its single file; its hash covers every file of the directory."""
    import torch.distributed.checkpoint as dcp
    from test_entropy_scoring import entropy_model

    model = entropy_model()
    single = tmp_path / "entropy.pt"
    args = {"gpt_model": "GPT-T", "model_config": dataclasses.asdict(model.config)}
    torch.save({"model": model.state_dict(), "args": args, "step": 3}, single)
    folder = tmp_path / "entropy"
    with warnings.catch_warnings():  # no process group, on purpose
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": model.state_dict()}, checkpoint_id=str(folder))
    torch.save({"args": args, "step": 3}, folder / "train_state.pt")
    from_dir, _ = load_entropy_model(folder)
    from_file, _ = load_entropy_model(single)
    assert_same_weights(from_dir.state_dict(), from_file.state_dict())
    digest = checkpoint_sha256(folder)
    assert len(digest) == 64 and checkpoint_sha256(single) == file_sha256(single)
    (folder / "train_state.pt").write_bytes((folder / "train_state.pt").read_bytes() + b"\0")
    assert checkpoint_sha256(folder) != digest


def test_heatmap_titles_wrap_inside_the_figure():
    """A long caption is wrapped at spaces, never clipped; the panel name keeps its own line."""
    from PIL import Image, ImageDraw

    from entropy_tools.heatmaps import _font, _text_size, entropy_heatmap_figure, fit_lines, panel_title

    starts = torch.zeros(64, dtype=torch.bool)
    starts[::3] = True
    title = panel_title("DPAR sample: 04_stripes", starts)
    assert title.splitlines() == ["DPAR sample: 04_stripes", "22 patches, 2.91 tokens/patch"]
    draw, font = ImageDraw.Draw(Image.new("RGB", (1, 1))), _font()
    for width in (64, 120, 400):
        lines = fit_lines(draw, title, font, width)
        assert " ".join(lines).replace("  ", " ") == title.replace("\n", " ")
        assert all(_text_size(draw, line, font)[0] <= width for line in lines if " " in line)
    assert len(fit_lines(draw, title, font, 64)) > 2 and fit_lines(draw, title, font, 400) == title.splitlines()
    image = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    short = entropy_heatmap_figure(image, np.random.default_rng(1).random(64), starts, 8, title="x")
    long = entropy_heatmap_figure(image, np.random.default_rng(1).random(64), starts, 8, title=title)
    assert long.width == short.width and long.height > short.height  # more lines, same width
