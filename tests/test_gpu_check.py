"""The GPU check script runs end to end on the CPU at tiny sizes (--dry-run), so it is known to
work before GPU time is spent."""
import json
import os
import subprocess
import sys
from pathlib import Path

from evaluations import gpu_check

ROOT = Path(__file__).resolve().parents[1]


def test_dry_run_writes_every_section(tmp_path):
    report = gpu_check.main(["--dry-run", "--out", str(tmp_path), "--warmup", "0", "--decode-steps", "4",
                             "--reference-steps", "2"])
    saved = json.loads((tmp_path / "gpu_check.json").read_text())
    assert saved["dry_run"] and saved["environment"]["automatic_backend"] == "sdpa"
    attention = saved["attention"]
    assert {(e["backend"], e["case"]) for e in attention} >= {("sdpa", "causal"), ("sdpa", "documents")}
    assert all(e["ok"] and e["out"] < gpu_check.TOLERANCE for e in attention), attention
    (training,) = saved["training"]
    assert training["ok"], training.get("traceback")
    assert training["train_images_per_s_gpt"] > 0 and training["train_images_per_s_dpar"] > 0
    assert 0.5 < training["flops_ratio"] < 2 and training["compression"] > 1
    assert training["dynamo_stats"]["unique_graphs"] >= 1  # the model really was compiled
    assert training["compile_scope"] == "model" and set(training["scopes"]) == {"model", "blocks"}
    assert all(scope["ok"] for scope in training["scopes"].values()), training["scopes"]
    for scope in training["scopes"].values():  # every model compiled, nothing recompiled after warm-up
        assert all(g["graphs"] >= 1 and g["recompiles_after_warmup"] == 0 for g in scope["compiled_graphs"].values())
    assert all(g["graph_breaks"] == 0 for g in training["compiled_graphs"].values())  # whole model: one graph
    decoding = saved["decoding"]
    assert decoding["ok"], decoding.get("traceback")
    assert decoding["gpt_step_ms"] > 0 and decoding["dpar_step_ms"] > 0 and decoding["reference_step_ms"] > 0
    runs = decoding["runs"]
    assert {"gpt_graph", "gpt_eager", "dpar_graph", "dpar_eager", "dpar_incremental_ref", "dpar_reference"} <= set(runs)
    assert all(r["ok"] for r in runs.values()), runs
    assert runs["gpt_graph"]["tokens"] == 4 and runs["dpar_reference"]["tokens"] == 2
    assert report["training"][0]["gpt_model"] == "GPT-T"


def test_launcher_passes_arguments():
    script = ROOT / "scripts" / "gpu_check.sh"
    assert script.read_text().startswith("#!/usr/bin/env bash") and os.access(script, os.X_OK)
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run([str(script), "unused", "--help"], capture_output=True, text=True, check=True, env=env)
    assert "--dry-run" in out.stdout
