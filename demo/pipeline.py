"""The demo's stages, in order: synthetic data -> VQ -> codes -> entropy model -> entropies and
calibration -> domain classifier -> GPT and DPAR training -> sampling -> compute accounting ->
(--full: static-patch model, other resolutions) -> report.

Every stage calls the project's own tools (command-line tools as subprocesses of this Python,
library functions in process) and leaves a done marker (demo/stages.py).
"""
from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from tqdm import tqdm

from autoregressive.models.generate import Sampling
from autoregressive.sample.loading import PatchingOverrides
from autoregressive.sample.sampler import image_seed
from dataset.code_store import open_code_store
from dataset.synthetic import mask_dir
from demo import analysis
from demo.config import DemoConfig, as_dict, stage_params
from demo.stages import Stage, StageRunner, print_now, read_json, remove_path, run_tool, write_json_atomic
from evaluations.domain_metric import load_domain_classifier
from utils.identity import file_sha256
from utils.distributed import pick_device

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT_PER_CLASS = 32  # held-out images per class (another seed) for the tokenizer's PSNR
ENTROPY_FILES = ("entropy.npy", "entropy.json", "entropy.partial.npy", "entropy.progress.json", "entropy.progress.npy")


@dataclass
class Paths:
    """Where everything of a demo run lives under --out."""
    out: Path

    def res(self, size: int) -> Path:
        return self.out / f"r{size}"

    def images(self, size: int) -> Path:
        return self.res(size) / "images"

    def held_out_images(self, size: int) -> Path:
        """Images no model trains on (another seed): the tokenizer's held-out reconstruction PSNR."""
        return self.res(size) / "images_held_out"

    def vq_dir(self, size: int) -> Path:
        return self.res(size) / "vq"

    def vq_ckpt(self, size: int) -> Path:
        return self.vq_dir(size) / "checkpoints" / "final.pt"

    def codes(self, size: int) -> Path:
        return self.res(size) / "codes"

    def entropy_run(self, size: int) -> Path:
        return self.res(size) / "entropy_model"

    def entropy_ckpt(self, size: int) -> Path:
        path = analysis.run_checkpoint(self.entropy_run(size))
        if path is None:
            raise ValueError(f"no entropy model checkpoint in {self.entropy_run(size)}")
        return path

    def analysis(self, size: int) -> Path:
        return self.res(size) / "analysis.json"

    @property
    def models(self) -> Path:
        return self.out / "models"

    @property
    def samples(self) -> Path:
        return self.out / "samples"

    @property
    def classifier(self) -> Path:
        return self.out / "eval" / "domain_classifier.pt"

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def figures(self) -> Path:
        return self.out / "figures"


class Demo:
    """Builds the stages of a run from its config and runs them in order."""

    def __init__(self, config: DemoConfig, out: Path, force: Optional[list[str]] = None,
                 log: Callable[[str], None] = print_now):
        self.config = config
        self.paths = Paths(out.resolve())
        self.device = pick_device(config.device)
        self.runner = StageRunner(self.paths.out, force, log)
        self.log = log

    # -----------------------------------------------------------------------------------
    def tool(self, name: str, *cmd, progress: Optional[str] = None, env: Optional[dict] = None) -> None:
        run_tool([str(c) for c in cmd], self.paths.logs / f"{name}.log", ROOT, env=env, progress=progress)

    @property
    def device_flag(self) -> str:
        return self.device.type

    def stages(self) -> list[Stage]:
        """The stages in run order, the report excepted (it depends on all of them)."""
        c = self.config
        out = self.resolution_stages(c.image_size, main=True)
        out += [self.classifier_stage(), self.train_stage(), self.sample_stage()]
        out += [self.sample_tau_stage(t) for t in c.inference_compressions]
        if c.static_model:
            out += [self.train_static_stage(), self.sample_static_stage()]
        for size in c.resolutions:
            out += self.resolution_stages(size, main=False)
        return out + [self.flops_stage()]

    def run(self, report: Callable[["Demo"], Stage]) -> dict:
        """Run the stages in order, then the stage `report(self)` builds (demo.report.report_stage,
        which depends on all of them)."""
        stages = self.stages()
        unknown = sorted(set(self.runner.force or []) - {s.name for s in stages} - {"report"})
        if unknown:
            raise ValueError(f"--force: no stage named {', '.join(unknown)}; stages: "
                             f"{' '.join(s.name for s in stages)} report")
        self.runner.total = len(stages) + 1
        for stage in stages:
            self.runner.run(stage)
        self.runner.run(report(self))
        return self.runner.results

    # -----------------------------------------------------------------------------------
    # One resolution: data, tokenizer, codes, entropy model, entropies, analysis
    # -----------------------------------------------------------------------------------
    def resolution_stages(self, size: int, main: bool) -> list[Stage]:
        per_class = self.config.per_class
        return [self.data_stage(size, per_class), self.vq_stage(size), self.codes_stage(size, per_class),
                self.entropy_model_stage(size), self.entropy_stage(size), self.analysis_stage(size, main)]

    def data_stage(self, size: int, per_class: int) -> Stage:
        c, images, held_out = self.config, self.paths.images(size), self.paths.held_out_images(size)
        expected = {images: c.classes * per_class, mask_dir(images): c.classes * per_class,
                    held_out: c.classes * HELD_OUT_PER_CLASS}
        style = ["--colours", c.colours, "--flat-share", c.flat_share, "--radius", *c.radius]

        def run() -> dict:
            self.tool(f"data_{size}", "-m", "dataset.synthetic", "--out", images, "--classes", c.classes,
                      "--per-class", per_class, "--size", size, "--seed", c.seed, "--masks", *style)
            self.tool(f"data_{size}", "-m", "dataset.synthetic", "--out", held_out, "--classes", c.classes,
                      "--per-class", HELD_OUT_PER_CLASS, "--size", size, "--seed", c.seed + 1, *style)
            return {"images": expected[images], "held_out_images": expected[held_out]}

        def validate() -> None:
            for folder, count in expected.items():
                n = len(list(folder.glob("*/*.png")))
                if n != count:
                    raise ValueError(f"{folder} holds {n} images, expected {count}")

        return Stage(f"data_{size}", f"synthetic dataset, {c.classes} classes x {per_class} images at {size}px "
                     f"with detail masks", {"classes": c.classes, "per_class": per_class, "size": size, "seed": c.seed,
                      "colours": c.colours, "flat_share": c.flat_share, "radius": c.radius},
                     run, validate, outputs=[images, mask_dir(images), held_out])

    def vq_stage(self, size: int) -> Stage:
        c, vq_dir = self.config, self.paths.vq_dir(size)
        params = stage_params(c, ["vq_ch", "vq_ch_mult", "vq_res_blocks", "vq_z_channels", "codebook_size",
                                  "vq_steps", "vq_batch", "vq_lr", "vq_restart_every", "seed"])

        def run() -> dict:
            self.tool(f"vq_{size}", "-m", "tokenizer.train_vq", "--data-path", self.paths.images(size),
                      "--val-data-path", self.paths.held_out_images(size),
                      "--results-dir", vq_dir, "--vq-model", "VQ-16", "--image-size", size, "--ch", c.vq_ch,
                      "--ch-mult", *c.vq_ch_mult, "--num-res-blocks", c.vq_res_blocks, "--z-channels", c.vq_z_channels,
                      "--codebook-size", c.codebook_size, "--norm-groups", 8, "--max-steps", c.vq_steps,
                      "--global-batch-size", c.vq_batch, "--lr", c.vq_lr, "--lr-schedule", "cosine",
                      "--warmup-steps", c.vq_steps // 20, "--min-lr", c.vq_lr / 20,
                      "--restart-dead-every", c.vq_restart_every, "--seed", c.seed,
                      "--log-every", max(1, c.vq_steps // 10), "--ckpt-every", c.vq_steps, "--device", self.device_flag)
            m = json.loads((vq_dir / "metrics.json").read_text())
            return {k: m[k] for k in ("psnr", "codebook_usage", "codes_used", "num_images", "eval_split")}

        def validate() -> None:
            json.loads((vq_dir / "metrics.json").read_text())
            if not self.paths.vq_ckpt(size).is_file():
                raise ValueError("no final VQ checkpoint")

        return Stage(f"vq_{size}", f"VQ tokenizer (downsample {c.downsample}, {c.codebook_size} codes, "
                     f"{c.vq_steps} steps)", params, run, validate, outputs=[vq_dir], deps=[f"data_{size}"])

    def codes_stage(self, size: int, per_class: int) -> Stage:
        c, codes = self.config, self.paths.codes(size)

        def run() -> dict:
            self.tool(f"codes_{size}", "extract_codes.py", "--data-path", self.paths.images(size), "--code-path", codes,
                      "--vq-model", "VQ-16", "--vq-ckpt", self.paths.vq_ckpt(size), "--image-size", size, "--flip",
                      "--batch-size", 64, "--num-workers", 0)
            m = open_code_store(codes).manifest
            return {"count": m["count"], "num_views": m["num_views"], "grid": [m["grid_height"], m["grid_width"]]}

        def validate() -> None:
            store = open_code_store(codes)
            if len(store) != c.classes * per_class or store.manifest["tokenizer_hash"] != file_sha256(
                    self.paths.vq_ckpt(size)):
                raise ValueError("the code store does not match the dataset or the tokenizer")

        return Stage(f"codes_{size}", "VQ codes of every image and its horizontal flip", {"size": size}, run,
                     validate, outputs=[codes], deps=[f"data_{size}", f"vq_{size}"])

    def train_cmd(self, run_name: str, model: str, steps: int, batch: int, lr: float, warmup: int, min_lr: float,
                  code_path: Path, results: Path) -> list:
        """train_c2i.py flags of one run: cosine decay from lr to min_lr after `warmup` steps."""
        c = self.config
        return ["train_c2i.py", "--code-path", code_path, "--gpt-model", model, "--results-dir", results,
                "--run-name", run_name, "--global-batch-size", batch, "--max-steps", steps, "--lr", lr,
                "--lr-schedule", "cosine", "--min-lr", min_lr, "--warmup-steps", warmup, "--seed", c.seed,
                "--num-workers", 0, "--downsample-size", c.downsample,
                "--log-every", max(1, c.log_every(steps)), "--ckpt-every", max(1, steps // 4), "--keep-last", 1,
                "--device", self.device_flag]

    def entropy_model_stage(self, size: int) -> Stage:
        c, run_dir = self.config, self.paths.entropy_run(size)
        params = stage_params(c, ["entropy_model", "entropy_steps", "entropy_batch", "entropy_lr", "seed"])

        def run() -> dict:
            cmd = self.train_cmd("entropy_model", c.entropy_model, c.entropy_steps, c.entropy_batch, c.entropy_lr,
                                 c.entropy_steps // 20, c.entropy_lr / 20, self.paths.codes(size), self.paths.res(size))
            self.tool(f"entropy_model_{size}", *cmd, "--unconditional", progress="entropy model")
            summary = analysis.training_summary(run_dir, c.entropy_batch)
            return {k: summary[k] for k in ("steps", "final_loss", "seconds_per_step")}

        def validate() -> None:
            if analysis.checkpoint_step(run_dir) != c.entropy_steps:
                raise ValueError(f"the entropy model has not reached step {c.entropy_steps}")

        return Stage(f"entropy_model_{size}", f"unconditional {c.entropy_model} entropy model, {c.entropy_steps} steps",
                     params, run, validate, outputs=[run_dir], deps=[f"codes_{size}"], resumable=True)

    def entropy_stage(self, size: int) -> Stage:
        codes = self.paths.codes(size)

        def run() -> dict:
            self.tool(f"entropy_{size}", "-m", "entropy_tools.score", "--code-path", codes, "--entropy-ckpt",
                      self.paths.entropy_ckpt(size), "--batch-size", 64, "--device", self.device_flag)
            stats = json.loads((codes / "entropy.json").read_text())["stats"]
            return {"mean": stats["mean"], "median": stats["quantiles"]["0.5"]}

        def validate() -> None:
            analysis.stored_entropies(codes, self.paths.entropy_ckpt(size))

        return Stage(f"entropy_{size}", "entropy of every stored token under the entropy model", {}, run, validate,
                     outputs=[codes / f for f in ENTROPY_FILES], deps=[f"entropy_model_{size}"], resumable=True)

    def analysis_stage(self, size: int, main: bool) -> Stage:
        c = self.config
        patching = {"max_patch_length": c.max_patch_length, "row_reset": True}
        deps = [f"entropy_{size}", f"data_{size}"] + ([] if main else [f"analysis_{c.image_size}"])
        params = {"patching": patching, "target_compression": c.target_compression if main else None,
                  "inference_compressions": c.inference_compressions if main else [], "batch_size": c.batch_size}

        def run() -> dict:
            threshold = None if main else self.main_analysis()["patching"]["threshold"]
            result = analysis.analyse_store(self.paths.codes(size), self.paths.images(size),
                                            self.paths.entropy_ckpt(size), patching, params["target_compression"],
                                            threshold, params["inference_compressions"], c.batch_size)
            write_json_atomic(self.paths.analysis(size), result)
            return {"threshold": result["patching"]["threshold"], "compression": result["compression"],
                    **{k: result["masks"][k] for k in ("mean_entropy_detailed", "mean_entropy_flat")}}

        def validate() -> None:
            if read_json(self.paths.analysis(size)) is None:
                raise ValueError("no analysis.json")

        what = (f"calibrate tau for {c.target_compression} tokens per patch; patch and detail-mask statistics"
                if main else f"patch statistics at the {c.image_size}px tau")
        return Stage(f"analysis_{size}", what, params, run, validate, outputs=[self.paths.analysis(size)], deps=deps)

    def main_analysis(self) -> dict:
        return json.loads(self.paths.analysis(self.config.image_size).read_text())

    # -----------------------------------------------------------------------------------
    # Main study
    # -----------------------------------------------------------------------------------
    def classifier_stage(self) -> Stage:
        c, size = self.config, self.config.image_size

        def run() -> dict:
            self.tool("classifier", "-m", "evaluations.domain_metric", "train", "--data-path", self.paths.images(size),
                      "--out", self.paths.classifier, "--image-size", size, "--epochs", c.classifier_epochs,
                      "--seed", c.seed)
            return load_domain_classifier(str(self.paths.classifier))[1]["summary"]

        def validate() -> None:
            load_domain_classifier(str(self.paths.classifier))

        return Stage("classifier", f"domain-metric classifier on the real images ({c.classifier_epochs} epochs)",
                     {"epochs": c.classifier_epochs, "seed": c.seed}, run, validate,
                     outputs=[self.paths.classifier], deps=[f"data_{size}"])

    def model_runs(self) -> dict[str, tuple[str, Path, list]]:
        """name -> (registry model, run folder, extra train_c2i.py flags) of the two compared models."""
        c = self.config
        a = self.main_analysis()
        dpar_flags = ["--entropy-model", self.paths.entropy_ckpt(c.image_size), "--threshold",
                      repr(a["patching"]["threshold"]), "--max-patch-length", c.max_patch_length]
        return {"gpt": (c.gpt_model, self.paths.models / "gpt", []),
                "dpar": (c.dpar_model, self.paths.models / "dpar", dpar_flags)}

    def side_by_side(self, count: int) -> int:
        """How many of `count` trainings run at once: on a CPU with a core for each, all of them
        (one process per core trains faster than one process on every core); else one."""
        cpus = os.cpu_count() or 1
        return count if self.device.type == "cpu" and 1 < count <= cpus else 1

    def train_alternating(self, runs: dict[str, tuple[str, Path, list]], rounds: int) -> None:
        """Train the runs in `rounds` alternating chunks (train_c2i.py resumes each from its
        checkpoint), so machine load affects every model alike. Within a round the runs train
        side by side (side_by_side), each with its share of the CPU's threads."""
        c = self.config
        for r in range(1, rounds + 1):
            target = math.ceil(c.train_steps * r / rounds)
            todo = {n: run for n, run in runs.items() if analysis.checkpoint_step(run[1]) < target}
            jobs = self.side_by_side(len(todo))
            env = {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // jobs))} if jobs > 1 else None

            def train(name: str) -> None:
                model, run_dir, flags = todo[name]
                cmd = self.train_cmd(name, model, c.train_steps, c.batch_size, c.lr, c.warmup_steps, c.min_lr,
                                     self.paths.codes(c.image_size), self.paths.models)
                cmd[cmd.index("--max-steps") + 1] = target
                cmd[cmd.index("--ckpt-every") + 1] = target
                self.tool(f"train_{name}", *cmd, *flags, progress=f"{model} (round {r}/{rounds})", env=env)

            with ThreadPoolExecutor(jobs) as pool:
                list(pool.map(train, todo))
            for name, (_, run_dir, _) in runs.items():
                if analysis.checkpoint_step(run_dir) != target:
                    raise RuntimeError(f"{name} stopped before step {target}; rerun the demo to continue")

    def train_stage(self) -> Stage:
        c = self.config
        params = stage_params(c, ["gpt_model", "dpar_model", "train_steps", "batch_size", "lr", "warmup_steps",
                                  "min_lr", "max_patch_length", "seed"])
        runs_dirs = [self.paths.models / "gpt", self.paths.models / "dpar"]

        def run() -> dict:
            runs = self.model_runs()
            self.train_alternating(runs, c.train_rounds)
            return {name: {k: v for k, v in analysis.training_summary(d, c.batch_size).items() if k != "loss_curve"}
                    for name, (_, d, _) in runs.items()}

        def validate() -> None:
            for d in runs_dirs:
                if analysis.checkpoint_step(d) != c.train_steps:
                    raise ValueError(f"{d.name} has not reached step {c.train_steps}")

        return Stage("train", f"{c.gpt_model} baseline and {c.dpar_model}, {c.train_steps} steps of {c.batch_size} "
                     f"each, same seed and batches, alternating in {c.train_rounds} rounds", params, run, validate,
                     outputs=runs_dirs, deps=[f"analysis_{c.image_size}"], resumable=True)

    def sampling(self) -> Sampling:
        c = self.config
        return Sampling(cfg_scale=c.cfg_scale, temperature=c.temperature, top_k=c.top_k)

    def sample_sets(self, sets: dict[str, tuple[Path, Optional[PatchingOverrides]]], desc: str,
                    seed: Optional[int] = None) -> dict:
        """Sample every set batch by batch in turn (so load affects them alike), save the .npz
        files and score them with the domain metric. Images are drawn from `seed` (default the
        run's). Returns name -> summary."""
        c = self.config
        seed = c.seed if seed is None else seed
        size = c.image_size
        vq, ent = self.paths.vq_ckpt(size), self.paths.entropy_ckpt(size)
        samplers = {n: analysis.load_sampler(ck, vq, ent, self.device, self.sampling(), ov)
                    for n, (ck, ov) in sets.items()}
        total = c.classes * c.samples_per_class
        parts = {n: [] for n in sets}
        labels = [k for k in range(c.classes) for _ in range(c.samples_per_class)]
        with tqdm(total=total * len(sets), desc=desc, unit="img", dynamic_ncols=True, leave=False,
                  file=sys.stderr) as bar:
            for i in range(0, total, c.sample_batch):
                for n, (sampler, _) in samplers.items():
                    batch = sampler.sample(labels[i:i + c.sample_batch],
                                           [image_seed(seed, j) for j in range(i, min(i + c.sample_batch, total))])
                    parts[n].append(batch)
                    bar.update(len(batch.tokens))
        results = {}
        for n, (sampler, args) in samplers.items():
            samples = analysis.collect_batches(parts[n], sampler, labels)
            meta = {**analysis.sampling_meta(sampler, args), "checkpoint": str(sets[n][0].relative_to(self.paths.out)),
                    "samples_per_class": c.samples_per_class}
            path = self.paths.samples / f"{n}.npz"
            self.paths.samples.mkdir(parents=True, exist_ok=True)
            analysis.save_samples(path, samples)
            metric = analysis.evaluate_samples(path, self.paths.classifier, self.paths.images(size), c.seed)
            results[n] = {**meta, "throughput": samples["throughput"], "domain_metric": metric}
            write_json_atomic(self.paths.samples / f"{n}.json", results[n])
        return results

    def sample_stage(self) -> Stage:
        c = self.config
        params = stage_params(c, ["samples_per_class", "cfg_scale", "temperature", "top_k", "sample_batch", "seed"])
        names = ["gpt", "dpar"]

        def run() -> dict:
            sets = {n: (analysis.run_checkpoint(self.paths.models / n), None) for n in names}
            return self.sample_sets(sets, "sampling GPT and DPAR")

        return Stage("sample", f"{c.samples_per_class} samples per class from each model (guidance {c.cfg_scale}), "
                     f"domain metric", params, run, self.samples_validator(names),
                     outputs=[self.paths.samples / f"{n}.{e}" for n in names for e in ("npz", "json")],
                     deps=["train", "classifier"])

    def samples_validator(self, names: list[str]) -> Callable[[], None]:
        def validate() -> None:
            for n in names:
                meta = json.loads((self.paths.samples / f"{n}.json").read_text())
                with np.load(self.paths.samples / f"{n}.npz") as data:
                    if len(data["arr_0"]) != meta["throughput"]["images"]:
                        raise ValueError(f"{n}.npz does not match its record")
        return validate

    def sample_tau_stage(self, target: float) -> Stage:
        c = self.config
        name = f"dpar_c{target:g}"

        def run() -> dict:
            tau = next(t["threshold"] for t in self.main_analysis()["inference_thresholds"]
                       if t["target_compression"] == target)
            sets = {name: (analysis.run_checkpoint(self.paths.models / "dpar"), PatchingOverrides(threshold=tau))}
            return self.sample_sets(sets, f"sampling DPAR at {target:g} tokens/patch")

        params = {**stage_params(c, ["samples_per_class", "cfg_scale", "temperature", "top_k", "sample_batch",
                                     "seed"]), "target": target}
        return Stage(f"sample_{name}", f"DPAR sampled with tau calibrated for {target:g} tokens per patch "
                     f"(adaptive patching at inference)", params, run, self.samples_validator([name]),
                     outputs=[self.paths.samples / f"{name}.{e}" for e in ("npz", "json")],
                     deps=["train", "classifier", f"analysis_{c.image_size}"])

    def train_static_stage(self) -> Stage:
        c = self.config
        run_dir = self.paths.models / "static"
        params = {**stage_params(c, ["dpar_model", "train_steps", "batch_size", "lr", "warmup_steps", "min_lr",
                                     "seed", "max_patch_length"]), "static_length": c.static_mean_length}

        def run() -> dict:
            flags = ["--patching-mode", "static", "--static-length", c.static_mean_length,
                     "--max-patch-length", c.max_patch_length]
            self.train_alternating({"static": (c.dpar_model, run_dir, flags)}, 1)
            return {k: v for k, v in analysis.training_summary(run_dir, c.batch_size).items() if k != "loss_curve"}

        def validate() -> None:
            if analysis.checkpoint_step(run_dir) != c.train_steps:
                raise ValueError(f"the static model has not reached step {c.train_steps}")

        return Stage("train_static", f"{c.dpar_model} with uniform patches of mean length {c.static_mean_length:g} "
                     f"(same data, seed and steps)", params, run, validate, outputs=[run_dir],
                     deps=[f"codes_{c.image_size}"], resumable=True)

    def sample_static_stage(self) -> Stage:
        c = self.config
        lengths = c.static_sample_lengths
        names = [f"static_p{n:g}" for n in lengths]

        def run() -> dict:
            ckpt = analysis.run_checkpoint(self.paths.models / "static")
            sets = {name: (ckpt, PatchingOverrides(static_length=n)) for name, n in zip(names, lengths)}
            return self.sample_sets(sets, "sampling the static-patch model")

        params = {**stage_params(c, ["samples_per_class", "cfg_scale", "temperature", "top_k", "sample_batch",
                                     "seed"]), "lengths": lengths}
        return Stage("sample_static", f"static-patch model sampled at mean patch lengths {lengths}",
                     params, run, self.samples_validator(names),
                     outputs=[self.paths.samples / f"{n}.{e}" for n in names for e in ("npz", "json")],
                     deps=["train_static", "classifier"])

    def flops_stage(self) -> Stage:
        c = self.config
        path = self.paths.out / "eval" / "flops.json"

        def run() -> dict:
            a = self.main_analysis()
            common = dict(image_size=c.image_size, downsample=c.downsample, vocab=c.codebook_size, classes=c.classes)
            result = {"gpt": analysis.compute_accounting(c.gpt_model, **common),
                      "dpar": analysis.compute_accounting(c.dpar_model, counts=analysis.patch_counts(a), **common)}
            if c.static_model:
                result["static"] = analysis.compute_accounting(
                    c.dpar_model, counts=analysis.static_patch_counts(c), **common)
            write_json_atomic(path, result)
            return {n: r["training_flops"] for n, r in result.items()}

        def validate() -> None:
            if read_json(path) is None:
                raise ValueError("no flops.json")

        return Stage("flops", "training FLOPs and forward MACs per image, counted from the modules "
                     "(evaluations/flops.py)", {**stage_params(c, ["gpt_model", "dpar_model", "static_model"]),
                                                "static_length": c.static_mean_length}, run,
                     validate, outputs=[path], deps=[f"analysis_{c.image_size}"])


def machine_description() -> dict:
    """What the report says about the machine the demo ran on."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    try:
        info["load_average"] = list(os.getloadavg())
    except OSError:
        pass
    return info


def write_run_record(paths: Paths, config: DemoConfig, argv: list[str], seconds: float) -> None:
    """<out>/run.json: settings, command line, machine and total time of the latest invocation."""
    record = read_json(paths.out / "run.json") or {"invocations": []}
    record["invocations"].append({"argv": argv, "config": as_dict(config), "machine": machine_description(),
                                  "seconds": seconds, "finished": time.strftime("%Y-%m-%d %H:%M:%S")})
    write_json_atomic(paths.out / "run.json", record)


def clear_stale(paths: Paths) -> None:
    """Remove leftovers of an interrupted atomic write (temporary files) under --out."""
    for tmp in paths.out.rglob(".*.tmp*"):
        remove_path(tmp)

