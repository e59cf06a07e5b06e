"""Evaluation metrics against closed-form / float64 references, the evaluator end to end with a random
Inception, the missing-weights message, and the domain metric on a tiny two-colour ImageFolder."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from evaluations.c2i import evaluator, inception, metrics
from evaluations.c2i.metrics import (
    RunningStatistics,
    feature_statistics,
    frechet_distance,
    inception_score,
    manifold_radii,
    precision_recall,
)
from evaluations import domain_metric

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _random_spd(rng: np.random.Generator, d: int, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d + (0 if rank else 0.1 * np.eye(d))


def _reference_fd(mu1, s1, mu2, s2) -> float:
    """Tr sqrt(S1 S2) = sum sqrt(eig(S1^1/2 S2 S1^1/2)) via symmetric eigendecompositions, float64."""
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return float(np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


# ---------------------------------------------------------------- Fréchet distance


def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    d = 64
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    v1, v2 = rng.uniform(0.1, 3.0, d), rng.uniform(0.1, 3.0, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10, abs=1e-10)


def test_frechet_distance_general_spd_matches_eigendecomposition():
    rng = np.random.default_rng(1)
    for d in (5, 100):
        mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
        s1, s2 = _random_spd(rng, d), _random_spd(rng, d)
        assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-9)
        # symmetric in its arguments, and zero against itself
        assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(frechet_distance(mu1, s1, mu2, s2), rel=1e-9)
        assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8 * np.trace(s1)


def test_frechet_distance_from_features_matches_reference():
    rng = np.random.default_rng(2)
    a = rng.standard_normal((500, 32)) @ rng.standard_normal((32, 32))
    b = rng.standard_normal((400, 32)) * 1.3 + 0.5
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    np.testing.assert_allclose(s1, np.cov(a, rowvar=False), rtol=1e-12)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_distance_singular_covariances():
    rng = np.random.default_rng(3)
    d = 64
    # fewer samples than dimensions: rank-deficient sample covariances (the small-sample FID case)
    a, b = rng.standard_normal((20, d)), rng.standard_normal((30, d)) + 0.2
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    expected = _reference_fd(mu1, s1, mu2, s2)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-6)
    # exactly zero covariances (sets of identical images)
    zeros = np.zeros((4, 4))
    assert frechet_distance(np.ones(4), zeros, np.zeros(4), zeros) == pytest.approx(4.0, abs=1e-5)
    assert frechet_distance(np.ones(4), zeros, np.zeros(4), zeros, method="eigh") == pytest.approx(4.0, abs=1e-12)


def test_frechet_distance_eigh_falls_back_when_torch_does_not_converge(monkeypatch):
    """torch's eigh driver can fail to converge on rank-deficient covariances of a few samples;
    the eigh method then uses SciPy's driver and gives the same distance."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((6, 48)), rng.standard_normal((9, 48)) + 0.3
    (mu1, s1), (mu2, s2) = feature_statistics(a), feature_statistics(b)
    expected = _reference_fd(mu1, s1, mu2, s2)
    calls = []

    def no_convergence(*args, **kwargs):
        calls.append(1)
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    monkeypatch.setattr(torch.linalg, "eigh", no_convergence)
    monkeypatch.setattr(torch.linalg, "eigvalsh", no_convergence)
    assert frechet_distance(mu1, s1, mu2, s2, method="eigh") == pytest.approx(expected, rel=1e-6)
    assert len(calls) == 2  # both eigensolves took the fallback


@pytest.mark.parametrize("failure", ["nan", "wrong_but_finite"])
def test_frechet_distance_eps_fallback(monkeypatch, failure):
    """A failed square root (NaN as old SciPy, or a finite non-root as SciPy >= 1.16 returns for some
    singular inputs) is retried with eps * I added to both covariances, with a warning."""
    rng = np.random.default_rng(4)
    s1, s2 = _random_spd(rng, 6), _random_spd(rng, 6)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    real_sqrtm = metrics.scipy.linalg.sqrtm
    calls = []

    def flaky_sqrtm(matrix):
        calls.append(matrix)
        if len(calls) == 1:
            return np.full_like(matrix, np.nan) if failure == "nan" else np.full_like(matrix, 1e291)
        return real_sqrtm(matrix)

    monkeypatch.setattr(metrics.scipy.linalg, "sqrtm", flaky_sqrtm)
    with pytest.warns(UserWarning, match="eps"):
        value = frechet_distance(mu1, s1, mu2, s2)
    np.testing.assert_allclose(calls[1], (s1 + 1e-6 * np.eye(6)) @ (s2 + 1e-6 * np.eye(6)))
    assert value == pytest.approx(_reference_fd(mu1, s1, mu2, s2), rel=1e-5)


def test_frechet_distance_complex_root():
    rng = np.random.default_rng(5)
    s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
    mu = np.zeros(5)
    root = metrics.scipy.linalg.sqrtm(s1 @ s2).astype(complex)
    small, large = root + 1e-5j * np.eye(5), root + 1e-2j * np.eye(5)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, "_sqrtm_checked", lambda m: (small, True))
        assert frechet_distance(mu, s1, mu, s2) == pytest.approx(_reference_fd(mu, s1, mu, s2), rel=1e-8)
        mp.setattr(metrics, "_sqrtm_checked", lambda m: (large, True))
        with pytest.raises(ValueError, match="imaginary"):
            frechet_distance(mu, s1, mu, s2)


def test_fid_of_a_set_against_itself():
    features = np.random.default_rng(6).standard_normal((300, 128)) * 0.5 + 1.0
    mu, sigma = feature_statistics(features)
    for method in ("sqrtm", "eigh"):
        assert abs(frechet_distance(mu, sigma, mu, sigma, method=method)) < 1e-8


def test_frechet_distance_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="do not match"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_running_statistics_match_np_cov():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((203, 17)) * 3 + 100.0  # large mean: the sum-of-outer-products form must stay exact
    stats = RunningStatistics()
    for i in range(0, len(x), 64):
        stats.update(torch.from_numpy(x[i : i + 64]).float())
    mu, sigma = stats.compute()
    ref = x.astype(np.float32).astype(np.float64)
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False), rtol=1e-8, atol=1e-8)


# ---------------------------------------------------------------- Inception Score


def test_inception_score_limits():
    rng = np.random.default_rng(5)
    assert inception_score(np.zeros((100, 1008)))[0] == pytest.approx(1.0, abs=1e-12)
    assert inception_score(rng.standard_normal((50, 10)) * 0 + 3.0)[0] == pytest.approx(1.0, abs=1e-12)
    k, n = 10, 200
    one_hot_logits = np.full((n, 1008), -200.0)
    one_hot_logits[np.arange(n), np.arange(n) % k] = 200.0
    mean, std = inception_score(one_hot_logits)
    assert mean == pytest.approx(k, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)


def test_inception_score_matches_plain_loop_and_splits():
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((23, 7)) * 2
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    def plain(part):
        marginal = part.mean(0)
        return np.exp(np.mean([np.sum(row * (np.log(row) - np.log(marginal))) for row in part]))

    # ADM: consecutive splits of split_size, the last one keeps the remainder
    expected = [plain(p[0:10]), plain(p[10:20]), plain(p[20:23])]
    mean, std = inception_score(logits, split_size=10)
    assert mean == pytest.approx(np.mean(expected), rel=1e-10) and std == pytest.approx(np.std(expected), rel=1e-8)
    mean, _ = inception_score(logits, split_size=None, num_splits=1)
    assert mean == pytest.approx(plain(p), rel=1e-10)


# ---------------------------------------------------------------- precision / recall


def test_manifold_radii_match_brute_force():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((37, 5))
    d = ((x[:, None] - x[None]) ** 2).sum(-1)
    expected = np.sort(d, axis=1)[:, 3]  # 3rd nearest neighbour, self (index 0) excluded
    radii = manifold_radii(torch.from_numpy(x), k=3, batch_size=8, dtype=torch.float64)
    np.testing.assert_allclose(radii.numpy(), expected, rtol=1e-10)


def test_precision_recall_identical_far_and_brute_force():
    rng = np.random.default_rng(8)
    a = rng.standard_normal((60, 8)).astype(np.float32)
    assert precision_recall(a, a.copy(), batch_size=16) == (1.0, 1.0)
    assert precision_recall(a, a + 100.0) == (0.0, 0.0)
    b = (rng.standard_normal((45, 8)) * 1.5 + 0.7).astype(np.float32)
    # brute force in float64
    ra = np.sort(((a[:, None] - a[None]) ** 2).sum(-1), axis=1)[:, 3]
    rb = np.sort(((b[:, None] - b[None]) ** 2).sum(-1), axis=1)[:, 3]
    dab = ((a[:, None].astype(np.float64) - b[None]) ** 2).sum(-1)  # (60, 45)
    precision = np.mean((dab <= ra[:, None]).any(0))
    recall = np.mean((dab <= rb[None, :]).any(1))
    for dtype in (torch.float32, torch.float64):
        p, r = precision_recall(a, b, batch_size=16, dtype=dtype)
        assert p == pytest.approx(precision, abs=1 / 45 + 1e-9) and r == pytest.approx(recall, abs=1 / 60 + 1e-9)
    assert precision_recall(a, b, batch_size=16, dtype=torch.float64) == pytest.approx((precision, recall))
    p16, r16 = precision_recall(a, b, batch_size=16, dtype=torch.float16)
    assert abs(p16 - precision) <= 2 / 45 and abs(r16 - recall) <= 2 / 60


def test_precision_recall_needs_k_plus_one_points():
    with pytest.raises(ValueError, match="at least 4"):
        precision_recall(np.zeros((3, 2)), np.zeros((10, 2)))


# ---------------------------------------------------------------- Inception network


def test_inception_layout_matches_torchvision_keys():
    torchvision = pytest.importorskip("torchvision")
    ours = {k: tuple(v.shape) for k, v in inception.FIDInceptionV3().state_dict().items()}
    tv = torchvision.models.inception_v3(weights=None, aux_logits=False, init_weights=False, num_classes=1008)
    assert ours == {k: tuple(v.shape) for k, v in tv.state_dict().items()}


def test_tf1_resize_legacy_formula():
    x = np.arange(12.0).reshape(3, 4) ** 1.5
    out = inception.resize_tf1_bilinear(torch.from_numpy(x).float()[None, None], 6)[0, 0]
    # source coordinate i * in / out, no half-pixel offset, upper index clamped (plain-loop reference)
    ref = np.empty((6, 6))
    for i in range(6):
        for j in range(6):
            sy, sx = i * 3 / 6, j * 4 / 6
            y0, x0 = int(np.floor(sy)), int(np.floor(sx))
            y1, x1 = min(y0 + 1, 2), min(x0 + 1, 3)
            fy, fx = sy - y0, sx - x0
            top = x[y0, x0] * (1 - fx) + x[y0, x1] * fx
            bottom = x[y1, x0] * (1 - fx) + x[y1, x1] * fx
            ref[i, j] = top * (1 - fy) + bottom * fy
    np.testing.assert_allclose(out.numpy(), ref, rtol=1e-6)
    same = torch.rand(2, 3, 7, 7)
    assert torch.equal(inception.resize_tf1_bilinear(same, 7), same)
    # differs from torch's half-pixel bilinear (why pytorch-fid's features are not TF-exact)
    upsampled = torch.nn.functional.interpolate(torch.from_numpy(x).float()[None, None], size=(6, 6), mode="bilinear")
    assert not torch.allclose(upsampled[0, 0], out)


@pytest.fixture(scope="module")
def random_inception() -> inception.FIDInceptionV3:
    return inception.load_fid_inception(random_init=True)


def test_inception_outputs_and_spatial_layout(random_inception):
    images = torch.randint(0, 256, (2, 40, 24, 3), dtype=torch.uint8)
    with torch.inference_mode():
        out = random_inception(images)
        x = random_inception.preprocess(images)
        m = random_inception
        for name in ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"]:
            x = getattr(m, name)(x)
        x = torch.nn.functional.max_pool2d(x, 3, 2)
        x = m.Conv2d_4a_3x3(m.Conv2d_3b_1x1(x))
        x = torch.nn.functional.max_pool2d(x, 3, 2)
        x = m.Mixed_6c(m.Mixed_6b(m.Mixed_6a(m.Mixed_5d(m.Mixed_5c(m.Mixed_5b(x))))))
        branch = m.Mixed_6d.branch1x1(x)  # (2, 192, 17, 17)
    assert out.pool.shape == (2, 2048) and out.spatial.shape == (2, 2023) and out.logits.shape == (2, 1008)
    # spatial feature index (h * 17 + w) * 7 + c holds channel c at (h, w): NHWC order
    torch.testing.assert_close(out.spatial.reshape(2, 17, 17, 7), branch[:, :7].permute(0, 2, 3, 1))
    torch.testing.assert_close(out.logits, out.pool @ m.fc.weight.t())  # no bias
    assert torch.isfinite(out.pool).all() and out.pool.std() > 0


def test_missing_weights_message_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(inception.WEIGHTS_ENV, raising=False)
    monkeypatch.setenv(inception.OFFLINE_ENV, "1")
    with pytest.raises(inception.InceptionWeightsError) as info:
        inception.load_fid_inception()
    message = str(info.value)
    assert "\n" not in message and inception.WEIGHTS_FILENAME in message and "--inception-weights" in message
    assert inception.WEIGHTS_URL in message
    # downloads allowed but the network is unreachable: still one line, with the reason
    monkeypatch.delenv(inception.OFFLINE_ENV)

    def unreachable(*args, **kwargs):
        raise OSError("network is unreachable\nsecond line")

    monkeypatch.setattr(inception.torch.hub, "download_url_to_file", unreachable)
    with pytest.raises(inception.InceptionWeightsError, match="download failed") as info:
        inception.resolve_inception_weights()
    assert "\n" not in str(info.value) and inception.WEIGHTS_FILENAME in str(info.value)
    # an explicit path that does not exist is named
    with pytest.raises(inception.InceptionWeightsError, match="no file at"):
        inception.resolve_inception_weights(str(tmp_path / "missing.pth"))


def test_evaluator_cli_missing_weights_is_one_line(tmp_path):
    np.savez(tmp_path / "ref.npz", arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    env = {**os.environ, "TORCH_HOME": str(tmp_path / "th"), inception.OFFLINE_ENV: "1"}
    env.pop(inception.WEIGHTS_ENV, None)
    proc = subprocess.run(
        [sys.executable, "-m", "evaluations.c2i.evaluator", str(tmp_path / "ref.npz"), str(tmp_path / "ref.npz")],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line]
    assert len(lines) == 1 and inception.WEIGHTS_FILENAME in lines[0] and "Traceback" not in proc.stderr


def test_loading_ported_state_dict_names(tmp_path, random_inception):
    # a ported file without BatchNorm counters loads; a foreign layout fails with one line
    state = {k: v for k, v in random_inception.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / inception.WEIGHTS_FILENAME
    torch.save(state, path)
    model = inception.load_fid_inception(str(path))
    torch.testing.assert_close(model.Mixed_7c.branch_pool.conv.weight, random_inception.Mixed_7c.branch_pool.conv.weight)
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="does not match"):
        inception.load_fid_inception(str(tmp_path / "bad.pth"))


# ---------------------------------------------------------------- evaluator end to end


def test_npz_streaming_matches_np_load(tmp_path):
    arr = np.random.default_rng(9).integers(0, 256, (7, 5, 6, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / "x.npz", arr_0=arr)
        batches = list(evaluator.iter_npz_images(str(tmp_path / "x.npz"), batch_size=3))
        assert [len(b) for b in batches] == [3, 3, 1]
        np.testing.assert_array_equal(np.concatenate(batches), arr)


def test_evaluator_end_to_end_random_inception(tmp_path, monkeypatch, random_inception):
    monkeypatch.setattr(evaluator, "load_fid_inception", lambda **kwargs: random_inception)
    rng = np.random.default_rng(10)
    ref = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    sample = np.clip(ref.astype(int) + rng.integers(-40, 40, ref.shape), 0, 255).astype(np.uint8)[:4]
    np.savez(tmp_path / "ref.npz", arr_0=ref)
    np.savez(tmp_path / "sample.npz", arr_0=sample)
    # eigh: the same trace as sqrtm (checked above) at a fraction of the CPU time for 2048 dimensions
    results = evaluator.main([str(tmp_path / "ref.npz"), str(tmp_path / "sample.npz"), "--random-init-inception",
                              "--device", "cpu", "--batch-size", "4", "--fd-method", "eigh"])
    for key in ["inception_score", "fid", "sfid", "precision", "recall"]:
        assert results[key] is not None and np.isfinite(results[key]), key
    assert results["fid"] > 0 and results["sfid"] > 0 and results["inception_score"] >= 1.0 - 1e-9
    assert 0.0 <= results["precision"] <= 1.0 and 0.0 <= results["recall"] <= 1.0
    record = json.loads((tmp_path / "sample_eval.json").read_text())
    assert record["metrics"] == pytest.approx(results) and record["network"].startswith("random-init")
    assert "FID:" in (tmp_path / "sample_eval.txt").read_text()


def test_evaluator_stored_statistics_win(tmp_path, random_inception):
    images = np.random.default_rng(11).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
    mu, sigma = np.arange(2048.0), np.eye(2048)
    np.savez(tmp_path / "both.npz", arr_0=images, mu=mu, sigma=sigma)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    cpu = torch.device("cpu")
    both = evaluator.features_from_npz(str(tmp_path / "both.npz"), random_inception, cpu, 64, keep_logits=True)
    with torch.inference_mode():
        out = random_inception(torch.from_numpy(images))
    assert both.pool_stats[0] is not None and np.array_equal(both.pool_stats[0], mu)  # ADM: stored stats win
    np.testing.assert_allclose(both.spatial_stats[0], out.spatial.double().mean(0).numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(both.pool, out.pool.numpy(), rtol=1e-5, atol=1e-6)  # images still give P/R features
    assert both.logits.shape == (2, 1008) and both.count == 2
    stats_only = evaluator.features_from_npz(str(tmp_path / "stats.npz"), random_inception, cpu, 64, keep_logits=False)
    assert stats_only.pool is None and stats_only.spatial_stats is None and stats_only.count == 0


def test_evaluator_reference_folder_is_cached(tmp_path, monkeypatch, random_inception):
    rng = np.random.default_rng(12)
    for c in range(2):
        os.makedirs(tmp_path / "refs" / f"class{c}")
        for i in range(2):
            Image.fromarray(rng.integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(tmp_path / "refs" / f"class{c}" / f"{i}.png")
    cache = str(tmp_path / "ref_refs_32.npz")
    args = (str(tmp_path / "refs"), 32, random_inception, torch.device("cpu"), 4, cache, "random-init/tf1")
    first = evaluator.reference_from_folder(*args, pr_count=3)
    with np.load(cache) as data:
        assert data["pool_features"].shape == (3, 2048) and data["sigma_s"].shape == (2023, 2023)
    calls = []
    original = evaluator.extract_features
    monkeypatch.setattr(evaluator, "extract_features", lambda *a, **k: calls.append(1) or original(*a, **k))
    second = evaluator.reference_from_folder(*args, pr_count=3)
    assert calls == []  # served from the cache, no network pass
    np.testing.assert_array_equal(second.pool, first.pool)
    np.testing.assert_allclose(second.pool_stats[1], first.pool_stats[1])
    evaluator.reference_from_folder(*args[:-1], "another-network", pr_count=3)
    assert calls == [1]  # a different network invalidates the cache


# ---------------------------------------------------------------- domain metric


@pytest.fixture(scope="module")
def colour_folder(tmp_path_factory):
    """12 red-ish and 12 blue-ish 16x16 noisy images."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(12)
    for name, colour in [("blue", (20, 40, 220)), ("red", (220, 30, 30))]:
        os.makedirs(root / name)
        for i in range(12):
            img = np.clip(np.array(colour) + rng.normal(0, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / name / f"{i}.png")
    return root


def test_domain_metric_train_and_score(colour_folder, tmp_path):
    clf = tmp_path / "clf.pt"
    summary = domain_metric.main(["train", "--data-path", str(colour_folder), "--out", str(clf), "--image-size", "16",
                                  "--epochs", "6", "--batch-size", "8", "--width", "8"])
    assert summary["classifier_held_out_accuracy"] == 1.0 and summary["num_held_out"] == 4
    # score real held-out images (as if they were samples) with their true labels and with swapped labels
    _, checkpoint = domain_metric.load_domain_classifier(str(clf))
    held = domain_metric.load_folder_images(str(colour_folder), checkpoint["held_out"], 16).numpy()
    labels = np.array(checkpoint["held_out_labels"])
    np.savez(tmp_path / "samples.npz", arr_0=held, labels=labels)
    report = domain_metric.main(["score", "--classifier", str(clf), "--samples", str(tmp_path / "samples.npz"),
                                 "--data-path", str(colour_folder)])
    assert report["class_consistency"] == 1.0 and report["classifier_held_out_accuracy"] == 1.0
    assert report["domain_frechet_distance"] == pytest.approx(0.0, abs=1e-4)  # same images (rank-3 covariances)
    assert report["real_vs_real_domain_frechet_distance"] is not None and "not FID" in report["metric"]
    written = json.loads((tmp_path / "samples_domain_metric.json").read_text())
    assert written["class_consistency"] == 1.0
    swapped = domain_metric.score_domain_metric(str(clf), torch.from_numpy(held), 1 - labels, str(colour_folder))
    assert swapped["class_consistency"] == 0.0
    # float (N, 3, H, W) [-1, 1] input at another size is resized; solid green is far from both classes
    green = torch.zeros(4, 3, 24, 24)
    green[:, 1] = 1.0
    off = domain_metric.score_domain_metric(str(clf), green * 2 - 1, np.zeros(4), str(colour_folder))
    assert off["domain_frechet_distance"] > 3 * report["real_vs_real_domain_frechet_distance"] > 0
    assert off["num_real_for_floor"] == 4
    # the floor draws real training images with the samples' class histogram, capped by what exists
    floor = domain_metric._class_matched_subset(checkpoint["train"], checkpoint["train_labels"],
                                                torch.tensor([0] * 20 + [1]), seed=0)
    assert len(floor) == 11 and sum(p.startswith("blue/") for p in floor) == 10



def test_classifier_blur_augmentation_matches_plain_loop_reference():
    torch.manual_seed(4)
    x = torch.rand(2, 3, 9, 11, dtype=torch.float64) * 2 - 1
    sigma = 1.3
    out = domain_metric._gaussian_blur(x, sigma)
    r = int(np.ceil(2 * sigma))
    w = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    w /= w.sum()
    ref = np.zeros(x.shape)
    xn = x.numpy()
    H, W = x.shape[-2:]
    reflect = lambda i, n: -i if i < 0 else 2 * (n - 1) - i if i >= n else i
    for i in range(H):
        for j in range(W):
            for a in range(-r, r + 1):
                for b in range(-r, r + 1):
                    ref[:, :, i, j] += w[a + r] * w[b + r] * xn[:, :, reflect(i + a, H), reflect(j + b, W)]
    assert np.allclose(out.numpy(), ref, atol=1e-12)
    flat = torch.full((1, 3, 8, 8), 0.3, dtype=torch.float64)
    assert torch.allclose(domain_metric._gaussian_blur(flat, 0.8), flat)  # constant images stay constant
    batch = torch.rand(64, 3, 16, 16) * 2 - 1
    aug = domain_metric._augment(batch, torch.Generator().manual_seed(0))
    assert aug.shape == batch.shape and aug.min() >= -1 and aug.max() <= 1


def test_domain_metric_bad_inputs(colour_folder, tmp_path):
    np.savez(tmp_path / "nolabels.npz", arr_0=np.zeros((2, 16, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        domain_metric.read_samples_npz(str(tmp_path / "nolabels.npz"))
    with pytest.raises(ValueError, match="not found"):
        domain_metric.load_domain_classifier(str(tmp_path / "missing.pt"))
