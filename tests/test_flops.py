"""evaluations/flops.py: the counter against hand counts of tiny models, the real-layer path,
patch-count interpolation and distributions, the paper's compute table, the table over image
sizes (paper and assumed compressions) and the CLI."""
import json

import numpy as np
import pytest
import torch

from autoregressive.models.dpar import DPAR_models
from autoregressive.models.gpt import GPT_models
from entropy_model.patching import PatchingConfig
from evaluations.flops import (
    assumed_compression, count_forward_macs, flops_per_image, main, measured_patch_counts, paper_scaling_law,
    resolution_table)

V, C, GRID = 32, 5, 6
T = GRID * GRID
DIM, HIDDEN = 64, 256  # GPT-T / DPAR-T width; SwiGLU hidden = find_multiple(int(2 * 4 * 64 / 3), 256)
BLOCK = DIM * 3 * DIM + DIM * DIM + 3 * DIM * HIDDEN  # wqkv + wo + w1, w3, w2 per position


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_gpt():
    torch.manual_seed(0)
    return GPT_models["GPT-T"](vocab_size=V, block_size=T, num_classes=C).eval()


def tiny_dpar():
    torch.manual_seed(0)
    model = DPAR_models["DPAR-T"](vocab_size=V, block_size=T, num_classes=C).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model


def test_gpt_matches_hand_count():
    idx, cond = torch.randint(0, V, (1, T - 1)), torch.tensor([2])
    count = count_forward_macs(tiny_gpt(), idx, cond)
    assert count.linear == T * (2 * BLOCK + DIM * V)  # every position through both blocks and the head
    assert count.by_group == {"layers": T * 2 * BLOCK, "output": T * DIM * V}
    assert count.attention == 2 * 2 * DIM * T * (T + 1) // 2  # 2 layers, QK^T + AV, causal pairs


def test_dpar_matches_hand_count_and_real_layers():
    model = tiny_dpar()
    lengths = torch.tensor([[3, 1, 2, 4, 2, 1, 3, 3, 2, 3, 4, 1, 3, 2, 2]])  # M = 15 patches, last of 2 tokens
    M = lengths.shape[1]
    assert int(lengths.sum()) == T
    idx, cond = torch.randint(0, V, (1, T - 1)), torch.tensor([4])
    logits_before, _ = model(idx, cond, lengths)
    cheap = count_forward_macs(model, idx, cond, lengths)
    real = count_forward_macs(model, idx, cond, lengths, cheap=False)
    logits_after, _ = model(idx, cond, lengths)
    assert torch.equal(logits_before, logits_after)  # the stand-ins are gone
    assert logits_before.abs().sum() > 0
    expected = {
        "encoder_layers": (T - 1) * BLOCK,
        "patch_cross_attn": M * DIM * DIM + (T - 1) * DIM * 2 * DIM + M * DIM * DIM,  # wq, wkv, wo
        "patch_layers": M * BLOCK,
        "patch_injections": M * DIM * DIM,
        "decoder_layers": T * BLOCK,
        "output": T * DIM * V,
    }
    assert cheap.by_group == expected and cheap.linear == sum(expected.values())
    # causal encoder, patch and decoder layers; the cross-attention scores each of the T-1 tokens once
    attention = 2 * DIM * ((T - 1) * T // 2 + M * (M + 1) // 2 + T * (T + 1) // 2 + (T - 1))
    assert cheap.attention == attention
    assert (real.linear, real.attention, real.by_group) == (cheap.linear, cheap.attention, cheap.by_group)


def test_interpolation_and_distributions():
    common = dict(vocab_size=V, num_classes=C)
    at = {m: flops_per_image("DPAR-T", 96, compression=T / m, **common) for m in (9, 10, 12, 13, 18, 36)}
    # affine in M for the linear layers
    assert at[12]["forward_macs"] - at[10]["forward_macs"] == 2 * (at[10]["forward_macs"] - at[9]["forward_macs"])
    half = flops_per_image("DPAR-T", 96, compression=T / 12.5, **common)
    assert half["forward_macs"] == pytest.approx((at[12]["forward_macs"] + at[13]["forward_macs"]) / 2, rel=1e-12)
    assert half["patches"] == pytest.approx(12.5) and "12 and 13" in half["method"]
    # a measured distribution with more counts than anchors: exact through the quadratic
    counts = [9, 10, 10, 12, 13, 13, 13, 18, 36]
    dist = flops_per_image("DPAR-T", 96, patch_counts=counts, **common)
    for key in ("forward_macs", "attention_macs", "training_flops"):
        assert dist[key] == pytest.approx(np.mean([at[m][key] for m in counts]), rel=1e-12)
    assert dist["patches"] == pytest.approx(np.mean(counts))
    # explicit layouts: averaged per image
    layouts = torch.tensor([[4] * 9 + [0] * 3, [3] * 12])  # zero padded (B, M)
    both = flops_per_image("DPAR-T", 96, lengths=layouts, **common)
    assert both["forward_macs"] == pytest.approx((at[9]["forward_macs"] + at[12]["forward_macs"]) / 2, rel=1e-12)
    with pytest.raises(ValueError, match="DPAR models only"):
        flops_per_image("GPT-T", 96, compression=2.0, **common)
    with pytest.raises(ValueError, match="exactly one"):
        flops_per_image("DPAR-T", 96, **common)


def test_paper_compute_table():
    gpt = flops_per_image("GPT-XL", 384)
    dpar = flops_per_image("DPAR-XL", 384, compression=2.06)
    assert gpt["forward_gmacs"] == pytest.approx(433.6, rel=0.02)
    assert dpar["forward_gmacs"] == pytest.approx(258.5, rel=0.02)
    assert gpt["forward_gmacs"] == pytest.approx(433.4, abs=0.05)  # docs/performance.md: every nn.Linear counted
    assert dpar["forward_gmacs"] == pytest.approx(257.8, abs=0.05)
    assert 1 - dpar["forward_gmacs"] / gpt["forward_gmacs"] == pytest.approx(0.40, abs=0.01)  # "40% less"
    assert gpt["g_positions"] == 576 and dpar["g_positions"] == pytest.approx(576 / 2.06)
    # the GPT runs every linear weight once per position: 6 x matmul params x positions, plus attention
    with torch.device("meta"):
        model = GPT_models["GPT-XL"](block_size=576)
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpt["forward_macs"] == matmul_params * 576
    assert gpt["training_flops"] == 6 * (matmul_params * 576 + gpt["attention_macs"])


def test_measured_distribution_and_cli(tmp_path, capsys):
    store = tmp_path / "store"
    store.mkdir()
    entropy = np.random.default_rng(0).gamma(4.0, 1.5, size=(20, 2, T)).astype(np.float16)  # (N, views, T)
    np.save(store / "entropy.npy", entropy)
    (store / "entropy.json").write_text(json.dumps({"count": 20}))
    rule = PatchingConfig("entropy", 7.0, 3, True)
    counts = measured_patch_counts(str(store), 7.0, 3, True, max_images=None)
    flat = torch.from_numpy(entropy.reshape(-1, T).astype(np.float32))
    assert sorted(counts.tolist()) == sorted(rule.starts(flat, GRID).sum(1).tolist())
    assert len(set(counts.tolist())) > 3

    out = tmp_path / "flops.json"
    main(["--model", "DPAR-T", "--image-size", "96", "--vocab-size", str(V), "--num-classes", str(C),
          "--entropy-path", str(store), "--threshold", "7.0", "--max-patch-length", "3", "--json", str(out)])
    table = capsys.readouterr().out
    assert "forward GMACs/image" in table and "training GFLOPs/image" in table and "positions in the G layers" in table
    result = json.loads(out.read_text())
    direct = flops_per_image("DPAR-T", 96, patch_counts=counts, vocab_size=V, num_classes=C)
    assert result["forward_macs"] == pytest.approx(direct["forward_macs"], rel=1e-12)
    assert result["patches"] == pytest.approx(counts.mean())

    with pytest.raises(SystemExit, match="DPAR models only"):
        main(["--model", "GPT-T", "--image-size", "96", "--compression", "2"])


def test_assumed_compression_passes_through_the_paper_points():
    a, b = paper_scaling_law()
    assert a * 256**b == pytest.approx(256 / 1.81, rel=1e-12) and a * 576**b == pytest.approx(576 / 2.06, rel=1e-12)
    assert 0 < b < 1  # the paper's two points already grow sub-linearly in tokens
    assert assumed_compression(256) == (1.81, "paper") and assumed_compression(384) == (2.06, "paper")
    low, high = assumed_compression(128), assumed_compression(512)
    assert low[1] == high[1] == "assumed" and 1.0 < low[0] < 1.81 < 2.06 < high[0]
    assert 64 / low[0] == pytest.approx(a * 64**b, rel=1e-12) and 1024 / high[0] == pytest.approx(a * 1024**b, rel=1e-12)


def test_resolution_table_is_the_per_image_count(tmp_path, capsys):
    """Every row equals a direct flops_per_image count at its compression; the CLI prints the table."""
    common = dict(vocab_size=V, num_classes=C)
    rows = resolution_table(["GPT-T", "DPAR-T"], [64, 96], [1.5, 2.25], **common)
    assert [(r["model"], r["image_size"], r["compression_source"]) for r in rows] == [
        ("GPT-T", 64, None), ("DPAR-T", 64, "given"), ("GPT-T", 96, None), ("DPAR-T", 96, "given")]
    for r, compression in zip(rows, (None, 1.5, None, 2.25)):
        direct = flops_per_image(r["model"], r["image_size"], compression=compression, **common)
        assert r["forward_macs"] == direct["forward_macs"] and r["training_flops"] == direct["training_flops"]
    assert rows[1]["g_positions"] == pytest.approx(16 / 1.5) and rows[3]["g_positions"] == pytest.approx(36 / 2.25)
    assumed = resolution_table(["DPAR-T"], [64], None, **common)[0]
    assert assumed["compression_source"] == "assumed" and assumed["compression"] == pytest.approx(
        assumed_compression(64)[0])

    out = tmp_path / "table.json"
    main(["--model", "GPT-T", "DPAR-T", "--image-size", "64", "96", "--compression", "1.5", "2.25",
          "--vocab-size", str(V), "--num-classes", str(C), "--json", str(out)])
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | image size |") and len(table) == 2 + 4
    assert "| DPAR-T | 96 px | 36 | 2.250 (given) |" in table[-1]
    assert [r["forward_macs"] for r in json.loads(out.read_text())] == [r["forward_macs"] for r in rows]
    with pytest.raises(SystemExit, match="needs --compression"):
        main(["--model", "GPT-T", "DPAR-T", "--image-size", "64", "96"])


def test_entropy_counts_take_the_paper_rule_by_size(tmp_path):
    """At 512 px the paper's P_max 6 and tau 8.1 apply unasked: entropies below tau leave the
    row resets and the cap, 6 patches per 32-token row; 96 px has no published rule."""
    store = tmp_path / "store512"
    store.mkdir()
    entropy = np.random.default_rng(3).uniform(0.0, 8.0, size=(3, 2, 1024)).astype(np.float16)  # (N, views, T)
    np.save(store / "entropy.npy", entropy)
    (store / "entropy.json").write_text(json.dumps({"count": 3}))
    out = tmp_path / "flops512.json"
    main(["--model", "DPAR-T", "--image-size", "512", "--vocab-size", str(V), "--num-classes", str(C),
          "--entropy-path", str(store), "--json", str(out)])
    assert json.loads(out.read_text())["patches"] == 6 * 32
    with pytest.raises(SystemExit) as info:
        main(["--model", "DPAR-T", "--image-size", "96", "--entropy-path", str(store), "--threshold", "7.0"])
    text = str(info.value)
    assert "no patching setting for 96 px" in text and "--max-patch-length" in text and "\n" not in text
