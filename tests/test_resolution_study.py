"""The resolution study's pure parts (demo/resolution_study.py): the power-law fit, the same scenes
at every size, the fit over the sizes' rows, the stage list (one shared tokenizer) and the figure."""
import numpy as np
import pytest

from dataset.synthetic import FAMILIES, render_image
from demo.resolution_study import (
    ResolutionStudy, fit_power_law, scaling_figure, scaling_markdown, scaling_result, study_config)


def test_fit_recovers_a_power_law_and_matches_plain_least_squares():
    tokens = np.array([64.0, 144.0, 256.0, 576.0])
    exact = fit_power_law(tokens, 3.5 * tokens**0.8)
    assert exact["exponent"] == pytest.approx(0.8, abs=1e-12) and exact["prefactor"] == pytest.approx(3.5, rel=1e-12)
    assert exact["r2"] == pytest.approx(1.0, abs=1e-12) and exact["exponent_se"] == pytest.approx(0.0, abs=1e-9)
    rng = np.random.default_rng(11)
    patches = 0.7 * tokens**0.9 * np.exp(rng.normal(0.0, 0.05, tokens.size))  # fresh noise
    x, y = np.log(tokens), np.log(patches)
    slope = sum((a - x.mean()) * (b - y.mean()) for a, b in zip(x, y)) / sum((a - x.mean()) ** 2 for a in x)
    fit = fit_power_law(tokens.tolist(), patches.tolist())
    assert fit["exponent"] == pytest.approx(slope, rel=1e-10) and 0.9 < fit["r2"] < 1.0
    residual = y - (y.mean() + slope * (x - x.mean()))
    se = (sum(r * r for r in residual) / 2 / sum((a - x.mean()) ** 2 for a in x)) ** 0.5  # n - 2 = 2 dof
    assert fit["exponent_se"] == pytest.approx(se, rel=1e-8) and fit["exponent_se"] > 0
    assert fit["prefactor"] == pytest.approx(np.exp(y.mean() - slope * x.mean()), rel=1e-10)
    with pytest.raises(ValueError):
        fit_power_law([64, 64], [30, 31])


def test_same_scenes_at_every_size():
    """An image drawn at 96 px, box-averaged to 32 px, is the 32 px image up to antialiasing; another
    index of the same class is not."""
    c = study_config()
    style = (c.colours, c.flat_share, tuple(c.radius))
    for k in range(c.classes):
        for i in range(3):
            low, _ = render_image(FAMILIES[k], 32, np.random.default_rng([c.seed, k, i]), *style)
            high, _ = render_image(FAMILIES[k], 96, np.random.default_rng([c.seed, k, i]), *style)
            other, _ = render_image(FAMILIES[k], 32, np.random.default_rng([c.seed, k, i + 3]), *style)
            down = high.astype(np.float64).reshape(32, 3, 32, 3, 3).mean(axis=(1, 3))  # (32, 32, 3)
            assert np.abs(down - low).mean() < 4.0, (FAMILIES[k], i)
            assert np.abs(other.astype(np.float64) - low).mean() > 10.0, (FAMILIES[k], i)


def rows(patches):
    tokens = [64, 144, 256, 576]
    return [{"image_size": 32 + 16 * n, "grid": [int(t**0.5)] * 2, "tokens": t, "patches": p, "compression": t / p,
             "threshold": 2.5, "max_patch_length": 4, "sequences": 720, "detailed_share": 0.3, "mean_entropy": 1.0}
            for n, (t, p) in enumerate(zip(tokens, patches))]


def test_scaling_result_and_its_outputs():
    result = scaling_result(rows([35.4, 62.0, 95.0, 170.0]))
    assert result["exponent"] + 2 * result["exponent_se"] < 1 and result["sub_quadratic"]
    assert result["side_exponent"] == 2 * result["exponent"]
    assert result["calibrated_at"] == 32 and result["threshold"] == 2.5
    linear = scaling_result(rows([32.0, 72.0, 128.0, 288.0]))
    assert linear["exponent"] == pytest.approx(1.0) and not linear["sub_quadratic"]
    noisy = scaling_result(rows([30.0, 75.0, 100.0, 260.0]))  # below 1, but not by two standard errors
    assert noisy["exponent"] < 1 < noisy["exponent"] + 2 * noisy["exponent_se"] and not noisy["sub_quadratic"]
    mixed = rows([35.4, 62.0, 95.0, 170.0])
    mixed[2]["threshold"] = 3.0
    with pytest.raises(ValueError, match="different thresholds"):
        scaling_result(mixed)
    table = scaling_markdown(result)
    assert table.count("\n| ") == 5 and f"tokens^{result['exponent']:.3f}" in table
    figure = scaling_figure(result)
    pixels = np.asarray(figure)
    assert figure.size == (640, 440) and (pixels != 255).any(axis=-1).mean() > 0.01  # something is drawn


def test_stages_share_one_tokenizer(tmp_path):
    study = ResolutionStudy(study_config([32, 48, 64, 96], device="cpu"), tmp_path)
    stages = {s.name: s for s in study.stages()}
    assert [n for n in stages if n.startswith("vq_")] == ["vq_32"]
    for size in (32, 48, 64, 96):
        assert list(stages[f"codes_{size}"].deps) == [f"data_{size}", "vq_32"]
        assert study.paths.vq_dir(size) == tmp_path.resolve() / "vq"
        assert f"entropy_model_{size}" in stages  # one entropy model per token grid
    assert list(stages["scaling"].deps) == [f"analysis_{s}" for s in (32, 48, 64, 96)]
    assert stages["analysis_32"].params["target_compression"] == 1.81
    assert stages["analysis_96"].params["target_compression"] is None  # the 32 px tau, held fixed
    with pytest.raises(ValueError, match="increasing"):
        study_config([64, 32])
