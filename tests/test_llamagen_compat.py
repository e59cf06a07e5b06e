"""Coming from LlamaGen: its launch lines parse, --ema keeps an exact, resumable (also FSDP,
2 ranks) average of the weights that sampling prefers, --gpt-ckpt continues a checkpoint in
LlamaGen's layout and --init-weights starts a new run from weights only."""
import argparse
import dataclasses
import os
import shlex
import subprocess

import numpy as np
import pytest
import torch

import extract_codes
from autoregressive.models.gpt import GPT_models
from autoregressive.sample import main as sample_main
from autoregressive.sample import parse_args as sample_parse_args
from autoregressive.sample.loading import load_generator
from autoregressive.train import build_parser, main
from autoregressive.train.args import parse_args as train_parse_args
from autoregressive.train.checkpointing import latest_checkpoint, list_checkpoints
from autoregressive.train.ema import ModelEMA
from autoregressive.train.model import create_optimizer
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict
from test_train import (  # noqa: F401 (one_thread is an autouse fixture)
    NO_DROPOUT, REPO, assert_same_weights, final_state, make_store, one_thread, read_log, train_argv)
from test_sample import ckpts  # noqa: F401 (fixture)
from test_train_distributed import torchrun
from utils.checkpoint import load_checkpoint, model_from_checkpoint
from utils.distributed import DistInfo

# The argument lines of LlamaGen's GETTING_STARTED.md, run by scripts/autoregressive/*.sh ("$@")
LLAMAGEN_TRAIN = [
    "--cloud-save-path /path/to/cloud_disk --code-path /path/to/imagenet_code_c2i_flip_ten_crop --image-size 384 "
    "--gpt-model GPT-B",
    "--cloud-save-path /path/to/cloud_disk --code-path /path/to/imagenet_code_c2i_flip_ten_crop --image-size 384 "
    "--gpt-model GPT-XL",
    "--cloud-save-path /path/to/cloud_disk --code-path /path/to/imagenet_code_c2i_flip_ten_crop --image-size 384 "
    "--gpt-model GPT-3B",  # train_c2i_fsdp.sh
    "--cloud-save-path /c --code-path /d --gpt-model GPT-B --ema --gpt-ckpt /c/0005000.pt --gpt-type c2i "
    "--dataset imagenet_code --no-local-save --no-compile --global-seed 1 --gradient-accumulation-steps 2 "
    "--mixed-precision bf16 --vocab-size 16384 --downsample-size 16 --num-workers 24",
]
LLAMAGEN_SAMPLE = [
    "--vq-ckpt ./pretrained_models/vq_ds16_c2i.pt --gpt-ckpt ./pretrained_models/c2i_B.pt --gpt-model GPT-B "
    "--image-size 384 --image-size-eval 256 --cfg-scale 2.0",
    "--vq-ckpt ./pretrained_models/vq_ds16_c2i.pt --gpt-ckpt ./pretrained_models/c2i_XXL.pt --gpt-model GPT-XXL "
    "--from-fsdp --image-size 384 --image-size-eval 256 --cfg-scale 1.75",
    "--vq-ckpt v.pt --gpt-ckpt g.pt --gpt-type c2i --num-fid-samples 50000 --per-proc-batch-size 32 "
    "--precision bf16 --global-seed 0 --top-k 0",
]
LLAMAGEN_EXTRACT = [
    "--vq-ckpt ./pretrained_models/vq_ds16_c2i.pt --data-path /path/to/imagenet/train "
    "--code-path /path/to/imagenet_code_c2i_flip_ten_crop --ten-crop --crop-range 1.1 --image-size 384",
]
COMPAT_FLAGS = ("--gpt-ckpt", "--gpt-type", "--dataset", "--cloud-save-path", "--no-local-save")


def test_llamagen_launch_lines_parse():
    parsed = [train_parse_args(shlex.split(line)) for line in LLAMAGEN_TRAIN]
    assert all(a.results_dir == "/path/to/cloud_disk" and a.image_size == 384 for a in parsed[:3])
    last = parsed[-1]
    assert (last.results_dir, last.resume, last.ema, last.ema_decay) == ("/c", "/c/0005000.pt", True, 0.9999)
    assert (last.compile, last.seed, last.grad_accum_steps) == (False, 1, 2)
    for line in LLAMAGEN_SAMPLE:
        assert sample_parse_args(shlex.split(line)).gpt_ckpt.endswith(".pt")
    for line in LLAMAGEN_EXTRACT:
        assert extract_codes.parse_args(shlex.split(line)).ten_crop
    helps = {s: a.help for a in build_parser()._actions for s in a.option_strings}
    assert all("LlamaGen compatibility flag" in helps[f] for f in COMPAT_FLAGS)
    from autoregressive.sample.cli import build_parser as sample_parser

    sample_helps = {s: a.help for a in sample_parser()._actions for s in a.option_strings}
    assert all("LlamaGen compatibility flag" in sample_helps[f] for f in ("--gpt-type", "--from-fsdp"))


@pytest.mark.parametrize("parse", [train_parse_args, sample_parse_args])
def test_text_to_image_and_ambiguous_flags_stop_with_one_line(parse, capsys):
    base = ["--code-path", "x"] if parse is train_parse_args else ["--gpt-ckpt", "g", "--vq-ckpt", "v"]
    with pytest.raises(SystemExit):
        parse(base + ["--gpt-type", "t2i"])
    assert "text-to-image is not supported" in capsys.readouterr().err
    if parse is train_parse_args:
        for flags, message in ((["--gpt-ckpt", "a", "--resume", "b"], "give one"),
                               (["--cloud-save-path", "a", "--results-dir", "b"], "give one"),
                               (["--gpt-ckpt", "a", "--init-weights", "b"], "give one")):
            with pytest.raises(SystemExit):
                parse(base + flags)
            assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------------------
def test_ema_update_matches_a_float64_reference():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))
    ema = ModelEMA(model, decay=0.8)
    reference = {k: v.detach().double().clone() for k, v in model.named_parameters()}
    for _ in range(6):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update()
        for k, p in model.named_parameters():
            reference[k] = 0.8 * reference[k] + 0.2 * p.detach().double()
    for k, p in model.named_parameters():
        assert not torch.allclose(ema.shadow[k], p, atol=1e-2)  # the average lags the weights
        assert torch.allclose(ema.shadow[k].double(), reference[k], atol=1e-5, rtol=0), k


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("codes") / "toy")


EMA = ("--ema", "--ema-decay", "0.5")


def test_ema_in_training_is_stored_and_resumes_exactly(store, tmp_path):
    """Dropout on, interruption mid-epoch; checkpoints every step let the test check the
    update rule between consecutive checkpoints of the real loop."""
    main(train_argv(store, tmp_path, "full", *EMA, max_steps=6, ckpt_every=1, keep_last=10))
    main(train_argv(store, tmp_path, "split", *EMA, max_steps=3))
    main(train_argv(store, tmp_path, "split", *EMA, max_steps=6))
    states = [load_checkpoint(p) for _, p in list_checkpoints(tmp_path / "full" / "checkpoints")]
    assert [s["step"] for s in states] == list(range(1, 7))
    for before, after in zip(states, states[1:]):
        for k, w in after["model"].items():
            expected = 0.5 * before["ema"][k].double() + 0.5 * w.double()
            assert torch.allclose(after["ema"][k].double(), expected, atol=1e-6, rtol=0), k
    last = states[-1]
    assert any(not torch.equal(last["ema"][k], last["model"][k]) for k in last["model"])
    assert_same_weights(last["ema"], final_state(tmp_path / "split")["ema"])
    assert_same_weights(last["model"], final_state(tmp_path / "split")["model"])


def test_ema_under_fsdp_resumes_exactly_past_a_damaged_shard(store, tmp_path):
    """2 ranks, gloo: the EMA lives as DTensor shards, is saved in the FSDP checkpoint directory
    and exported. Then a shard of the newest checkpoint is truncated: the rerun falls back to
    step 4, keeps the damaged directory, and reaches the same step-8 weights and EMA bit for bit."""
    flags = (*NO_DROPOUT, *EMA, "--data-parallel", "fsdp", "--export-consolidated")
    argv = train_argv(store, tmp_path, "fsdp", *flags, max_steps=8)
    torchrun(argv)
    newest = tmp_path / "fsdp" / "checkpoints" / "0000008"
    assert (newest / ".metadata").is_file()
    whole = load_checkpoint(newest)
    export = load_checkpoint(tmp_path / "fsdp" / "exports" / "0000008.pt")
    assert_same_weights(export["ema"], whole["ema"])
    assert any(not torch.equal(whole["ema"][k], whole["model"][k]) for k in whole["model"])
    shard = newest / "__1_0.distcp"
    size = shard.stat().st_size
    with open(shard, "r+b") as f:
        f.truncate(size // 2)
    proc = torchrun(argv)
    notes = [line for line in proc.stdout.splitlines() if "kept as 0000008.unreadable" in line]
    assert len(notes) == 1 and "__1_0.distcp is truncated" in notes[0] and "resuming from 0000004" in notes[0]
    kept = tmp_path / "fsdp" / "checkpoints" / "0000008.unreadable" / "__1_0.distcp"
    assert kept.stat().st_size == size // 2  # never deleted or overwritten
    again = final_state(tmp_path / "fsdp")
    assert_same_weights(whole["model"], again["model"])
    assert_same_weights(whole["ema"], again["ema"])
    main(train_argv(store, tmp_path, "single", *NO_DROPOUT, *EMA, max_steps=8))
    assert_same_weights(final_state(tmp_path / "single")["ema"], whole["ema"], atol=1e-5)


# ---------------------------------------------------------------------------------------
# --gpt-ckpt and --init-weights
# ---------------------------------------------------------------------------------------
def to_llamagen_layout(path, dst, with_ema: bool):
    """Our checkpoint rewritten as LlamaGen's train_c2i.py saves: model, optimizer.state_dict()
    (parameters numbered), steps, args Namespace, ema."""
    ours = load_checkpoint(path)
    model, args = model_from_checkpoint(ours)
    ns = argparse.Namespace(**{k: v for k, v in args.items() if k in ("gpt_model", "lr", "weight_decay", "beta1",
                                                                       "beta2")})
    optimizer = create_optimizer(model, ns, DistInfo(0, 1, 0, torch.device("cpu")))
    set_optimizer_state_dict(model, optimizer, ours["optimizer"])
    out = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "steps": ours["step"], "args": ns}
    if with_ema:
        out["ema"] = ours["ema"]
    torch.save(out, dst)
    return dst


def test_gpt_ckpt_continues_a_llamagen_checkpoint(store, tmp_path, capsys):
    main(train_argv(store, tmp_path, "reference", *NO_DROPOUT, *EMA, max_steps=8))
    main(train_argv(store, tmp_path, "first", *NO_DROPOUT, *EMA, max_steps=4))
    first = latest_checkpoint(tmp_path / "first" / "checkpoints")
    llamagen = to_llamagen_layout(first, tmp_path / "0000004.pt", with_ema=True)
    assert isinstance(torch.load(llamagen, weights_only=False)["optimizer"]["state"], dict)
    capsys.readouterr()
    main(train_argv(store, tmp_path, "continued", *NO_DROPOUT, *EMA, "--gpt-ckpt", str(llamagen), max_steps=8))
    assert f"resumed from {llamagen} at step 4 (epoch 1)" in capsys.readouterr().out
    assert [r["step"] for r in read_log(tmp_path / "continued")] == [5, 6, 7, 8]
    reference, continued = final_state(tmp_path / "reference"), final_state(tmp_path / "continued")
    assert_same_weights(reference["model"], continued["model"])
    assert_same_weights(reference["ema"], continued["ema"])
    assert_same_weights(reference["optimizer"]["state"]["output.weight"],
                        continued["optimizer"]["state"]["output.weight"])


def test_init_weights_starts_a_new_run(store, tmp_path, capsys):
    main(train_argv(store, tmp_path, "base", max_steps=4))
    llamagen = to_llamagen_layout(latest_checkpoint(tmp_path / "base" / "checkpoints"), tmp_path / "c2i.pt", False)
    capsys.readouterr()
    # lr 0: AdamW changes nothing, so the new run's weights are the loaded ones
    main(train_argv(store, tmp_path, "tuned", *EMA, "--init-weights", str(llamagen), max_steps=2, lr=0))
    assert "new run from the weights of" in capsys.readouterr().out
    tuned, base = final_state(tmp_path / "tuned"), final_state(tmp_path / "base")
    assert tuned["step"] == 2 and tuned["data_position"] == {"epoch": 0, "samples": 16}
    assert_same_weights(tuned["model"], base["model"])
    assert_same_weights(tuned["ema"], base["model"])
    assert int(tuned["optimizer"]["state"]["output.weight"]["step"]) == 2  # a fresh optimizer
    with pytest.raises(SystemExit, match="does not fit this model"):
        main(train_argv(store, tmp_path, "wrong", "--init-weights", str(llamagen), gpt_model="GPT-XS", max_steps=1))


# ---------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------
def test_sampling_prefers_the_ema_weights(tmp_path):
    torch.manual_seed(0)
    raw, averaged = (GPT_models["GPT-T"](vocab_size=16, block_size=16, num_classes=4) for _ in range(2))
    args = {"gpt_model": "GPT-T", "model_config": dataclasses.asdict(raw.config)}
    ours = tmp_path / "ours.pt"
    torch.save({"model": raw.state_dict(), "ema": averaged.state_dict(), "args": args}, ours)
    theirs = tmp_path / "theirs.pt"  # LlamaGen's layout: no config, args Namespace
    torch.save({"model": raw.state_dict(), "ema": averaged.state_dict(), "steps": 5,
                "args": argparse.Namespace(gpt_model="GPT-T")}, theirs)
    bare = tmp_path / "bare.pt"  # LlamaGen's --from-fsdp files: a bare state dict
    torch.save(raw.state_dict(), bare)
    for path in (ours, theirs):
        model, info = load_generator(str(path), "GPT-T", 16, 16, 4)
        assert info["weights"] == "ema"
        assert_same_weights(model.state_dict(), averaged.state_dict())
        model, info = load_generator(str(path), "GPT-T", 16, 16, 4, prefer_ema=False)
        assert info["weights"] == "raw"
        assert_same_weights(model.state_dict(), raw.state_dict())
    model, info = load_generator(str(bare), "GPT-T", 16, 16, 4)
    assert info["weights"] == "raw" and np.allclose(model.output.weight.detach(), raw.output.weight.detach())


def test_sample_c2i_says_which_weights_it_used(ckpts, tmp_path, capsys):
    """End to end: the grid of a checkpoint with EMA weights comes from them unless --raw-weights."""
    from PIL import Image

    ours = load_checkpoint(ckpts["gpt"])
    torch.manual_seed(1)
    averaged = {k: v + 0.5 * torch.randn_like(v) for k, v in ours["model"].items()}
    path = tmp_path / "gpt_ema.pt"
    torch.save({**ours, "ema": averaged}, path)
    grids = {}
    for flags in ([], ["--raw-weights"]):
        out = tmp_path / f"grid{len(flags)}.png"
        sample_main(["--gpt-ckpt", str(path), "--vq-ckpt", ckpts["vq"], "--device", "cpu", "--class-labels", "0", "1",
                     "--out", str(out), *flags])
        first = capsys.readouterr().out.splitlines()[0]
        assert ("raw weights" if flags else "EMA weights") in first, first
        grids[len(flags)] = np.asarray(Image.open(out))
    sample_main(["--gpt-ckpt", ckpts["gpt"], "--vq-ckpt", ckpts["vq"], "--device", "cpu", "--class-labels", "0", "1",
                 "--out", str(tmp_path / "plain.png")])
    assert "raw weights" in capsys.readouterr().out  # no EMA in the file
    assert np.array_equal(grids[1], np.asarray(Image.open(tmp_path / "plain.png")))
    assert not np.array_equal(grids[0], grids[1])


def test_gpt_ckpt_of_another_model_stops_with_one_line(store, tmp_path):
    main(train_argv(store, tmp_path, "base", max_steps=4))
    llamagen = to_llamagen_layout(latest_checkpoint(tmp_path / "base" / "checkpoints"), tmp_path / "0000004.pt", False)
    with pytest.raises(SystemExit, match=r"^error: .*0000004.pt does not fit this model"):
        main(train_argv(store, tmp_path, "wider", "--gpt-ckpt", str(llamagen), "--num-classes", "6", max_steps=8))


@pytest.mark.parametrize("script, line, passed", [
    ("scripts/train_c2i.sh", LLAMAGEN_TRAIN[0], []),
    ("scripts/train_c2i_fsdp.sh", LLAMAGEN_TRAIN[2], ["--data-parallel", "fsdp"]),
    ("scripts/sample_c2i.sh", LLAMAGEN_SAMPLE[1], ["--num-fid-samples", "50000"]),
])
def test_launchers_take_llamagen_lines(script, line, passed):
    """The launchers hand LlamaGen's flags to the script unchanged (TORCHRUN=echo prints the call)."""
    env = {k: v for k, v in os.environ.items() if k not in ("GPT_CKPT", "VQ_CKPT", "SAMPLE_DIR", "REF_BATCH")}
    proc = subprocess.run(["bash", script, *shlex.split(line)], cwd=REPO, env={**env, "TORCHRUN": "echo"},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    argv = shlex.split(proc.stdout)
    script_at = next(i for i, a in enumerate(argv) if a.endswith(".py"))
    forwarded = argv[script_at + 1:]
    assert forwarded[-len(shlex.split(line)):] == shlex.split(line)
    assert all(p in forwarded for p in passed)
    parse = sample_parse_args if "sample" in script else train_parse_args
    parse(forwarded)
