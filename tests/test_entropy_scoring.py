"""Entropy scoring of code stores (entropy_tools/score.py), incremental scoring, causality of
the boundary decision, and the heatmap command line, with a tiny random entropy model."""
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from autoregressive.models.dpar import DPAR_models
from benchmarks import imagenet_store_rehearsal as rehearsal
from autoregressive.models.gpt import GPT_models
from dataset.augmentation import center_crop_arr
from dataset.code_store import CodeStoreWriter
from dataset.imagefolder import load_rgb
from dataset.synthetic import generate_dataset
from entropy_tools import heatmaps, score, visualize
from entropy_model.calibrate import load_entropies
from entropy_model.entropy import IncrementalEntropy, teacher_forced_entropy
from entropy_model.patching import PatchingConfig, patch_starts
from extract_codes import ExtractConfig, extract_codes
from tokenizer.vq_model import VQ_models
from utils.checkpoint import save_checkpoint_atomic
from utils.identity import checkpoint_sha256, code_store_hash, file_sha256

ROOT = Path(__file__).resolve().parents[1]
VOCAB, GRID, IMAGES, VIEWS = 32, 6, 12, 2
T = GRID * GRID
SLICE, BATCH = 6, 4  # 24 sequences -> 4 slices of 2 batches (4 + 2)
BATCHES_PER_SLICE = 2


def entropy_model(seed: int = 0, **kwargs):
    """GPT-T run unconditionally; LlamaGen zero-initialises the head (every entropy ln V), so
    the head and embeddings are redrawn wide enough for entropies to vary."""
    torch.manual_seed(seed)
    config = {"vocab_size": VOCAB, "block_size": T, "model_type": "uncond", **kwargs}
    model = GPT_models["GPT-T"](**config)
    torch.nn.init.normal_(model.output.weight, std=2.0)
    torch.nn.init.normal_(model.tok_embeddings.weight, std=1.0)
    return model.eval()


def save_model(model, path: Path, name: str = "GPT-T") -> Path:
    save_checkpoint_atomic({"model": model.state_dict(),
                            "args": {"gpt_model": name, "model_config": dataclasses.asdict(model.config)}}, path)
    return path


def write_store(path: Path, seed: int = 0, count: int = IMAGES) -> np.ndarray:
    """Code store of random codes with a little structure (runs of repeated codes)."""
    g = np.random.default_rng(seed)
    codes = g.integers(0, VOCAB, size=(count, VIEWS, T))
    repeat = g.random((count, VIEWS, T)) < 0.4
    for t in range(1, T):
        codes[:, :, t] = np.where(repeat[:, :, t], codes[:, :, t - 1], codes[:, :, t])
    writer = CodeStoreWriter.create(path, count, VIEWS, T)
    writer.write(np.arange(count), codes, g.integers(0, 3, size=count))
    writer.finalize({"image_size": GRID * 4, "grid_height": GRID, "grid_width": GRID, "codebook_size": VOCAB,
                     "num_views": VIEWS, "tokenizer_hash": "t" * 64})
    return codes


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("scoring")
    codes = write_store(tmp / "store")
    ckpt = save_model(entropy_model(0), tmp / "entropy.pt")
    return {"tmp": tmp, "store": tmp / "store", "codes": codes, "ckpt": ckpt}


def reference(ckpt: Path, codes: np.ndarray) -> np.ndarray:
    """Teacher-forced entropies of every stored view, float32 (N, views, T)."""
    model, _ = score.load_entropy_model(ckpt)
    flat = torch.from_numpy(codes.reshape(-1, T).astype(np.int64))
    return teacher_forced_entropy(model, flat).numpy().reshape(codes.shape)


def run(setup, out: Path, model=None, **kwargs) -> dict:
    model = model if model is not None else score.load_entropy_model(setup["ckpt"])[0]
    kwargs = {"batch_size": BATCH, "slice_size": SLICE, "progress": False, **kwargs}
    return score.score_code_store(setup["store"], model, file_sha256(setup["ckpt"]), out, **kwargs)


def count_forward_calls(model, crash_after: int | None = None) -> dict:
    """Count the model's forward passes; raise after `crash_after` of them (a killed run)."""
    calls = {"n": 0}
    forward = model.forward

    def wrapped(*args, **kwargs):
        if calls["n"] == crash_after:
            raise KeyboardInterrupt("simulated kill")
        calls["n"] += 1
        return forward(*args, **kwargs)

    model.forward = wrapped
    return calls


def test_scoring_cli_writes_entropies_hashes_and_stats(setup, capsys):
    score.main(["--code-path", str(setup["store"]), "--entropy-ckpt", str(setup["ckpt"]), "--batch-size", "5",
                "--slice-size", "7", "--device", "cpu"])
    assert "written" in capsys.readouterr().out
    entropy = np.load(setup["store"] / "entropy.npy")
    assert entropy.shape == (IMAGES, VIEWS, T) and entropy.dtype == np.float16
    want = reference(setup["ckpt"], setup["codes"])
    # Batch composition may move float32 results by an ulp, which can flip a float16 rounding.
    np.testing.assert_allclose(entropy.astype(np.float32), want.astype(np.float16).astype(np.float32),
                               rtol=2 ** -10, atol=1e-4)
    assert np.mean(entropy == want.astype(np.float16)) > 0.99
    assert entropy.std() > 0.3  # a real spread of entropies, not a constant

    record = json.loads((setup["store"] / "entropy.json").read_text())
    assert record["entropy_model_hash"] == file_sha256(setup["ckpt"])
    assert record["code_store_hash"] == code_store_hash(setup["store"])
    assert (record["count"], record["num_views"], record["T"], record["complete"]) == (IMAGES, VIEWS, T, True)
    assert record["mixed_precision"] == "none" and record["entropy_model"] == "GPT-T"
    values = entropy.astype(np.float64).ravel()
    stats = record["stats"]
    assert stats["num_values"] == values.size
    assert stats["mean"] == pytest.approx(values.mean(), abs=1e-9)
    assert stats["std"] == pytest.approx(values.std(), abs=1e-9)
    assert (stats["min"], stats["max"]) == (values.min(), values.max())
    for q, v in stats["quantiles"].items():
        assert v == np.quantile(values, float(q), method="inverted_cdf")
    edges = np.asarray(stats["histogram"]["bins"])
    assert edges[0] == 0 and edges[-1] == pytest.approx(np.log(VOCAB))
    assert stats["histogram"]["counts"] == np.histogram(np.clip(values, 0, edges[-1]), bins=edges)[0].tolist()
    assert not (setup["store"] / score.PROGRESS_FILE).exists()
    assert not (setup["store"] / score.DONE_MASK_FILE).exists()


def test_load_entropies_refuses_other_model_or_changed_codes(setup, tmp_path):
    store = tmp_path / "store"
    write_store(store, seed=3)
    model = score.load_entropy_model(setup["ckpt"])[0]
    score.score_code_store(store, model, file_sha256(setup["ckpt"]), batch_size=8, progress=False)
    entropy, record = load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))
    assert entropy.shape == (IMAGES, VIEWS, T)
    other = save_model(entropy_model(seed=1), tmp_path / "other.pt")
    with pytest.raises(ValueError, match="entropy model"):
        load_entropies(str(store), code_store_hash(store), file_sha256(other))
    assert record["entropy_file"]["sha256"] == file_sha256(store / "entropy.npy")  # hashed once, at scoring

    ent_path = store / "entropy.npy"  # entropies rewritten after scoring: refused by mtime, or by a re-hash
    before = os.stat(ent_path)
    ent = np.load(ent_path, mmap_mode="r+")
    ent[2, 0, 3] = ent[2, 0, 3] + np.float16(0.5)
    ent.flush()
    del ent
    os.utime(ent_path, ns=(before.st_atime_ns, before.st_mtime_ns))  # mtime restored: only a re-hash sees it
    load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))
    with pytest.raises(ValueError, match="entropy.npy changed after its hash was recorded"):
        load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]), verify=True)
    os.utime(ent_path, ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))
    with pytest.raises(ValueError, match="rescore"):
        load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))

    codes_path = store / "codes.npy"  # codes rewritten in place, same size, later mtime: refused
    before = os.stat(codes_path)
    codes = np.load(codes_path, mmap_mode="r+")
    codes[3, 1, 7] = (int(codes[3, 1, 7]) + 1) % VOCAB
    codes.flush()
    del codes
    os.utime(codes_path, ns=(before.st_atime_ns, max(os.stat(codes_path).st_mtime_ns, before.st_mtime_ns + 10 ** 9)))
    assert os.stat(codes_path).st_size == before.st_size
    with pytest.raises(ValueError, match="code store"):
        load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))


def test_load_entropies_refuses_a_record_without_the_file_hash(setup, tmp_path):
    """A record that does not name entropy.npy's content cannot show that the file is the one
    scored: refused in one line, whatever its other hashes say."""
    store = tmp_path / "store"
    write_store(store, seed=4)
    model = score.load_entropy_model(setup["ckpt"])[0]
    score.score_code_store(store, model, file_sha256(setup["ckpt"]), batch_size=8, progress=False)
    load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))  # precondition: accepted
    record = json.loads((store / "entropy.json").read_text())
    (store / "entropy.json").write_text(json.dumps({k: v for k, v in record.items() if k != "entropy_file"}))
    with pytest.raises(ValueError, match="records no hash of entropy.npy; rescore the code store") as e:
        load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))
    assert "\n" not in str(e.value) and str(store / "entropy.json") in str(e.value)


def test_scoring_refuses_models_that_do_not_fit(setup, tmp_path):
    store = str(setup["store"])
    bad = {
        "conditional": save_model(GPT_models["GPT-T"](vocab_size=VOCAB, block_size=T, num_classes=3),
                                  tmp_path / "c2i.pt"),
        "codebook": save_model(entropy_model(vocab_size=2 * VOCAB), tmp_path / "vocab.pt"),
        "grid": save_model(entropy_model(block_size=64), tmp_path / "grid.pt"),
        "DPAR": save_model(DPAR_models["DPAR-T"](vocab_size=VOCAB, block_size=T, num_classes=3), tmp_path / "dpar.pt",
                           name="DPAR-T"),
    }
    for what, ckpt in bad.items():
        with pytest.raises(SystemExit) as err:
            score.main(["--code-path", store, "--entropy-ckpt", str(ckpt), "--entropy-path", str(tmp_path / what),
                        "--device", "cpu"])
        message = str(err.value)
        assert message.startswith("error:") and "\n" not in message
        assert {"conditional": "class-conditional", "codebook": "codebook size", "grid": "grid",
                "DPAR": "DPAR"}[what] in message


def test_interrupted_scoring_resumes_without_recomputing(setup, tmp_path):
    full = tmp_path / "full"
    model = score.load_entropy_model(setup["ckpt"])[0]
    calls = count_forward_calls(model)
    run(setup, full, model)
    assert calls["n"] == 4 * BATCHES_PER_SLICE
    expected = np.load(full / "entropy.npy")

    out = tmp_path / "resumed"
    model = score.load_entropy_model(setup["ckpt"])[0]
    count_forward_calls(model, crash_after=2 * BATCHES_PER_SLICE + 1)  # dies inside slice 2, half written
    with pytest.raises(KeyboardInterrupt):
        run(setup, out, model)
    assert not (out / "entropy.json").exists()
    assert np.load(out / score.DONE_MASK_FILE).tolist() == [1, 1, 0, 0]
    partial = json.loads((out / score.PROGRESS_FILE).read_text())
    assert partial["complete"] is False and partial["entropy_model_hash"] == file_sha256(setup["ckpt"])

    model = score.load_entropy_model(setup["ckpt"])[0]
    calls = count_forward_calls(model)
    record = run(setup, out, model, slice_size=5)  # a resumed run keeps the first run's slices
    assert calls["n"] == record["batches_run"] == 2 * BATCHES_PER_SLICE  # only slices 2 and 3
    np.testing.assert_array_equal(np.load(out / "entropy.npy"), expected)
    assert record["stats"] == json.loads((full / "entropy.json").read_text())["stats"]

    model = score.load_entropy_model(setup["ckpt"])[0]
    calls = count_forward_calls(model)
    assert run(setup, out, model)["up_to_date"] and calls["n"] == 0


def test_rerun_with_another_model_or_changed_store_starts_over(setup, tmp_path):
    out = tmp_path / "out"
    model = score.load_entropy_model(setup["ckpt"])[0]
    count_forward_calls(model, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        run(setup, out, model)
    other_ckpt = save_model(entropy_model(seed=1), tmp_path / "other.pt")
    other = score.load_entropy_model(other_ckpt)[0]
    calls = count_forward_calls(other)
    record = score.score_code_store(setup["store"], other, file_sha256(other_ckpt), out, BATCH, SLICE,
                                    progress=False)
    assert calls["n"] == 4 * BATCHES_PER_SLICE and record["entropy_model_hash"] == file_sha256(other_ckpt)
    np.testing.assert_array_equal(np.load(out / "entropy.npy"),
                                  reference(other_ckpt, setup["codes"]).astype(np.float16))

    store = tmp_path / "store"
    write_store(store, seed=5)
    model = score.load_entropy_model(setup["ckpt"])[0]
    count_forward_calls(model, crash_after=3)
    with pytest.raises(KeyboardInterrupt):
        score.score_code_store(store, model, file_sha256(setup["ckpt"]), None, BATCH, SLICE, progress=False)
    before = os.stat(store / "codes.npy")
    codes = np.load(store / "codes.npy", mmap_mode="r+")
    codes[0, 0, 0] = (int(codes[0, 0, 0]) + 1) % VOCAB
    codes.flush()
    del codes
    os.utime(store / "codes.npy", ns=(before.st_atime_ns, before.st_mtime_ns + 10 ** 9))
    model = score.load_entropy_model(setup["ckpt"])[0]
    with pytest.raises(ValueError, match="re-extract the code store"):  # changed after extraction
        score.score_code_store(store, model, file_sha256(setup["ckpt"]), None, BATCH, SLICE, progress=False)
    write_store(store, seed=6)  # extracted again: another store, whose rerun starts over
    calls = count_forward_calls(model)
    score.score_code_store(store, model, file_sha256(setup["ckpt"]), None, BATCH, SLICE, progress=False)
    assert calls["n"] == 4 * BATCHES_PER_SLICE
    load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))


def test_torchrun_two_processes_match_single_process(setup, tmp_path):
    single, double = tmp_path / "single", tmp_path / "double"
    run(setup, single)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), "-m", "entropy_tools.score", "--code-path", str(setup["store"]), "--entropy-ckpt", str(setup["ckpt"]),
           "--entropy-path", str(double), "--batch-size", str(BATCH), "--slice-size", str(SLICE), "--device", "cpu"]
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    np.testing.assert_allclose(np.load(double / "entropy.npy").astype(np.float32),
                               np.load(single / "entropy.npy").astype(np.float32), rtol=2 ** -10, atol=1e-4)
    a, b = (json.loads((d / "entropy.json").read_text()) for d in (single, double))
    assert {k: a[k] for k in ("entropy_model_hash", "code_store_hash", "count", "num_views", "T")} == \
           {k: b[k] for k in ("entropy_model_hash", "code_store_hash", "count", "num_views", "T")}
    assert b["stats"]["num_values"] == IMAGES * VIEWS * T


def test_bf16_autocast_scoring_returns_float32_close_to_fp32(setup, tmp_path):
    model = score.load_entropy_model(setup["ckpt"])[0]
    codes = torch.from_numpy(setup["codes"].reshape(-1, T).astype(np.int64))
    fp32 = score.score_batch(model, codes)
    bf16 = score.score_batch(model, codes, torch.bfloat16)
    assert fp32.dtype == bf16.dtype == torch.float32 and bf16.shape == (IMAGES * VIEWS, T)
    assert not torch.equal(bf16, fp32)  # autocast really ran in bf16
    torch.testing.assert_close(bf16, fp32, atol=0.1, rtol=0.05)
    torch.testing.assert_close(fp32, teacher_forced_entropy(model, codes))
    record = run(setup, tmp_path / "bf16", mixed_precision="bf16")
    assert record["mixed_precision"] == "bf16"
    stored = np.load(tmp_path / "bf16" / "entropy.npy").astype(np.float32).reshape(-1, T)
    np.testing.assert_allclose(stored, fp32.numpy(), atol=0.1, rtol=0.05)


def test_incremental_entropies_equal_teacher_forced():
    model = entropy_model(2)
    codes = torch.randint(0, VOCAB, (5, T), generator=torch.Generator().manual_seed(0))
    want = teacher_forced_entropy(model, codes)  # (5, T)
    with IncrementalEntropy(model, batch=5) as scorer:
        got = [scorer.start()] + [scorer.step(codes[:, i - 1], i) for i in range(1, T)]
    got = torch.stack(got, dim=1)  # (5, T)
    assert got.dtype == torch.float32 and want.std() > 0.3
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def _cap_splits(starts: torch.Tensor, cap: int) -> torch.Tensor:
    """(B, T) bool: positions where the open patch already held `cap` tokens (plain loop)."""
    B, n = starts.shape
    out = torch.zeros_like(starts)
    for b in range(B):
        last = 0
        for i in range(1, n):
            out[b, i] = i - last == cap
            if starts[b, i]:
                last = i
    return out


def test_boundary_decisions_are_causal_under_the_entropy_model():
    model = entropy_model(3)
    B, cap = 6, 3
    codes = torch.randint(0, VOCAB, (B, T), generator=torch.Generator().manual_seed(1))
    entropy = teacher_forced_entropy(model, codes)
    tau = float(entropy[:, 1:].median())
    starts = patch_starts(entropy, tau, cap, GRID)
    row_starts = (torch.arange(T) % GRID == 0).expand(B, T)
    gated = starts & ~row_starts & ~_cap_splits(starts, cap)
    assert gated.sum() >= B and (~starts).sum() >= B  # threshold boundaries and merges both occur

    g = torch.Generator().manual_seed(2)
    changed_later = 0
    for k in range(T):
        edited = codes.clone()
        edited[:, k] = (codes[:, k] + torch.randint(1, VOCAB, (B,), generator=g)) % VOCAB
        new_starts = patch_starts(teacher_forced_entropy(model, edited), tau, cap, GRID)
        assert torch.equal(new_starts[:, : k + 1], starts[:, : k + 1]), f"changing token {k} moved an earlier start"
        changed_later += int((new_starts[:, k + 1:] != starts[:, k + 1:]).any())
    assert changed_later > T // 2  # later decisions do depend on the edited token


# ---------------------------------------------------------------------------------------
# Heatmaps
# ---------------------------------------------------------------------------------------
def tiny_vq(codebook_size: int = VOCAB):
    torch.manual_seed(0)
    return VQ_models["VQ-16"](ch=16, ch_mult=[1, 2, 2], z_channels=16, codebook_size=codebook_size,
                              codebook_embed_dim=8, norm_groups=8).eval()  # downsample 4


def contains(figure, pixels: np.ndarray) -> bool:
    """Whether the RGB figure holds `pixels` (h, w, 3) as an exact block somewhere."""
    big = np.asarray(figure.convert("RGB"))
    h, w, _ = pixels.shape
    return any(np.array_equal(big[y:y + h, x:x + w], pixels)
               for y in range(big.shape[0] - h + 1) for x in range(big.shape[1] - w + 1))


def test_heatmaps_for_codes_decode_and_rescore():
    model, vq = entropy_model(4), tiny_vq()
    codes = torch.randint(0, VOCAB, (3, T), generator=torch.Generator().manual_seed(3))
    patching = PatchingConfig("entropy", 1.0, 3, True)
    figures = heatmaps.heatmaps_for_codes(model, vq, codes, patching, GRID, vmin=0.0, vmax=3.0)
    assert len(figures) == 3
    entropy = teacher_forced_entropy(model, codes)
    images = heatmaps.decode_codes(vq, codes, GRID)  # (3, 24, 24, 3)
    assert images.shape == (3, GRID * 4, GRID * 4, 3) and images.dtype == np.uint8
    for b, figure in enumerate(figures):
        want = heatmaps.entropy_heatmap_figure(images[b], entropy[b].reshape(GRID, GRID),
                                                patch_starts(entropy[b:b + 1], 1.0, 3, GRID)[0], GRID, 0.0, 3.0)
        np.testing.assert_array_equal(np.asarray(figure), np.asarray(want))
        assert contains(figure, images[b])
    with pytest.raises(ValueError, match="codes"):
        heatmaps.heatmaps_for_codes(model, tiny_vq(64), codes, patching, GRID)


@pytest.fixture(scope="module")
def extracted(tmp_path_factory):
    """A store made by extract_codes.py from a toy ImageFolder with one unreadable file, scored."""
    tmp = tmp_path_factory.mktemp("figure")
    data = tmp / "data"
    generate_dataset(data, classes=2, per_class=3, size=GRID * 4, seed=0)
    (data / "00_disc" / "1a.png").write_bytes(b"not an image")  # folder index 2, skipped
    vq = tiny_vq()
    vq_ckpt = tmp / "vq.pt"
    torch.save({"model": vq.state_dict(), "args": {"vq_model": "VQ-16", "model_config": dataclasses.asdict(vq.config)}},
               vq_ckpt)
    cfg = ExtractConfig(data_path=str(data), code_path=str(tmp / "store"), vq_ckpt=str(vq_ckpt), vq_model="VQ-16",
                        image_size=GRID * 4, flip=True, batch_size=8, num_workers=0)
    extract_codes(cfg, vq, file_sha256(vq_ckpt))
    ckpt = save_model(entropy_model(5), tmp / "entropy.pt")
    model = score.load_entropy_model(ckpt)[0]
    score.score_code_store(tmp / "store", model, file_sha256(ckpt), progress=False)
    return {"tmp": tmp, "data": data, "store": tmp / "store", "vq": vq, "vq_ckpt": vq_ckpt, "ckpt": ckpt}


def test_visualize_cli_source_images_in_store_order(extracted, capsys):
    out = extracted["tmp"] / "source.png"
    visualize.main(["--code-path", str(extracted["store"]), "--data-path", str(extracted["data"]), "--indices", "2",
                    "--view", "1", "--entropy-ckpt", str(extracted["ckpt"]), "--threshold", "1.0", "--device", "cpu",
                    "--out", str(out)])
    assert "wrote" in capsys.readouterr().out
    figure = Image.open(out)
    source = np.asarray(center_crop_arr(load_rgb(extracted["data"] / "00_disc" / "2.png"), GRID * 4))
    assert contains(figure, np.ascontiguousarray(source[:, ::-1]))  # row 2 = third readable file, flipped view
    assert not contains(figure, source)


def test_visualize_cli_decoded_codes_and_generated_samples(extracted, tmp_path):
    torch.manual_seed(6)
    dpar = DPAR_models["DPAR-T"](vocab_size=VOCAB, block_size=T, num_classes=2)
    torch.nn.init.normal_(dpar.output.weight, std=0.5)
    dpar_ckpt = save_model(dpar, tmp_path / "dpar.pt", name="DPAR-T")
    out = tmp_path / "decoded.png"
    visualize.main(["--code-path", str(extracted["store"]), "--vq-ckpt", str(extracted["vq_ckpt"]),
                    "--indices", "0", "4", "--entropy-ckpt", str(extracted["ckpt"]), "--target-compression", "1.5",
                    "--generate-ckpt", str(dpar_ckpt), "--classes", "0", "1", "--device", "cpu", "--out", str(out)])
    figure = Image.open(out)
    codes = np.load(extracted["store"] / "codes.npy")
    for i in (0, 4):
        assert contains(figure, heatmaps.decode_codes(extracted["vq"], torch.from_numpy(codes[i, 0].astype(np.int64)),
                                                       GRID)[0])
    single = heatmaps.entropy_heatmap_figure(np.zeros((GRID * 4, GRID * 4, 3), np.uint8), np.zeros(T),
                                              np.ones(T, dtype=bool), GRID)
    assert figure.width == 4 * single.width + 3 * 4  # 2 stored + 2 generated panels in one row
    with pytest.raises(SystemExit, match="outside"):
        visualize.main(["--code-path", str(extracted["store"]), "--vq-ckpt", str(extracted["vq_ckpt"]),
                        "--indices", "99", "--device", "cpu", "--out", str(out)])
    other = save_model(entropy_model(seed=7), tmp_path / "other.pt")
    with pytest.raises(SystemExit, match="entropy model"):
        visualize.main(["--code-path", str(extracted["store"]), "--vq-ckpt", str(extracted["vq_ckpt"]),
                        "--entropy-ckpt", str(other), "--device", "cpu", "--out", str(out)])


def test_rehearsal_store_is_accepted_as_scored_entropies(tmp_path):
    """The ImageNet-size rehearsal's writer, tiny: its store and entropies pass the checks
    DPAR training makes (code store identity, entropy model hash, entropy file record), and its
    interrupted state is one the scorer resumes with one small slice left."""
    store = tmp_path / "store"
    written = rehearsal.write_code_store(store, images=40, views=3, grid=4, codebook_size=64, classes=5,
                                         image_size=64, seed=0)
    assert written["manifest"]["codes_sha256"] == file_sha256(store / "codes.npy")
    model_path = tmp_path / "entropy.pt"
    model_hash = rehearsal.write_entropy_model(model_path, 64, 16, seed=0)
    record = rehearsal.write_entropies(store, model_path, model_hash, seed=0)["record"]
    entropy, loaded = load_entropies(str(store), code_store_hash(store, verify=True), checkpoint_sha256(model_path),
                                     verify=True)
    assert loaded == record and entropy.shape == (40, 3, 16)
    assert 0 <= float(entropy.min()) and float(entropy.max()) <= np.log(64) + 1e-2
    assert record["stats"]["num_values"] == entropy.size
    setup = rehearsal.interrupt_scoring(store)
    assert 1 <= setup["left"] < setup["slice_size"] and setup["slices"] == -(-120 // setup["slice_size"])
    model = score.load_entropy_model(model_path)[0]
    calls = count_forward_calls(model)
    result = score.score_code_store(store, model, model_hash, batch_size=64, progress=False)
    assert calls["n"] == 1 and result["batches_run"] == 1 and result["complete"]


# ---------------------------------------------------------------- entropy files under readers, bad values

def one_line(message: str) -> str:
    assert message and "\n" not in message.strip(), message
    return message


def test_rescoring_switches_files_so_a_mapped_reader_keeps_its_entropies(setup, tmp_path):
    """A reader (a training run) that mapped entropy.npy keeps its old values while another
    entropy model rescores the folder, also when that rescoring is interrupted and resumed; the
    new entropy.npy is a new file with the new model's values and identity."""
    out = tmp_path / "out"
    run(setup, out)
    reader = np.load(out / "entropy.npy", mmap_mode="r")
    before = np.array(reader)
    first_inode = os.stat(out / "entropy.npy").st_ino
    np.testing.assert_allclose(before.astype(np.float32), reference(setup["ckpt"], setup["codes"]),
                               rtol=2 ** -10, atol=1e-4)  # the precondition: the first model's values

    other_ckpt = save_model(entropy_model(seed=7), tmp_path / "other.pt")
    other = score.load_entropy_model(other_ckpt)[0]
    count_forward_calls(other, crash_after=BATCHES_PER_SLICE + 1)  # killed inside slice 1
    with pytest.raises(KeyboardInterrupt):
        score.score_code_store(setup["store"], other, file_sha256(other_ckpt), out, BATCH, SLICE, progress=False)
    np.testing.assert_array_equal(reader, before)
    published, record = load_entropies(str(out), code_store_hash(setup["store"]), file_sha256(setup["ckpt"]))
    np.testing.assert_array_equal(published, before)  # still the first model's, and still accepted as such

    other = score.load_entropy_model(other_ckpt)[0]
    calls = count_forward_calls(other)
    record = score.score_code_store(setup["store"], other, file_sha256(other_ckpt), out, BATCH, SLICE,
                                    progress=False)
    assert calls["n"] == 3 * BATCHES_PER_SLICE  # resumed: slice 0 was kept
    np.testing.assert_array_equal(reader, before)  # the mapped old file, unchanged
    assert os.stat(out / "entropy.npy").st_ino != first_inode
    new = np.load(out / "entropy.npy")
    np.testing.assert_allclose(new.astype(np.float32), reference(other_ckpt, setup["codes"]), rtol=2 ** -10, atol=1e-4)
    assert not np.allclose(new.astype(np.float32), before.astype(np.float32), atol=0.05)  # another model indeed
    assert record["entropy_model_hash"] == file_sha256(other_ckpt)
    load_entropies(str(out), code_store_hash(setup["store"]), file_sha256(other_ckpt), verify=True)
    with pytest.raises(ValueError, match="entropy model"):
        load_entropies(str(out), code_store_hash(setup["store"]), file_sha256(setup["ckpt"]))
    assert sorted(p.name for p in out.iterdir()) == ["entropy.json", "entropy.npy"]


def test_scoring_refuses_non_finite_entropies_naming_the_checkpoint(setup, tmp_path, capsys):
    model = entropy_model(3)
    with torch.no_grad():
        model.output.weight[5, :] = float("nan")  # every logit row gets a NaN: NaN entropies
    ckpt = save_model(model, tmp_path / "broken.pt")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as err:
        score.main(["--code-path", str(setup["store"]), "--entropy-ckpt", str(ckpt), "--entropy-path", str(out),
                    "--batch-size", str(BATCH), "--device", "cpu"])
    message = one_line(str(err.value))
    assert str(ckpt) in message and "NaN or infinite" in message
    assert not (out / "entropy.npy").exists() and not (out / "entropy.json").exists()


def test_readers_and_calibration_refuse_non_finite_entropies(setup, tmp_path, monkeypatch):
    from entropy_model import calibrate
    store = tmp_path / "store"
    write_store(store, seed=4)
    run({**setup, "store": store}, None)
    npy = store / "entropy.npy"
    count_non_finite, scans = calibrate.count_non_finite, []
    monkeypatch.setattr(calibrate, "count_non_finite", lambda *a, **k: scans.append(1) or count_non_finite(*a, **k))
    calibrate.calibrate_store(str(store), 1.5, None, 4, True, "entropy", None)  # the precondition: it calibrates
    assert scans == []  # the scorer's record vouches for the file: no scan
    values = np.load(npy)
    values[1, 0, 5] = np.nan
    values[3, 1, 0] = np.inf
    values[7, 0, 9] = -np.inf
    np.save(npy, values)
    with pytest.raises(SystemExit) as err:
        calibrate.main(calibrate.parse_args(["--code-path", str(store), "--target-compression", "1.5"]))
    message = one_line(str(err.value))
    assert str(npy) in message and "3 NaN or infinite" in message and "image 1, view 0, token 5" in message
    with pytest.raises(ValueError, match="3 NaN or infinite"):  # what training reads entropies with
        load_entropies(str(store), code_store_hash(store), file_sha256(setup["ckpt"]))
    assert count_non_finite(values, chunk=7) == (3, int(np.ravel_multi_index((1, 0, 5), values.shape)))
    assert len(scans) == 2


def test_interrupted_scoring_says_a_rerun_continues(setup, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    argv = ["--code-path", str(setup["store"]), "--entropy-ckpt", str(setup["ckpt"]), "--entropy-path", str(out),
            "--batch-size", str(BATCH), "--slice-size", str(SLICE), "--device", "cpu"]
    score_batch, calls = score.score_batch, {"n": 0}

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2 * BATCHES_PER_SLICE + 1:
            raise KeyboardInterrupt
        return score_batch(*args, **kwargs)

    monkeypatch.setattr(score, "score_batch", interrupted)
    with pytest.raises(SystemExit) as err:
        score.main(argv)
    assert err.value.code == 130
    message = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bar's line
    assert message.startswith("interrupted:") and "Traceback" not in message
    assert "2 of 4 slices" in message and "rerun the same command to continue" in message
    monkeypatch.setattr(score, "score_batch", score_batch)
    score.main(argv)
    assert "written" in capsys.readouterr().out
    np.testing.assert_allclose(np.load(out / "entropy.npy").astype(np.float32),
                               reference(setup["ckpt"], setup["codes"]), rtol=2 ** -10, atol=1e-4)


def test_scoring_on_a_full_disk_says_so_and_keeps_the_old_entropies(setup, tmp_path, monkeypatch):
    import errno
    out = tmp_path / "out"
    run(setup, out)
    before = (out / "entropy.npy").read_bytes(), (out / "entropy.json").read_text()

    def full(fd, offset, length):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    other_ckpt = save_model(entropy_model(seed=8), tmp_path / "other.pt")
    with pytest.raises(SystemExit) as err:
        score.main(["--code-path", str(setup["store"]), "--entropy-ckpt", str(other_ckpt), "--entropy-path", str(out),
                    "--device", "cpu"])
    message = one_line(str(err.value))
    assert f"no space left on device for {out / score.PARTIAL_FILE}" in message and "free space and rerun" in message
    assert ((out / "entropy.npy").read_bytes(), (out / "entropy.json").read_text()) == before
    assert not (out / score.PARTIAL_FILE).exists()
