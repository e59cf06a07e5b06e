"""Patch boundaries, lengths and geometry against plain-loop references; calibration,
stored-entropy checks, the batch builder and the entropy figure."""
import json

import numpy as np
import pytest
import torch

from entropy_model import calibrate, stats
from entropy_model.calibrate import (
    compression_for_threshold,
    compression_table,
    load_entropies,
    threshold_for_compression,
)
from entropy_model.patching import (
    PatchingConfig,
    build_patch_batch,
    patch_geometry,
    patch_ids_from_starts,
    patch_lengths_from_starts,
    patch_starts,
    quantize_entropy,
    starts_from_lengths,
)
from entropy_tools.heatmaps import entropy_heatmap_figure, save_figure_grid
from utils.identity import record_file

MAX_ENTROPY = float(np.log(16384))


def random_entropies(B, T, seed, dtype=torch.float32):
    """Entropies in [0, ln 16384] with smooth stretches (runs of low entropy) plus noise."""
    g = torch.Generator().manual_seed(seed)
    base = torch.rand(B, T // 4 + 1, generator=g).repeat_interleave(4, dim=1)[:, :T]
    e = (0.7 * base + 0.3 * torch.rand(B, T, generator=g)) * MAX_ENTROPY
    return e.to(dtype)


def reference_starts(entropy_row, tau, cap, width, mode):
    """Obviously-correct loop: returns (starts, reasons) for one sequence."""
    q = [np.float32(np.float16(x)) for x in np.asarray(entropy_row, dtype=np.float32)]
    tau32 = np.float32(tau) if tau is not None else None
    starts, reasons, open_len = [], [], 0
    for i in range(len(q)):
        why = set()
        if i == 0:
            why.add("first")
        else:
            if mode == "token":
                why.add("token")
            elif mode == "entropy" and q[i] > tau32:
                why.add("gate")
            elif mode == "relative" and (q[i] - q[i - 1]) > tau32:
                why.add("gate")
            if width is not None and i % width == 0:
                why.add("row")
            if cap is not None and open_len == cap:
                why.add("cap")
        start = bool(why)
        open_len = 1 if start else open_len + 1
        starts.append(start)
        reasons.append(why)
    return starts, reasons


def reference_lengths(starts_row):
    lengths = []
    for s in starts_row:
        if s:
            lengths.append(1)
        else:
            lengths[-1] += 1
    return lengths


GRIDS = [(8, 8), (5, 12)]  # (height, width)
CAPS = [None, 1, 3, 4]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("mode", ["entropy", "relative", "token", "static"])
def test_patch_starts_matches_reference_loop(dtype, mode):
    reasons_seen = set()
    for gi, (h, w) in enumerate(GRIDS):
        entropy = random_entropies(6, h * w, seed=10 + gi, dtype=dtype)
        if mode == "entropy":  # entropies that occur: some equal tau exactly (the gate is e > tau)
            q = quantize_entropy(entropy).numpy()
            taus = [float(x) for x in np.quantile(q, [0.3, 0.6, 0.9], method="lower")]
            assert all((q == tau).any() for tau in taus)
        elif mode == "relative":
            taus = [-1.0, 0.0, 2.5]
        else:
            taus = [None]
        caps = [1, 3, 4] if mode == "static" else CAPS
        for tau in taus:
            for cap in caps:
                for width in (w, None):
                    got = patch_starts(entropy, tau, cap, width, mode)
                    assert got.dtype == torch.bool and got.shape == entropy.shape
                    for b in range(entropy.shape[0]):
                        want, why = reference_starts(entropy[b].float().numpy(), tau, cap, width, mode)
                        assert got[b].tolist() == want, (mode, tau, cap, width, b)
                        reasons_seen |= {frozenset(r) for r in why}
                    if mode in ("token", "static"):
                        alone = patch_starts(None, None, cap, width, mode, shape=tuple(entropy.shape))
                        assert torch.equal(alone, got)
    if mode in ("entropy", "relative"):
        # Preconditions: the gate alone opens patches (not a row start, not a cap split),
        # and so do the row reset and the cap on their own.
        assert {frozenset({"gate"}), frozenset({"row"}), frozenset({"cap"})} <= reasons_seen


def test_rows_open_patches_at_different_positions():
    entropy = random_entropies(6, 64, seed=3)
    starts = patch_starts(entropy, 6.0, 4, 8)
    assert len({tuple(r) for r in starts.tolist()}) == entropy.shape[0]
    # All three rules matter for this data: removing any one changes the patches.
    assert not torch.equal(starts, patch_starts(entropy, 6.0, None, 8))
    assert not torch.equal(starts, patch_starts(entropy, 6.0, 4, None))
    assert not torch.equal(starts, patch_starts(entropy, 1e9, 4, 8))


@pytest.mark.parametrize("cap", [None, 2, 4])
@pytest.mark.parametrize("row_reset", [True, False])
def test_lengths_invariants_and_round_trips(cap, row_reset):
    h, w = 6, 10
    entropy = random_entropies(9, h * w, seed=7)
    starts = patch_starts(entropy, 5.0, cap, w if row_reset else None)
    lengths = patch_lengths_from_starts(starts)
    ids = patch_ids_from_starts(starts)
    assert lengths.dtype == torch.int64 and lengths.shape == (9, int(starts.sum(1).max()))
    assert torch.all(lengths.sum(1) == h * w)
    assert torch.equal((lengths > 0).sum(1), starts.sum(1))
    if cap is not None:
        assert int(lengths.max()) <= cap
    row, col_start, col_end = patch_geometry(lengths, w)
    first = lengths.cumsum(1) - lengths
    last_row = (first + lengths - 1) // w
    real = lengths > 0
    if row_reset:
        assert torch.equal(row[real], last_row[real])  # no patch crosses a row
    else:
        assert bool((last_row[real] > row[real]).any())  # some patch does cross
    for b in range(9):
        want = reference_lengths(starts[b].tolist())
        assert lengths[b].tolist() == want + [0] * (lengths.shape[1] - len(want))
        assert ids[b].tolist() == [m for m, n in enumerate(want) for _ in range(n)]
    assert torch.equal(starts_from_lengths(lengths), starts)
    assert torch.equal(patch_lengths_from_starts(starts_from_lengths(lengths)), lengths)
    padded = patch_lengths_from_starts(starts, num_patches=h * w)
    assert padded.shape == (9, h * w) and torch.equal(padded[:, : lengths.shape[1]], lengths)


def test_patch_geometry_matches_loop():
    w = 7
    entropy = random_entropies(5, 6 * w, seed=11)
    for row_width in (w, None):
        lengths = patch_lengths_from_starts(patch_starts(entropy, 4.0, 5, row_width))
        row, col_start, col_end = patch_geometry(lengths, w)
        for b in range(lengths.shape[0]):
            t = 0
            for m, n in enumerate(lengths[b].tolist()):
                want = (t // w, t % w, (t + n - 1) % w) if n else (0, 0, 0)
                assert (row[b, m].item(), col_start[b, m].item(), col_end[b, m].item()) == want
                t += n


def test_float16_rounding_decides_boundaries():
    tau = 7.796875  # exactly representable in float16; the next float16 value is 7.80078125
    just_above = 7.797  # > tau in float32, rounds to tau in float16
    assert just_above > tau and float(np.float16(just_above)) == tau
    e32 = torch.tensor([[1.0, just_above, 1.0, 7.8008, 1.0]], dtype=torch.float32)
    starts = patch_starts(e32, tau)
    assert starts.tolist() == [[True, False, False, True, False]]
    assert torch.equal(patch_starts(e32.half(), tau), starts)  # stored float16 gives the same
    assert bool((e32.float() > tau)[0, 1])  # without rounding it would have opened a patch
    assert torch.equal(patch_starts(e32.double(), tau), starts)


def test_bad_inputs_raise_one_line_errors():
    e = random_entropies(2, 16, seed=0)
    for call in (
        lambda: patch_starts(e, 1.0, mode="bogus"),
        lambda: patch_starts(e, None),
        lambda: patch_starts(e, 1.0, max_patch_length=0),
        lambda: patch_starts(None, None, 4, mode="static"),
        lambda: patch_starts(e, None, mode="static"),
        lambda: patch_lengths_from_starts(torch.zeros(2, 4, dtype=torch.bool)),
        lambda: starts_from_lengths(torch.tensor([[2, 2], [3, 2]])),
        lambda: starts_from_lengths(torch.tensor([[2, 0, 2]])),
        lambda: PatchingConfig(mode="static", max_patch_length=None),
        lambda: PatchingConfig.from_dict({"mode": "entropy", "tau": 1.0}),
    ):
        with pytest.raises(ValueError) as info:
            call()
        assert "\n" not in str(info.value)


def test_patching_config_dict_round_trip():
    entropy = random_entropies(4, 64, seed=5)
    for config in (
        PatchingConfig(),
        PatchingConfig("relative", 0.5, None, False),
        PatchingConfig("static", None, 4, True),
        PatchingConfig("token", None, None, False),
    ):
        d = config.to_dict()
        assert json.loads(json.dumps(d)) == d
        again = PatchingConfig.from_dict(d)
        assert again == config
        want = patch_starts(entropy, config.threshold, config.max_patch_length, 8 if config.row_reset else None, config.mode)
        assert torch.equal(again.starts(entropy, 8), want)
        assert torch.equal(again.lengths(entropy, 8), patch_lengths_from_starts(want))
    static = PatchingConfig("static", None, 4, True).lengths(None, 6, shape=(2, 36))
    assert static[0].tolist() == [4, 2] * 6


@pytest.mark.parametrize("target", [1.5, 1.81, 2.06])
def test_calibration_hits_target_compression(target):
    entropy = random_entropies(256, 256, seed=21)
    tau, achieved = threshold_for_compression(entropy, target, 4, 16)
    assert abs(achieved - target) / target < 0.02
    assert compression_for_threshold(entropy, tau, 4, 16) == pytest.approx(achieved, rel=1e-12)
    starts = patch_starts(entropy, tau, 4, 16)
    assert entropy.numel() / int(starts.sum()) == pytest.approx(achieved, rel=1e-12)


def test_calibration_relative_mode_and_table_monotone():
    entropy = random_entropies(128, 256, seed=22)
    tau, achieved = threshold_for_compression(entropy, 1.6, None, 16, mode="relative")
    assert abs(achieved - 1.6) / 1.6 < 0.02
    taus = calibrate.default_taus(entropy) + [-1.0, 20.0]
    table = compression_table(entropy, taus, 4, 16)
    values = [r["compression"] for r in table]
    assert [r["threshold"] for r in table] == sorted(taus)
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert values[0] == pytest.approx(1.0) and values[-1] == pytest.approx(4.0)  # all gates / cap only
    assert len(set(values)) > 5


def write_store(path, entropy, grid=(8, 8), count=None, code_hash="c" * 64, model_hash="m" * 64):
    path.mkdir(parents=True, exist_ok=True)
    np.save(path / "entropy.npy", entropy.astype(np.float16))
    (path / "entropy.json").write_text(json.dumps(
        {"entropy_model_hash": model_hash, "code_store_hash": code_hash,
         "count": entropy.shape[0] if count is None else count, "stats": {},
         "entropy_file": record_file(path / "entropy.npy")}))
    (path / "manifest.json").write_text(json.dumps(
        {"image_size": grid[0] * 16, "grid_height": grid[0], "grid_width": grid[1], "codebook_size": 16384,
         "num_views": entropy.shape[1], "count": entropy.shape[0], "tokenizer_hash": "t" * 64}))


def test_load_entropies_refuses_other_codes_or_model(tmp_path):
    values = random_entropies(10, 2 * 64, seed=1).numpy().reshape(10, 2, 64)
    write_store(tmp_path / "s", values)
    entropy, info = load_entropies(str(tmp_path / "s"), "c" * 64, "m" * 64)
    assert isinstance(entropy, np.memmap) and entropy.shape == (10, 2, 64) and entropy.dtype == np.float16
    np.testing.assert_array_equal(entropy, values.astype(np.float16))
    assert load_entropies(str(tmp_path / "s"), "c" * 64)[1]["count"] == 10
    for args in (("d" * 64,), ("c" * 64, "n" * 64)):
        with pytest.raises(ValueError) as err:
            load_entropies(str(tmp_path / "s"), *args)
        assert "\n" not in str(err.value) and "rescore" in str(err.value)
    write_store(tmp_path / "bad", values, count=11)
    with pytest.raises(ValueError):
        load_entropies(str(tmp_path / "bad"), "c" * 64)
    with pytest.raises(FileNotFoundError):
        load_entropies(str(tmp_path / "missing"), "c" * 64)


def test_batch_builder_matches_per_sample_reference():
    B, h, w = 7, 6, 6
    g = np.random.default_rng(0)
    codes = g.integers(0, 16384, size=(B, h * w)).astype(np.uint16)
    labels = g.integers(0, 1000, size=B)
    entropy = random_entropies(B, h * w, seed=9, dtype=torch.float16).numpy()
    config = PatchingConfig("entropy", 5.5, 3, True)
    out = build_patch_batch({"codes": codes, "labels": labels, "entropy": entropy}, config, w)
    assert set(out) == {"tokens", "labels", "patch_lengths"}
    assert out["tokens"].dtype == torch.int64 and np.array_equal(out["tokens"].numpy(), codes.astype(np.int64))
    assert out["labels"].tolist() == labels.tolist()
    M = out["patch_lengths"].shape[1]
    for b in range(B):
        want = reference_lengths(reference_starts(entropy[b], 5.5, 3, w, "entropy")[0])
        assert out["patch_lengths"][b].tolist() == want + [0] * (M - len(want))
    assert M == max(len(reference_lengths(reference_starts(entropy[b], 5.5, 3, w, "entropy")[0])) for b in range(B))
    samples = [{"codes": codes[b], "labels": int(labels[b]), "entropy": entropy[b]} for b in range(B)]
    stacked = {k: np.stack([s[k] for s in samples]) for k in samples[0]}  # what a DataLoader's collate hands over
    again = build_patch_batch(stacked, config, w)
    for k in out:
        assert torch.equal(again[k], out[k])
    static = build_patch_batch({"codes": codes, "labels": labels}, PatchingConfig("static", None, 4, True), w)
    assert static["patch_lengths"].tolist() == [[4, 2] * h] * B
    with pytest.raises(ValueError):
        build_patch_batch({"codes": codes, "labels": labels}, config, w)


def test_calibrate_and_stats_clis(tmp_path, capsys):
    for name, grid in (("s16", (16, 16)), ("s24", (24, 24))):
        T = grid[0] * grid[1]
        write_store(tmp_path / name, random_entropies(40, T, seed=T).numpy().reshape(20, 2, T), grid=grid)
    out = tmp_path / "calib.json"
    calibrate.main(calibrate.parse_args(
        ["--code-path", str(tmp_path / "s16"), "--target-compression", "1.81", "--json", str(out)]))
    report = json.loads(out.read_text())
    assert abs(report["compression"] - 1.81) / 1.81 < 0.02 and report["grid_width"] == 16
    assert sum(int(k) * v for k, v in report["length_histogram"].items()) == 40 * 256
    assert "compression" in capsys.readouterr().out
    out = tmp_path / "stats.json"
    stats.main(stats.parse_args(
        ["--code-path", str(tmp_path / "s16"), str(tmp_path / "s24"), "--threshold", "5.0",
         "--batch-size", "8", "--json", str(out)]))
    rows = json.loads(out.read_text())["stores"]
    assert [r["tokens_per_image"] for r in rows] == [256, 576] and rows[1]["grid"] == [24, 24]
    for r, T in zip(rows, (256, 576)):
        assert r["compression"] == pytest.approx(T / r["patches_per_image"])
        assert r["padded_patches_per_image"] >= r["patches_per_image"]
        assert sum(r["token_share_by_length"].values()) == pytest.approx(1.0)
    assert "T/M" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        calibrate.main(calibrate.parse_args(["--code-path", str(tmp_path / "missing")]))


def test_entropy_heatmap_figure():
    h = w = 8
    g = np.random.default_rng(0)
    image = g.integers(0, 256, size=(64, 64, 3), dtype=np.uint8)
    entropy = random_entropies(1, h * w, seed=2)
    lengths = patch_lengths_from_starts(patch_starts(entropy, 5.0, 4, w))[0]
    outline = (255, 0, 255)  # magenta never occurs in viridis
    fig = entropy_heatmap_figure(image, entropy[0].reshape(h, w), lengths, w, outline=outline, margin=8)
    assert fig.mode == "RGB" and fig.width == 64 + 16 and fig.height > 2 * 64 + 16
    pixels = np.asarray(fig)
    y0 = next(y for y in range(fig.height) if np.array_equal(pixels[y, 8:72], image[0]))  # image row 0
    np.testing.assert_array_equal(pixels[y0 : y0 + 64, 8:72], image)
    heat = pixels[y0 + 64 + 8 : y0 + 128 + 8, 8:72]
    is_outline = np.all(heat == outline, axis=-1)
    assert is_outline.any() and not is_outline.all()
    # Outlines sit on token-cell edges (pixel offsets 0 in an 8-pixel cell), nowhere else.
    ys, xs = np.nonzero(is_outline)
    assert np.all((ys % 8 == 0) | (xs % 8 == 0))
    colours = {tuple(c) for c in heat[~is_outline].reshape(-1, 3)}
    assert len(colours) >= 10
    # Starts give the same figure as lengths; a shared colour range changes the heatmap.
    starts = starts_from_lengths(lengths[None])[0]
    assert np.array_equal(np.asarray(entropy_heatmap_figure(image, entropy[0].reshape(h, w), starts, w,
                                                            outline=outline)), pixels)
    other = entropy_heatmap_figure(image, entropy[0].numpy(), lengths, w, vmin=0.0, vmax=20.0)
    assert other.size == fig.size and not np.array_equal(np.asarray(other), pixels)
    grid = save_figure_grid([fig, other, fig], None, columns=2, spacing=4)
    assert grid.size == (2 * fig.width + 4, 2 * fig.height + 4)
