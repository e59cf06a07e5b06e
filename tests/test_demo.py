"""The offline demo end to end at the tiny preset: interrupted during training, resumed, rerun.

One module-scoped run (about two minutes on 2 cores): the first invocation is interrupted
(SIGINT to its process group, as Ctrl-C) once training starts; the second must skip the
finished stages, resume training and write the report; the third must skip everything and
change no output. The checks recompute what they can from the stored files.
"""
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
STAGE_LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+)\s+(skipped|running|resuming|done in)")
FIGURES = ("samples.png", "heatmaps_real.png", "heatmaps_generated.png", "loss_vs_step.png", "loss_vs_flops.png")


# Python turns SIGINT into KeyboardInterrupt only if it did not inherit SIGINT ignored, and
# pytest started with `&` from a non-interactive shell passes it on ignored: the interrupted
# run installs the handler itself, as a demo started from a terminal has it.
CTRL_C_ENABLED = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                  "runpy.run_module('demo', run_name='__main__', alter_sys=True)")


def demo_cmd(out: Path, *extra: str, launch: tuple = ("-m", "demo")) -> list:
    return [sys.executable, *launch, "--tiny", "--out", str(out), "--device", "cpu", *extra]


def run_demo(out: Path, *extra: str) -> str:
    proc = subprocess.run(demo_cmd(out, *extra), cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc.stdout


def stage_states(stdout: str) -> dict:
    """stage name -> first state word printed for it (skipped / running / resuming)."""
    states = {}
    for line in stdout.splitlines():
        m = STAGE_LINE.match(line)
        if m and m.group(3) not in states:
            states[m.group(3)] = m.group(4)
    return states


def digests(out: Path) -> dict:
    files = [out / "report.md", out / "report.json", *sorted((out / "samples").glob("*")),
             *sorted((out / "figures").glob("*.png")), *sorted((out / "eval").glob("*"))]
    return {str(f.relative_to(out)): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    # 1. interrupted once training has started
    proc = subprocess.Popen(demo_cmd(out, launch=("-c", CTRL_C_ENABLED)), cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    first = []
    deadline = time.time() + 900
    for line in proc.stdout:
        first.append(line)
        if re.match(r"^\[\d+/\d+\] train\s+running", line):
            time.sleep(3)
            os.killpg(proc.pid, signal.SIGINT)
            break
        assert time.time() < deadline, "the demo did not reach the training stage"
    first.append(proc.stdout.read())
    code = proc.wait(timeout=300)
    # 2. resumed; 3. rerun with nothing to do
    second = run_demo(out)
    before = digests(out)
    third = run_demo(out)
    return {"out": out, "first": "".join(first), "first_code": code, "second": second, "third": third,
            "before": before, "after": digests(out)}


def test_interrupted_run_resumes_without_redoing_finished_stages(demo_run):
    assert demo_run["first_code"] != 0
    first = stage_states(demo_run["first"])
    second = stage_states(demo_run["second"])
    finished_before = [s for s in first if s != "train"]
    assert finished_before and "train" in first
    for stage in finished_before:
        assert second[stage] == "skipped", (stage, demo_run["second"])
    assert second["train"] in ("resuming", "running")
    assert "report" in second and second["report"] == "running"


def test_rerun_skips_every_stage_and_changes_nothing(demo_run):
    states = stage_states(demo_run["third"])
    assert states and set(states.values()) == {"skipped"}, demo_run["third"]
    assert demo_run["before"] == demo_run["after"]


def test_report_and_figures_exist(demo_run):
    out = demo_run["out"]
    text = (out / "report.md").read_text()
    for heading in ("## Samples", "## Entropy heatmaps", "## The two models", "## Compression vs tau",
                    "### 1. Token reduction", "### 2. Training compute", "### 3. Quality", "### 4. Adaptive patching",
                    "### Entropy follows detail", "## Stage timings"):
        assert heading in text
    for name in FIGURES:
        assert f"figures/{name}" in text
        with Image.open(out / "figures" / name) as im:
            assert im.width > 100 and im.height > 100
            assert len(np.unique(np.asarray(im.convert("L")))) > 10  # a drawing, not a blank canvas
    assert not re.search(r"\b(nan|inf)\b", text, re.IGNORECASE)


def _finite(obj, where="report.json"):
    if isinstance(obj, dict):
        for k, v in obj.items():
            _finite(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _finite(v, f"{where}[{i}]")
    elif isinstance(obj, float):
        assert math.isfinite(obj), where


def test_numbers_are_finite_and_consistent(demo_run):
    out = demo_run["out"]
    numbers = json.loads((out / "report.json").read_text())
    _finite(numbers)
    analysis = json.loads((out / "r64" / "analysis.json").read_text())
    stats = analysis["statistics"]  # entropy_model/stats.py on the stored entropies
    T = analysis["tokens_per_image"]
    assert T == 256
    assert stats["compression"] == pytest.approx(T / stats["patches_per_image"], rel=1e-9)
    assert analysis["compression"] == pytest.approx(stats["compression"], rel=1e-9)
    assert analysis["compression"] == pytest.approx(1.81, rel=0.05)  # the calibration target
    counts = np.repeat([int(k) for k in analysis["patch_count_histogram"]],
                       list(analysis["patch_count_histogram"].values()))
    assert counts.mean() == pytest.approx(stats["patches_per_image"], rel=1e-9)
    # the report's numbers are the stored ones
    text = (out / "report.md").read_text()
    m = re.search(r"compression ([0-9.]+) = (\d+) / ([0-9.]+)", text)
    assert m and int(m.group(2)) == T
    assert float(m.group(1)) == pytest.approx(T / float(m.group(3)), rel=1e-3)
    assert numbers["flops"]["dpar"]["g_positions"] == pytest.approx(stats["patches_per_image"], rel=1e-6)
    assert numbers["flops"]["gpt"]["g_positions"] == T
    # compression while sampling = tokens / patches the DPAR sampler reported
    with np.load(out / "samples" / "dpar.npz") as data:
        patches = data["num_patches"]
        assert len(patches) == len(data["labels"]) == len(data["arr_0"])
    claim = numbers["claims"]["token_reduction"]
    assert claim["sampled_compression"] == pytest.approx(T / patches.mean(), rel=1e-9)
    # compression grows with tau
    comp = [r["compression"] for r in sorted(analysis["table"], key=lambda r: r["threshold"])]
    assert all(a <= b + 1e-12 for a, b in zip(comp, comp[1:]))
    # the training batches saw about the calibrated compression
    assert numbers["train"]["dpar"]["training_compression"] == pytest.approx(analysis["compression"], rel=0.15)


def test_entropy_is_higher_on_detailed_tokens(demo_run):
    """Recomputed here from entropy.npy and the synthetic masks with a plain loop over images."""
    out = demo_run["out"]
    codes = out / "r64" / "codes"
    entropy = np.load(codes / "entropy.npy")  # (N, views, T) float16
    manifest = json.loads((codes / "manifest.json").read_text())
    images = out / "r64" / "images"
    paths = sorted(images.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    assert len(paths) == entropy.shape[0] == manifest["count"]
    grid = manifest["grid_width"]
    detailed, flat = [], []
    for n, path in enumerate(paths):
        mask = np.asarray(Image.open(out / "r64" / "images_masks" / path.parent.name / path.name)) > 127
        f = mask.shape[0] // grid
        for i in range(grid):
            for j in range(grid):
                e = float(entropy[n, 0, i * grid + j])
                (detailed if mask[i * f:(i + 1) * f, j * f:(j + 1) * f].mean() > 0.5 else flat).append(e)
    assert detailed and flat
    assert np.mean(detailed) > np.mean(flat)
    masks = json.loads((out / "report.json").read_text())["claims"]["entropy_masks"]
    assert masks["mean_entropy_detailed"] > masks["mean_entropy_flat"]
    assert masks["held"] is True


def test_presets_are_valid_and_smoke_presets_say_so():
    from demo.config import PRESETS, preset
    from demo.report import SMOKE_PRESETS

    configs = {name: preset(name) for name in PRESETS}
    for name, config in configs.items():
        config.check()  # raises on settings that cannot work
        assert config.preset == name
    assert set(SMOKE_PRESETS) == {"tiny", "quick"}  # their reports carry the smoke-run notice
    quick, default = configs["quick"], configs["default"]
    # the quick preset is a shorter version of the default study, not a different one
    assert quick.train_steps < default.train_steps and quick.vq_steps < default.vq_steps
    assert (quick.classes, quick.image_size, quick.codebook_size) == (default.classes, default.image_size,
                                                                     default.codebook_size)


def test_quality_study_reuses_the_demo_stages_and_measures_every_run(demo_run, tmp_path):
    """demo.quality_study on a copy of the tiny demo: the shared stages are skipped, the two seed-0
    runs train side by side and are sampled, the held-out loss split covers every token, and the
    sampler's patch decisions equal the entropy model's on the finished images."""
    out = tmp_path / "study"
    shutil.copytree(demo_run["out"], out)
    cmd = [sys.executable, "-m", "demo.quality_study", "--tiny", "--out", str(out), "--device", "cpu", "--seeds", "1",
           "--rows", "seeds", "boundaries", "--samples-per-class", "2", "--jobs", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    states = {m.group(1): m.group(2) for m in re.finditer(r"^\[(\S+)\]\s+(skipped|running)", proc.stdout, re.M)}
    for shared in ("data_64", "vq_64", "codes_64", "entropy_model_64", "entropy_64", "analysis_64", "classifier"):
        assert states[shared] == "skipped", proc.stdout
    d = json.loads((out / "quality_study.json").read_text())
    assert set(d["runs"]) == {"gpt_seed0", "dpar_seed0"}
    for name, run in d["runs"].items():
        assert run["steps"] == 8 and math.isfinite(run["fd"]) and 0 <= run["class_consistency"] <= 1
        held = run["held_out"]
        shares = held["row_start_share"] + held["patch_start_share"] + held["inside_patch_share"]
        assert shares == pytest.approx(1.0)
        assert held["patch_start_share"] > 0 and held["inside_patch_share"] > 0  # the split has all three kinds
        weighted = sum(held[k] * held[f"{k}_share"] for k in ("row_start", "patch_start", "inside_patch"))
        assert weighted == pytest.approx(held["all"], rel=1e-6)
    decisions = d["runs"]["dpar_seed0"]["patch_decisions"]
    assert decisions["tokens"] == 6 * 16 * 16 and decisions["differing"] == 0
    with np.load(out / "samples" / "dpar_seed0.npz") as data:
        starts = data["patch_starts"]
    # real patching: some tokens joined a patch, and the rows opened patches at different steps
    assert (~starts).any() and len(set(starts.sum(1).tolist())) > 1
    assert "## Seed spread" in (out / "quality_study.md").read_text()
