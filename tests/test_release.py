"""Release folders (config.json + model.safetensors + model card): tiny models of every kind are
trained, exported with export_release.py and loaded with from_pretrained, which must give the
logits and sampled tokens of the checkpoint they came from; a DPAR release samples with only the
VQ given; LlamaGen's Hugging Face folders load unchanged; damaged folders stop with one line."""
import argparse
import dataclasses
import json
import os
import pickle
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from autoregressive.export import main as export_main
from autoregressive.models import model_from_checkpoint
from autoregressive.models.generate import generate
from autoregressive.models.gpt import GPT_models
from autoregressive.models.release import from_pretrained, save_pretrained
from autoregressive.sample import build_sampler, main as sample_main, parse_args as sample_args
from autoregressive.train import main as train_main
from dataset.code_store import CodeStoreWriter
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig
from entropy_tools import score
from test_train import GRID, VOCAB, final_state, make_store, train_argv
from test_vq import train_flags as vq_train_flags, write_image_folder
from tokenizer.train_vq import main as train_vq_main
from tokenizer.vq_model import VQ_models, load_vq_checkpoint
from utils.checkpoint import latest_checkpoint, load_checkpoint
from utils.identity import checkpoint_sha256
from utils.release import CARD_NAME, CONFIG_NAME, WEIGHTS_NAME

HF_FIXTURE = Path(__file__).parent / "fixtures" / "llamagen" / "hf_gpt_c2i_tiny"
EMA = ("--ema", "--ema-decay", "0.5")
VQ_OVERRIDES = dict(ch=16, norm_groups=8, z_channels=32, num_res_blocks=1, codebook_embed_dim=8)
CLASSES_SAMPLED = [0, 1, 2, 3]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def save_vq(path: Path, codebook_size: int, seed: int) -> Path:
    """A random VQ-16 in the project's checkpoint format (sampling decodes with it)."""
    torch.manual_seed(seed)
    vq = VQ_models["VQ-16"](codebook_size=codebook_size, **VQ_OVERRIDES)
    torch.save({"model": vq.state_dict(), "args": {"vq_model": "VQ-16", "model_config": dataclasses.asdict(
        vq.config)}}, path)
    return path


def save_entropy_model(path: Path, seed: int) -> Path:
    torch.manual_seed(seed)
    model = GPT_models["GPT-T"](vocab_size=VOCAB, block_size=GRID * GRID, model_type="uncond")
    torch.nn.init.normal_(model.output.weight, std=1.0)
    torch.save({"model": model.state_dict(), "args": {"gpt_model": "GPT-T", "model_config": dataclasses.asdict(
        model.config)}}, path)
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Checkpoints of tiny training runs (4 steps each) on one code store: the entropy model
    (GPT-T, unconditional), its entropies, DPAR-T and GPT-T with EMA; a VQ trained 3 steps; a
    random VQ-16 for decoding and a second entropy model."""
    d = tmp_path_factory.mktemp("runs")
    store = make_store(d / "codes")
    train_main(train_argv(store, d, "entropy", "--unconditional", max_steps=4))
    entropy = latest_checkpoint(d / "entropy" / "checkpoints")
    score.main(["--code-path", str(store), "--entropy-ckpt", str(entropy), "--device", "cpu"])
    train_main(train_argv(store, d, "dpar", "--entropy-model", str(entropy), *EMA, gpt_model="DPAR-T",
                          target_compression=1.5, max_patch_length=4, max_steps=4))
    train_main(train_argv(store, d, "gpt", *EMA, max_steps=4))
    images = write_image_folder(d / "images", count=8, size=32, seed=0)
    train_vq_main(vq_train_flags(images, d / "vq_run"))
    return {"store": store, "entropy": entropy, "dpar": latest_checkpoint(d / "dpar" / "checkpoints"),
            "gpt": latest_checkpoint(d / "gpt" / "checkpoints"),
            "trained_vq": d / "vq_run" / "checkpoints" / "final.pt",
            "vq": save_vq(d / "vq.pt", VOCAB, seed=0), "other_vq": save_vq(d / "other_vq.pt", VOCAB, seed=1),
            "other_entropy": save_entropy_model(d / "other_entropy.pt", seed=3), "dir": d}


@pytest.fixture(scope="module")
def releases(runs) -> dict:
    """export_release.py of each run: EMA weights (default) for GPT and DPAR (which bundles its
    entropy model and records the VQ), the raw weights of the GPT, the entropy model and the VQ."""
    d = runs["dir"] / "releases"
    out = {k: d / k for k in ("gpt", "gpt_raw", "dpar", "entropy", "trained_vq")}
    export_main([str(runs["gpt"]), str(out["gpt"]), "--vq-ckpt", str(runs["vq"])])
    export_main([str(runs["gpt"]), str(out["gpt_raw"]), "--weights", "raw"])
    export_main([str(runs["dpar"]), str(out["dpar"]), "--vq-ckpt", str(runs["vq"])])
    export_main([str(runs["entropy"]), str(out["entropy"])])
    export_main([str(runs["trained_vq"]), str(out["trained_vq"])])
    return out


def random_inputs(model, batch: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    T = model.config.block_size
    idx = torch.randint(0, model.config.vocab_size, (batch, T), generator=g)
    cond = torch.randint(0, model.config.num_classes, (batch,), generator=g)
    return idx, cond


def assert_same_state(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and len(a) > 5
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def assert_same_logits(a, b, seed: int = 0) -> None:
    idx, cond = random_inputs(a, seed=seed)
    assert idx.unique().numel() > 3  # random codes, not a constant
    with torch.no_grad():
        la, _ = a(idx[:, :-1], cond)
        lb, _ = b(idx[:, :-1], cond)
    assert la.shape == (3, a.config.block_size, a.config.vocab_size) and la.std() > 0
    assert torch.equal(la, lb)


def sampled(argv: list):
    """Tokens and images sample_c2i.py's loader draws for CLASSES_SAMPLED (seeds 0..3)."""
    sampler, run = build_sampler(sample_args(argv + ["--device", "cpu", "--no-compile", "--cfg-scale", "2.0"]),
                                 torch.device("cpu"))
    return sampler.sample(CLASSES_SAMPLED, list(range(len(CLASSES_SAMPLED)))), run


# ---------------------------------------------------------------------------------------
# Round trips, one per model kind
# ---------------------------------------------------------------------------------------
def test_gpt_release_gives_the_checkpoints_logits_and_samples(runs, releases):
    ckpt = load_checkpoint(runs["gpt"])
    assert any(not torch.equal(ckpt["ema"][k], ckpt["model"][k]) for k in ckpt["model"])  # EMA differs from raw
    for folder, prefer_ema, key in ((releases["gpt"], True, "ema"), (releases["gpt_raw"], False, "model")):
        released, config = from_pretrained(folder)
        original, _ = model_from_checkpoint(runs["gpt"], prefer_ema=prefer_ema)
        assert config["weights"] == ("ema" if prefer_ema else "raw") and config["model_name"] == "GPT-T"
        assert_same_state(released.state_dict(), {**ckpt["model"], **ckpt[key]} if key == "ema" else ckpt["model"])
        assert_same_logits(released, original)
    ours, run = sampled(["--gpt-ckpt", str(releases["gpt"]), "--vq-ckpt", str(runs["vq"])])
    theirs, _ = sampled(["--gpt-ckpt", str(runs["gpt"]), "--vq-ckpt", str(runs["vq"])])
    assert run.weights == "ema" and run.gpt_model == "GPT-T"
    assert ours.tokens.unique().numel() > 2 and torch.equal(ours.tokens, theirs.tokens)
    assert torch.equal(ours.images, theirs.images)


def test_dpar_release_samples_with_only_the_vq_given(runs, releases, tmp_path):
    folder = releases["dpar"]
    config = json.loads((folder / CONFIG_NAME).read_text())
    args = load_checkpoint(runs["dpar"])["args"]
    assert config["patching"] == args["patching"] and config["patching"]["mode"] == "entropy"
    assert config["entropy_model"] == {"sha256": checkpoint_sha256(runs["entropy"]), "folder": "entropy_model"}
    assert config["vq"]["sha256"] == checkpoint_sha256(runs["vq"]) and config["image_size"] == GRID * 16
    released, _ = from_pretrained(folder)
    original, _ = model_from_checkpoint(runs["dpar"], prefer_ema=True)
    assert_same_state(released.state_dict(), original.state_dict())
    bundled, _ = from_pretrained(folder / "entropy_model")
    assert_same_state(bundled.state_dict(), model_from_checkpoint(runs["entropy"])[0].state_dict())
    ours, run = sampled(["--gpt-ckpt", str(folder), "--vq-ckpt", str(runs["vq"])])
    theirs, _ = sampled(["--gpt-ckpt", str(runs["dpar"]), "--vq-ckpt", str(runs["vq"]),
                         "--entropy-ckpt", str(runs["entropy"])])
    assert run.patching == PatchingConfig.from_dict(args["patching"]).to_dict()
    assert torch.equal(ours.tokens, theirs.tokens) and torch.equal(ours.num_patches, theirs.num_patches)
    assert (ours.num_patches < released.config.block_size).any()  # the gate merged some tokens
    assert torch.equal(ours.images, theirs.images)
    # the same through the command line: a PNG grid from the folder alone (plus the VQ)
    grids = []
    for extra in (["--gpt-ckpt", str(folder)], ["--gpt-ckpt", str(runs["dpar"]), "--entropy-ckpt",
                                                str(runs["entropy"])]):
        out = tmp_path / f"grid{len(grids)}.png"
        sample_main(extra + ["--vq-ckpt", str(runs["vq"]), "--device", "cpu", "--no-compile", "--class-labels", "0",
                             "1", "--out", str(out)])
        grids.append(np.asarray(Image.open(out)))
    assert grids[0].std() > 1.0 and np.array_equal(grids[0], grids[1])


def test_entropy_model_release_gives_the_same_entropies_and_samples(runs, releases):
    released, config = from_pretrained(releases["entropy"])
    original, _ = model_from_checkpoint(runs["entropy"])
    assert config["model_config"]["model_type"] == "uncond" and config["weights"] == "raw"
    assert_same_state(released.state_dict(), original.state_dict())
    idx, _ = random_inputs(original, batch=4, seed=1)
    e_released, e_original = teacher_forced_entropy(released, idx), teacher_forced_entropy(original, idx)
    assert e_original.std() > 0 and torch.equal(e_released, e_original)
    start = torch.zeros(4, dtype=torch.long)
    tokens = [generate(m, start, original.config.block_size, generator=torch.Generator().manual_seed(5)).tokens
              for m in (released, original)]
    assert tokens[0].unique().numel() > 2 and torch.equal(tokens[0], tokens[1])


def test_vq_release_encodes_and_decodes_like_its_checkpoint(runs, releases):
    released, config = from_pretrained(releases["trained_vq"])
    original = load_vq_checkpoint(runs["trained_vq"], "VQ-16")
    assert config["kind"] == "vq" and config["model_config"]["ch_mult"] == [1, 2, 2]
    assert_same_state(released.state_dict(), original.state_dict())
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    codes = released.encode_to_indices(images)
    assert codes.unique().numel() > 1 and torch.equal(codes, original.encode_to_indices(images))
    with torch.no_grad():
        shape = (2, original.config.codebook_embed_dim, 8, 8)
        assert torch.equal(released.decode_code(codes, shape), original.decode_code(codes, shape))
    # a VQ release serves as --vq-ckpt, and keeps the identity of the checkpoint it came from
    vq_folder = runs["dir"] / "releases" / "decoder_vq"
    export_main([str(runs["vq"]), str(vq_folder)])
    ours, _ = sampled(["--gpt-ckpt", str(releases["gpt"]), "--vq-ckpt", str(vq_folder)])
    theirs, _ = sampled(["--gpt-ckpt", str(releases["gpt"]), "--vq-ckpt", str(runs["vq"])])
    assert torch.equal(ours.images, theirs.images)


def test_fsdp_directory_exports_like_its_single_file(runs, tmp_path):
    """A torch.distributed.checkpoint directory (FSDP runs) exports the tensors its file holds."""
    import torch.distributed.checkpoint as dcp

    ckpt = load_checkpoint(runs["gpt"])
    directory = tmp_path / "0000004"
    with warnings.catch_warnings():  # one process, no process group: intended
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save({"model": ckpt["model"], "ema": ckpt["ema"]}, checkpoint_id=str(directory))
    torch.save({k: ckpt[k] for k in ("step", "epoch", "data_position", "args")}, directory / "train_state.pt")
    export_main([str(directory), str(tmp_path / "from_dcp"), "--weights", "ema"])
    export_main([str(runs["gpt"]), str(tmp_path / "from_file"), "--weights", "ema"])
    a, b = load_file(tmp_path / "from_dcp" / WEIGHTS_NAME), load_file(tmp_path / "from_file" / WEIGHTS_NAME)
    assert_same_state(a, b)
    assert_same_state(a, {**ckpt["model"], **ckpt["ema"]})


# ---------------------------------------------------------------------------------------
# The model card and the export command's refusals
# ---------------------------------------------------------------------------------------
def test_model_card_states_training_entropy_model_and_evaluation(runs, releases, tmp_path):
    card = (releases["dpar"] / CARD_NAME).read_text()
    config = json.loads((releases["dpar"] / CONFIG_NAME).read_text())
    assert card.startswith("---\ntags:") and "# DPAR-T" in card
    assert config["source"]["step"] == 4 and "| step | 4 |" in card and "| epoch | 0 |" in card
    assert config["training"]["lr"] == 3e-3 and "| lr | 0.003 |" in card and "| global_batch_size | 8 |" in card
    assert checkpoint_sha256(runs["entropy"]) in card and "bundled in `entropy_model/`" in card
    assert "Not evaluated" in card and config["evaluation"] == []
    out = tmp_path / "evaluated"
    export_main([str(runs["gpt"]), str(out), "--evaluated-on", "FID-50k 99.9 (toy store, cfg 2.0)", "--license", "mit"])
    card = (out / CARD_NAME).read_text()
    assert "- FID-50k 99.9 (toy store, cfg 2.0)" in card and "Not evaluated" not in card and "license: mit" in card


@pytest.mark.parametrize("case", ["ema-missing", "out-not-empty", "other-entropy-model", "gpt-with-entropy"])
def test_export_refusals_are_one_line_and_write_nothing(runs, tmp_path, capsys, case):
    out = tmp_path / "release"
    argv = {"ema-missing": [str(runs["entropy"]), str(out), "--weights", "ema"],
            "out-not-empty": [str(runs["gpt"]), str(out)],
            "other-entropy-model": [str(runs["dpar"]), str(out), "--entropy-ckpt", str(runs["other_entropy"])],
            "gpt-with-entropy": [str(runs["gpt"]), str(out), "--entropy-ckpt", str(runs["entropy"])]}[case]
    expected = {"ema-missing": "holds no EMA weights", "out-not-empty": "is not an empty folder",
                "other-entropy-model": "is not the entropy model this DPAR model was trained with",
                "gpt-with-entropy": "apply to DPAR checkpoints"}[case]
    if case == "out-not-empty":
        out.mkdir()
        (out / "notes.txt").write_text("keep")
    with pytest.raises(SystemExit):
        export_main(argv)
    err = capsys.readouterr().err.strip()
    assert expected in err and len(err.splitlines()) == 1, err
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == (["release"] if case == "out-not-empty" else []), left  # no half-written folder
    if case == "out-not-empty":
        assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_export_refuses_a_vq_other_than_the_code_stores(runs, tmp_path, capsys):
    """A store whose manifest names its tokenizer: --vq-ckpt must be that one (refused in one line,
    nothing written); the right one is recorded."""
    manifest = runs["store"] / "manifest.json"
    original = manifest.read_text()
    assert json.loads(original)["tokenizer_hash"] == "test"  # precondition: the shared store names none
    manifest.write_text(json.dumps({**json.loads(original), "tokenizer_hash": checkpoint_sha256(runs["vq"])}))
    try:
        with pytest.raises(SystemExit):
            export_main([str(runs["gpt"]), str(tmp_path / "other"), "--vq-ckpt", str(runs["other_vq"])])
        err = capsys.readouterr().err.strip()
        assert f"is not the tokenizer of the training code store {runs['store']}" in err and "\n" not in err, err
        assert not (tmp_path / "other").exists()
        export_main([str(runs["gpt"]), str(tmp_path / "same"), "--vq-ckpt", str(runs["vq"])])
        config = json.loads((tmp_path / "same" / CONFIG_NAME).read_text())
        assert config["vq"]["sha256"] == checkpoint_sha256(runs["vq"])
    finally:
        manifest.write_text(original)


# ---------------------------------------------------------------------------------------
# Sampling refuses what does not belong to the release
# ---------------------------------------------------------------------------------------
def test_sampling_refuses_another_entropy_model_or_vq(runs, releases, tmp_path):
    with pytest.raises(ValueError, match="is not the entropy model this DPAR model was trained with"):
        sampled(["--gpt-ckpt", str(releases["dpar"]), "--vq-ckpt", str(runs["vq"]),
                 "--entropy-ckpt", str(runs["other_entropy"])])
    with pytest.raises(ValueError, match="is not the tokenizer this model's codes come from"):
        sampled(["--gpt-ckpt", str(releases["dpar"]), "--vq-ckpt", str(runs["other_vq"])])
    with pytest.raises(ValueError, match="holds only its EMA weights"):
        sampled(["--gpt-ckpt", str(releases["dpar"]), "--vq-ckpt", str(runs["vq"]), "--raw-weights"])
    # the hash alone (--no-entropy-model): sampling asks for the entropy model, and takes the right one
    bare = tmp_path / "bare"
    export_main([str(runs["dpar"]), str(bare), "--no-entropy-model", "--vq-ckpt", str(runs["vq"])])
    assert not (bare / "entropy_model").exists()
    with pytest.raises(ValueError, match="give the entropy model with --entropy-ckpt"):
        sampled(["--gpt-ckpt", str(bare), "--vq-ckpt", str(runs["vq"])])
    ours, _ = sampled(["--gpt-ckpt", str(bare), "--vq-ckpt", str(runs["vq"]), "--entropy-ckpt", str(runs["entropy"])])
    theirs, _ = sampled(["--gpt-ckpt", str(releases["dpar"]), "--vq-ckpt", str(runs["vq"])])
    assert torch.equal(ours.tokens, theirs.tokens)


# ---------------------------------------------------------------------------------------
# LlamaGen's Hugging Face format
# ---------------------------------------------------------------------------------------
def test_llamagen_hf_folder_loads_its_tensors_unchanged():
    model, config = from_pretrained(HF_FIXTURE)
    stored = load_file(HF_FIXTURE / WEIGHTS_NAME)
    theirs = json.loads((HF_FIXTURE / CONFIG_NAME).read_text())
    assert config["model_name"] == "GPT-T" and "format" not in theirs
    assert {k: config["model_config"][k] for k in ("dim", "n_layer", "n_head", "vocab_size", "block_size",
                                                   "num_classes", "class_dropout_prob")} == \
        {k: theirs[k] for k in ("dim", "n_layer", "n_head", "vocab_size", "block_size", "num_classes",
                                "class_dropout_prob")}
    assert_same_state(model.state_dict(), stored)
    reference = GPT_models["GPT-T"](vocab_size=64, block_size=16, num_classes=10, token_dropout_p=0.0,
                                    resid_dropout_p=0.0, ffn_dropout_p=0.0)
    reference.load_state_dict(stored, strict=True)
    # LlamaGen's initialisation zeroes the head (every logit 0): the same random head in both
    # models makes the logits show every other weight
    assert not stored["output.weight"].any()
    head = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    for m in (model, reference):
        m.output.weight.data.copy_(head)
    assert_same_logits(model, reference.eval(), seed=4)


@pytest.fixture(scope="module")
def llamagen_setting(tmp_path_factory) -> dict:
    """A code store and a VQ of the fixture's size (vocabulary 64, 10 classes, 4x4 grid), and the
    fixture's weights as a project checkpoint."""
    d = tmp_path_factory.mktemp("llamagen")
    rng = np.random.default_rng(0)
    writer = CodeStoreWriter.create(d / "codes", 16, 1, 16)
    writer.write(np.arange(16), rng.integers(0, 64, (16, 1, 16)), rng.integers(0, 10, 16))
    writer.finalize({"image_size": 64, "grid_height": 4, "grid_width": 4, "codebook_size": 64, "num_views": 1,
                     "tokenizer_hash": "test", "num_classes": 10})
    model, config = from_pretrained(HF_FIXTURE)
    ckpt = d / "fixture.pt"
    torch.save({"model": model.state_dict(), "args": {"gpt_model": "GPT-T", "model_config": config["model_config"],
                                                      "image_size": 64}}, ckpt)
    return {"store": d / "codes", "vq": save_vq(d / "vq.pt", 64, seed=0), "ckpt": ckpt, "dir": d}


def test_llamagen_hf_folder_as_gpt_ckpt_and_init_weights(llamagen_setting, tmp_path, capsys):
    s = llamagen_setting
    ours, run = sampled(["--gpt-ckpt", str(HF_FIXTURE), "--vq-ckpt", str(s["vq"])])
    theirs, _ = sampled(["--gpt-ckpt", str(s["ckpt"]), "--vq-ckpt", str(s["vq"])])
    assert run.gpt_model == "GPT-T" and run.image_size == 64
    assert ours.tokens.unique().numel() > 2 and torch.equal(ours.tokens, theirs.tokens)
    # lr 0: the new run's weights are the folder's
    argv = train_argv(s["store"], tmp_path, "tuned", "--init-weights", str(HF_FIXTURE), max_steps=1, lr=0)
    train_main(argv)
    assert "new run from the weights of" in capsys.readouterr().out
    assert_same_state(final_state(tmp_path / "tuned")["model"], load_file(HF_FIXTURE / WEIGHTS_NAME))
    # a weights folder holds no training state: --gpt-ckpt (resume) says what to use instead
    with pytest.raises(SystemExit, match="start a new run from it with --init-weights"):
        train_main(train_argv(s["store"], tmp_path, "resumed", "--gpt-ckpt", str(HF_FIXTURE), max_steps=1))


def test_llamagen_released_checkpoints_export_with_their_model_named(llamagen_setting, tmp_path, capsys):
    """LlamaGen's c2i files hold weights without a config (push_gpt_to_hf.py's input): the flags
    name the model; its tokenizer files are recognised by their codebook."""
    stored = load_file(HF_FIXTURE / WEIGHTS_NAME)
    theirs = tmp_path / "c2i_tiny.pt"
    torch.save({"model": stored, "steps": 5, "args": argparse.Namespace(gpt_model="GPT-T")}, theirs)
    export_main([str(theirs), str(tmp_path / "named"), "--gpt-model", "GPT-T", "--image-size", "64", "--vocab-size",
                 "64", "--num-classes", "10", "--vq-ckpt", str(llamagen_setting["vq"])])
    model, config = from_pretrained(tmp_path / "named")
    assert config["image_size"] == 64 and config["vq"]["sha256"] == checkpoint_sha256(llamagen_setting["vq"])
    assert_same_state(model.state_dict(), stored)
    capsys.readouterr()
    for argv, expected in (([], "name it with --gpt-model and --image-size"),
                           (["--gpt-model", "GPT-XS", "--image-size", "64", "--vocab-size", "64", "--num-classes",
                             "10"], "does not fit GPT-XS")):
        with pytest.raises(SystemExit):
            export_main([str(theirs), str(tmp_path / "unnamed")] + argv)
        err = capsys.readouterr().err.strip()
        assert expected in err and len(err.splitlines()) == 1, err
    tokenizer = tmp_path / "vq_narrow.pt"
    torch.save({"model": load_checkpoint(llamagen_setting["vq"])["model"]}, tokenizer)  # no args: the registry's
    with pytest.raises(SystemExit):
        export_main([str(tokenizer), str(tmp_path / "vq")])
    err = capsys.readouterr().err.strip()
    assert f"{tokenizer}: checkpoint codebook is 64x8 but VQ-16 config expects 16384x8" in err and len(err.splitlines()) == 1, err


# ---------------------------------------------------------------------------------------
# Damaged or foreign folders
# ---------------------------------------------------------------------------------------
def copy_fixture(tmp_path: Path) -> Path:
    folder = tmp_path / "hf"
    shutil.copytree(HF_FIXTURE, folder)
    return folder


def one_line_error(fn) -> str:
    with pytest.raises(ValueError) as caught:
        fn()
    message = str(caught.value)
    assert len(message.splitlines()) == 1, message
    return message


def test_truncated_safetensors_is_one_line_naming_the_file(tmp_path, llamagen_setting, capsys):
    folder = copy_fixture(tmp_path)
    weights = folder / WEIGHTS_NAME
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = one_line_error(lambda: from_pretrained(folder))
    assert str(weights) in message and "truncated" in message
    with pytest.raises(SystemExit):
        sample_main(["--gpt-ckpt", str(folder), "--vq-ckpt", str(llamagen_setting["vq"]), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot read weights") and str(weights) in err and len(err.splitlines()) == 1
    with pytest.raises(SystemExit, match=f"cannot read weights {weights}"):
        train_main(train_argv(llamagen_setting["store"], tmp_path, "t", "--init-weights", str(folder), max_steps=1))


def test_mismatched_keys_or_shapes_are_one_line_naming_the_file(tmp_path):
    folder = copy_fixture(tmp_path)
    weights = folder / WEIGHTS_NAME
    state = load_file(weights)
    renamed = {("norm.scale" if k == "norm.weight" else k): v for k, v in state.items()}
    save_file(renamed, weights)
    message = one_line_error(lambda: from_pretrained(folder))
    assert str(weights) in message and "missing norm.weight" in message and "unexpected norm.scale" in message
    save_file(state, weights)
    config = json.loads((folder / CONFIG_NAME).read_text())
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "vocab_size": 128}))
    message = one_line_error(lambda: from_pretrained(folder))
    assert str(weights) in message and "tok_embeddings.weight is (64, 64), the model's (128, 64)" in message
    (folder / CONFIG_NAME).write_text(json.dumps({**config, "model_type": "t2i"}))
    assert "class-conditional c2i only" in one_line_error(lambda: from_pretrained(folder))


class WritesAFile:
    """A pickle payload: unpickling it would create the file named by MARKER."""

    def __reduce__(self):
        return (open, (os.environ["RELEASE_TEST_MARKER"], "w"))


def test_safetensors_loading_runs_no_code(tmp_path, monkeypatch):
    marker = tmp_path / "code_ran"
    monkeypatch.setenv("RELEASE_TEST_MARKER", str(marker))
    folder = copy_fixture(tmp_path)
    payload = pickle.dumps({"output.weight": WritesAFile()})
    pickle.loads(payload)["output.weight"].close()  # precondition: the payload does run code when unpickled
    assert marker.exists()
    marker.unlink()
    (folder / WEIGHTS_NAME).write_bytes(payload)
    message = one_line_error(lambda: from_pretrained(folder))
    assert str(folder / WEIGHTS_NAME) in message and not marker.exists()


def test_save_pretrained_writes_untied_contiguous_tensors(tmp_path):
    """Shared or strided storage (a tied head, a transposed weight) is written as plain copies."""
    model = GPT_models["GPT-T"](vocab_size=64, block_size=16, num_classes=10)
    torch.nn.init.normal_(model.output.weight)
    model.output.weight = model.tok_embeddings.weight  # tied, as some releases are
    with torch.no_grad():
        model.layers[0].attention.wo.weight.data = model.layers[0].attention.wo.weight.data.t().contiguous().t()
    assert not model.layers[0].attention.wo.weight.is_contiguous()  # precondition
    save_pretrained(model, tmp_path / "tied", "GPT-T")
    stored = load_file(tmp_path / "tied" / WEIGHTS_NAME)
    assert_same_state(stored, {k: v.contiguous() for k, v in model.state_dict().items()})
    loaded, _ = from_pretrained(tmp_path / "tied")
    assert torch.equal(loaded.output.weight, loaded.tok_embeddings.weight)
    assert loaded.output.weight.data_ptr() != loaded.tok_embeddings.weight.data_ptr()


def test_hub_ids_go_through_huggingface_hub(runs, releases, tmp_path, monkeypatch, capsys):
    """The hub calls themselves need a network; what is ours is routing a repo id to
    snapshot_download and a pushed folder to upload_folder, and one-line errors around them."""
    import huggingface_hub

    calls = []

    def snapshot_download(repo_id, **kwargs):
        calls.append(("download", repo_id))
        if repo_id == "someone/missing":
            raise OSError("404 Client Error: Repository Not Found")
        return str(releases["gpt"])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setattr(huggingface_hub, "create_repo", lambda repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(huggingface_hub, "upload_folder",
                        lambda repo_id, folder_path, **kw: calls.append(("upload", repo_id, folder_path)) or "url")
    model, config = from_pretrained("someone/gpt-t")
    assert calls == [("download", "someone/gpt-t")] and config["model_name"] == "GPT-T"
    assert_same_state(model.state_dict(), load_file(releases["gpt"] / WEIGHTS_NAME))
    message = one_line_error(lambda: from_pretrained("someone/missing"))
    assert "someone/missing: no such local folder" in message and "Repository Not Found" in message
    one_line_error(lambda: from_pretrained(str(tmp_path / "missing.pt")))  # a file name is never a repo id
    assert len(calls) == 2
    out = tmp_path / "pushed"
    export_main([str(runs["gpt"]), str(out), "--push-to-hub", "someone/gpt-t"])
    assert calls[2:] == [("create", "someone/gpt-t"), ("upload", "someone/gpt-t", str(out))]
    assert "pushed to url" in capsys.readouterr().out
