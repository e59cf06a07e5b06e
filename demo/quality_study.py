"""The quality study: why DPAR samples worse than its GPT baseline in the demo, row by row.

    python -m demo.quality_study                           # every row (hours on a 2-core CPU)
    python -m demo.quality_study --rows seeds architecture # some rows
    python -m demo.quality_study --report-only             # the table from the runs finished so far

It uses the default preset's data, tokenizer, entropy model, tau and domain classifier (the
demo's stages, done markers included) and trains these runs, each then sampled at guidance 2.0
and scored with the domain metric (Frechet distance on the classifier's features, class
consistency):

  seeds         GPT-XS and DPAR-XS with training seeds 0, 1 and 2 (the data stays seed 0); the
                8-layer pair of the proportions row gets seeds 1 and 2 too
  architecture  DPAR-XS with every token its own patch (patching mode "token")
  patching      DPAR-XS with static patches of the calibrated mean length
  proportions   GPT-XS8 (8 layers) against DPAR-XS8 (E1 G5 D2), and DPAR-XS as E1 G1 D2
  positions     DPAR-XS with LlamaGen's 2D RoPE (row, first column) on the patch transformer
                instead of dynamic RoPE, with every token its own patch and with entropy patches
  convergence   GPT-XS and DPAR-XS at twice the steps, sampled at every quarter
  boundaries    (no training) teacher-forced loss on held-out codes, split into the first tokens
                of patches and the rest, for every finished run; the share of sampled tokens whose
                patch decision differs from the entropy model's on the finished image

Trainings run side by side (--jobs, one thread each by default), pair by pair in the order
above; a rerun skips every finished run and resumes an interrupted one, so the study can span
sessions. Writes <out>/quality_study.{json,md} and <out>/figures/quality_*.png.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from autoregressive.models import model_family, model_from_checkpoint
from autoregressive.sample.loading import PatchingOverrides, sampling_patching
from demo import analysis
from demo.config import DemoConfig, preset, stage_params
from demo.figures import line_plot
from demo.pipeline import Demo, clear_stale, machine_description
from demo.stages import Stage, read_json, write_json_atomic
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig, quantize_entropy
from entropy_tools.score import load_entropy_model
from dataset.code_store import open_code_store
from utils.checkpoint import checkpoint_dir
from utils.cli import HelpFormatter

ROWS = ("seeds", "architecture", "patching", "proportions", "positions", "convergence", "boundaries")
SEEDS = 3  # training seeds 0, 1, 2 of GPT-XS and DPAR-XS
CONVERGENCE_POINTS = 4  # the long runs are sampled at every quarter of their steps
STUDY_SAMPLES_PER_CLASS = 50
# the seed-spread groups: (label, run-name prefix before "_seed<k>", the seed-0 run)
SEED_FAMILIES = (("GPT-XS", "gpt", "gpt_seed0"), ("DPAR-XS", "dpar", "dpar_seed0"),
                 ("GPT-XS8", "gpt_8layer", "gpt_8layer"), ("DPAR-XS8", "dpar_e1g5d2", "dpar_e1g5d2"))


@dataclass(frozen=True)
class Run:
    """One training of the study: a registry model, its extra train_c2i.py flags, its seed and
    its length in multiples of the preset's steps."""
    name: str
    model: str
    row: str
    what: str
    seed: int = 0
    steps_factor: int = 1
    flags: tuple = ()

    @property
    def patched(self) -> bool:
        return model_family(self.model).patched


def study_runs(config: DemoConfig, seeds: int = SEEDS) -> list[Run]:
    """Every run, in training order: pairs that belong together come one after the other."""
    xs_gpt, xs_dpar = config.gpt_model, config.dpar_model
    runs = [Run("gpt_seed0", xs_gpt, "seeds", "GPT, seed 0"), Run("dpar_seed0", xs_dpar, "seeds", "DPAR, seed 0"),
            Run("dpar_token", xs_dpar, "architecture", "DPAR, every token its own patch",
                flags=("--patching-mode", "token")),
            Run("dpar_e1g1d2", xs_dpar, "proportions", "DPAR as E1 G1 D2", flags=("--decoder-layers", "2"))]
    for seed in range(1, seeds):
        runs += [Run(f"gpt_seed{seed}", xs_gpt, "seeds", f"GPT, seed {seed}", seed=seed),
                 Run(f"dpar_seed{seed}", xs_dpar, "seeds", f"DPAR, seed {seed}", seed=seed)]
    runs += [Run("dpar_static", xs_dpar, "patching", f"DPAR, static patches of mean length {config.static_mean_length:g}",
                 flags=("--patching-mode", "static", "--static-length", str(config.static_mean_length))),
             Run("gpt_8layer", "GPT-XS8", "proportions", "GPT, 8 layers"),
             Run("dpar_e1g5d2", "DPAR-XS8", "proportions", "DPAR as E1 G5 D2 (8 layers)")]
    runs += [Run("dpar_token_rope2d", xs_dpar, "positions", "DPAR, every token its own patch, 2D RoPE on patches",
                 flags=("--patching-mode", "token", "--patch-rope", "2d")),
             Run("dpar_rope2d", xs_dpar, "positions", "DPAR, 2D RoPE on patches", flags=("--patch-rope", "2d")),
             Run("gpt_long", xs_gpt, "convergence", "GPT, twice the steps", steps_factor=2),
             Run("dpar_long", xs_dpar, "convergence", "DPAR, twice the steps", steps_factor=2)]
    for seed in range(1, seeds):
        runs += [Run(f"gpt_8layer_seed{seed}", "GPT-XS8", "proportions", f"GPT, 8 layers, seed {seed}", seed=seed),
                 Run(f"dpar_e1g5d2_seed{seed}", "DPAR-XS8", "proportions", f"DPAR as E1 G5 D2, seed {seed}",
                     seed=seed)]
    return runs


class QualityStudy:
    """The demo's shared stages, then the study's trainings, samplings and measurements."""

    def __init__(self, config: DemoConfig, out: Path, jobs: int, seeds: int = SEEDS,
                 force: Optional[list[str]] = None):
        self.config = config
        self.demo = Demo(config, out, force)
        self.paths = self.demo.paths
        self.runner = self.demo.runner
        self.jobs = jobs
        self.runs = study_runs(config, seeds)
        self.sampling_lock = threading.Lock()

    @property
    def size(self) -> int:
        return self.config.image_size

    def run_dir(self, run: Run) -> Path:
        return self.paths.models / run.name

    def steps(self, run: Run) -> int:
        return self.config.train_steps * run.steps_factor

    # -----------------------------------------------------------------------------------
    def train_stage(self, run: Run) -> Stage:
        c, run_dir, steps = self.config, self.run_dir(run), self.steps(run)
        params = {**stage_params(c, ["batch_size", "lr", "warmup_steps", "min_lr", "max_patch_length"]),
                  "model": run.model, "flags": list(run.flags), "seed": run.seed, "steps": steps}
        threads = self.threads

        def run_fn() -> dict:
            cmd = self.demo.train_cmd(run.name, run.model, steps, c.batch_size, c.lr, c.warmup_steps, c.min_lr,
                                      self.paths.codes(self.size), self.paths.models)
            cmd[cmd.index("--seed") + 1] = run.seed
            quarter = steps // CONVERGENCE_POINTS
            cmd[cmd.index("--ckpt-every") + 1] = quarter
            if run.steps_factor > 1:
                cmd += ["--keep-every", quarter]
            flags = list(run.flags)
            if run.patched:
                flags += self.patching_flags(run)
            self.demo.tool(f"train_{run.name}", *cmd, *flags, progress=f"{run.name}",
                           env={"OMP_NUM_THREADS": str(threads)})
            summary = analysis.training_summary(run_dir, c.batch_size)
            return {"threads": threads, **summary}

        def validate() -> None:
            if analysis.checkpoint_step(run_dir) != steps:
                raise ValueError(f"{run.name} has not reached step {steps}")

        return Stage(f"train_{run.name}", f"{run.what}: {run.model}, {steps} steps", params, run_fn, validate,
                     outputs=[run_dir], deps=[f"analysis_{self.size}"], resumable=True)

    def patching_flags(self, run: Run) -> list:
        """Entropy patching at the calibrated tau, unless the run's own flags pick another mode."""
        if "token" in run.flags:  # one token per patch: no cap
            return []
        cap = ["--max-patch-length", self.config.max_patch_length]
        if "--patching-mode" in run.flags:  # static patches keep the demo's cap
            return cap
        return cap + ["--entropy-model", self.paths.entropy_ckpt(self.size),
                        "--threshold", repr(self.demo.main_analysis()["patching"]["threshold"])]

    def checkpoints(self, run: Run) -> list[tuple[int, Path]]:
        """(step, checkpoint) the run is sampled at: the last, or every quarter for long runs."""
        steps = self.steps(run)
        points = [steps * k // CONVERGENCE_POINTS for k in range(1, CONVERGENCE_POINTS + 1)] \
            if run.steps_factor > 1 else [steps]
        return [(s, checkpoint_dir(self.run_dir(run)) / f"{s:07d}.pt") for s in points]

    def sample_stage(self, run: Run) -> Stage:
        c = self.config
        names = [self.sample_name(run, step) for step, _ in self.checkpoints(run)]
        params = {**stage_params(c, ["samples_per_class", "cfg_scale", "temperature", "top_k", "sample_batch"]),
                  "seed": run.seed}

        def run_fn() -> dict:
            sets = {self.sample_name(run, step): (ckpt, None) for step, ckpt in self.checkpoints(run)}
            results = self.demo.sample_sets(sets, f"sampling {run.name}", seed=run.seed)
            if run.patched:
                for name in results:
                    results[name]["patch_decisions"] = self.patch_decisions(self.paths.samples / f"{name}.npz", run)
                    write_json_atomic(self.paths.samples / f"{name}.json", results[name])
            return {n: {"domain_metric": r["domain_metric"], "patch_decisions": r.get("patch_decisions"),
                        "throughput": r["throughput"]} for n, r in results.items()}

        return Stage(f"sample_{run.name}", f"{c.samples_per_class} samples per class of {run.name}", params, run_fn,
                     self.demo.samples_validator(names),
                     outputs=[self.paths.samples / f"{n}.{e}" for n in names for e in ("npz", "json")],
                     deps=[f"train_{run.name}", "classifier"])

    @staticmethod
    def sample_name(run: Run, step: int) -> str:
        return f"{run.name}_step{step}" if run.steps_factor > 1 else run.name

    def patch_decisions(self, npz: Path, run: Run) -> dict:
        """How many of the sampler's patch decisions differ from the whole-sequence rule on the
        entropy model's entropies of the finished tokens (0 when sampling matches training)."""
        with np.load(npz) as data:
            tokens, sampled = torch.from_numpy(data["tokens"]), torch.from_numpy(data["patch_starts"])
        _, args = model_from_checkpoint(analysis.run_checkpoint(self.run_dir(run)))
        patching = sampling_patching(args, PatchingOverrides())
        entropy = None
        if patching.needs_entropy:
            model, _ = load_entropy_model(self.paths.entropy_ckpt(self.size))
            entropy = quantize_entropy(teacher_forced_entropy(model, tokens))
        rule = patching.starts(entropy, self.config.grid, shape=tuple(tokens.shape))
        differ = (rule != sampled)
        return {"tokens": int(differ.numel()), "differing": int(differ.sum()),
                "share_differing": float(differ.double().mean()), "sampled_patches_per_image": float(sampled.sum(1).double().mean())}

    # -----------------------------------------------------------------------------------
    # Held-out codes and the loss split at patch boundaries
    # -----------------------------------------------------------------------------------
    @property
    def held_out_codes(self) -> Path:
        return self.paths.res(self.size) / "codes_held_out"

    def held_out_stage(self) -> Stage:
        size, codes = self.size, self.held_out_codes

        def extract() -> dict:
            self.demo.tool("codes_held_out", "extract_codes.py", "--data-path", self.paths.held_out_images(size),
                           "--code-path", codes, "--vq-model", "VQ-16", "--vq-ckpt", self.paths.vq_ckpt(size),
                           "--image-size", size, "--batch-size", 64, "--num-workers", 0)
            self.demo.tool("codes_held_out", "-m", "entropy_tools.score", "--code-path", codes, "--entropy-ckpt",
                           self.paths.entropy_ckpt(size), "--batch-size", 64, "--device", self.demo.device_flag)
            return {"count": len(open_code_store(codes))}

        def validate() -> None:
            analysis.stored_entropies(codes, self.paths.entropy_ckpt(size))

        return Stage("codes_held_out", "VQ codes and entropies of the held-out images (no model trains on them)",
                     {"size": size}, extract, validate, outputs=[codes],
                     deps=[f"vq_{size}", f"entropy_model_{size}", f"data_{size}"])

    def boundary_stage(self, runs: Sequence[Run]) -> Stage:
        finished = {r.name: self.training_id(r) for r in runs if self.training_id(r)}

        def run_fn() -> dict:
            return {r.name: self.boundary_losses(r) for r in runs if r.name in finished}

        return Stage("boundaries", "teacher-forced held-out loss at the first tokens of patches and elsewhere",
                     {"trainings": finished}, run_fn, lambda: None, deps=["codes_held_out"])

    def training_id(self, run: Run) -> Optional[str]:
        """The run id of the run's finished training (None while it is not finished)."""
        marker = read_json(self.runner.marker_dir / f"train_{run.name}.json")
        if marker is None or analysis.checkpoint_step(self.run_dir(run)) != self.steps(run):
            return None
        return marker["run_id"]

    @torch.no_grad()
    def boundary_losses(self, run: Run) -> dict:
        """Mean cross-entropy (nats/token) of the run's final model on the held-out codes, overall
        and at three kinds of position of the calibrated entropy patching: the first token of a
        grid row, the first token of any other patch, and the tokens inside a patch. train_all:
        the same mean on as many training images (centre views), in eval mode like the rest, so
        that all - train_all is the generalisation gap."""
        W = self.config.grid
        held_codes, held_labels, held_entropy = self.store_rows(self.held_out_codes, None)
        model, args = model_from_checkpoint(analysis.run_checkpoint(self.run_dir(run)))
        patching = sampling_patching(args, PatchingOverrides()) if run.patched else None
        loss = self.token_losses(model, patching, held_codes, held_labels, held_entropy)  # (N, T)
        calibrated = PatchingConfig("entropy", self.demo.main_analysis()["patching"]["threshold"],
                                    self.config.max_patch_length, True)
        starts = calibrated.starts(held_entropy, W)  # (N, T) the positions are the calibrated DPAR's
        row_start = torch.zeros_like(starts)
        row_start[:, ::W] = True
        kinds = {"row_start": row_start, "patch_start": starts & ~row_start, "inside_patch": ~starts}
        train = self.token_losses(model, patching, *self.store_rows(self.paths.codes(self.size), len(held_codes)))
        return {"all": float(loss.mean()), "tokens": int(loss.numel()), "train_all": float(train.mean()),
                **{k: float(loss[m].mean()) for k, m in kinds.items()},
                **{f"{k}_share": float(m.double().mean()) for k, m in kinds.items()}}

    def store_rows(self, path: Path, count: Optional[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Codes (N, T), labels (N,) and float16-rounded entropies (N, T) of the centre views of a
        store: all images, or `count` of them spread evenly over it."""
        store = open_code_store(path)
        rows = np.arange(len(store)) if count is None else np.linspace(0, len(store) - 1, count).astype(np.int64)
        entropy = analysis.stored_entropies(path, self.paths.entropy_ckpt(self.size))[rows, 0]
        return (torch.from_numpy(np.array(store.codes[rows, 0], dtype=np.int64)),
                torch.from_numpy(np.array(store.labels[rows], dtype=np.int64)),
                torch.from_numpy(entropy.astype(np.float32)))

    def token_losses(self, model, patching: Optional[PatchingConfig], codes, labels, entropy) -> torch.Tensor:
        """(N, T) teacher-forced cross-entropy of every token."""
        if patching is not None:
            logits, _ = model(codes[:, :-1], labels, patching.lengths(entropy, self.config.grid))
        else:
            logits, _ = model(codes[:, :-1], labels)
        return F.cross_entropy(logits.transpose(1, 2), codes, reduction="none").double()

    # -----------------------------------------------------------------------------------
    @property
    def threads(self) -> int:
        return max(1, (os.cpu_count() or 1) // self.jobs)

    def train_and_sample(self, run: Run) -> None:
        """One worker's share: train the run (a subprocess), then sample it (one run at a time)."""
        self.runner.run(self.train_stage(run))
        with self.sampling_lock:
            self.runner.run(self.sample_stage(run))

    def run(self, rows: Sequence[str]) -> None:
        shared = self.demo.resolution_stages(self.size, main=True) + [self.demo.classifier_stage()]
        for stage in shared:
            self.runner.run(stage)
        selected = [r for r in self.runs if r.row in rows]
        if selected:  # seed 0 of both models is every other row's reference
            selected = [r for r in self.runs if r in selected or r.name in ("gpt_seed0", "dpar_seed0")]
        self.runner.concurrent = self.jobs > 1
        torch.set_num_threads(self.threads)  # in-process sampling shares the machine with a training
        with ThreadPoolExecutor(self.jobs) as pool:
            list(pool.map(self.train_and_sample, selected))  # in order; the first failure is raised
        self.runner.concurrent = False
        if "boundaries" in rows:
            self.runner.run(self.held_out_stage())
            self.runner.run(self.boundary_stage(self.runs))


# ---------------------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------------------
def spread(values: Sequence[float]) -> dict:
    return {"mean": float(np.mean(values)), "min": float(np.min(values)), "max": float(np.max(values)),
            "n": len(values)}


def collect(study: QualityStudy) -> dict:
    """Every finished run's numbers, read from the stage markers."""
    markers = study.runner.marker_dir
    out = {"runs": {}, "config": dataclasses.asdict(study.config), "machine": machine_description()}
    for run in study.runs:
        train, sample = read_json(markers / f"train_{run.name}.json"), read_json(markers / f"sample_{run.name}.json")
        if train is None or sample is None:
            continue
        points = {}
        for step, _ in study.checkpoints(run):
            r = sample["result"][study.sample_name(run, step)]
            points[step] = {"fd": r["domain_metric"]["domain_frechet_distance"],
                            "class_consistency": r["domain_metric"]["class_consistency"],
                            "floor": r["domain_metric"]["real_vs_real_domain_frechet_distance"],
                            "patch_decisions": r.get("patch_decisions"),
                            "patches_per_image": r["throughput"].get("patches_per_image")}
        last = points[max(points)]
        out["runs"][run.name] = {"row": run.row, "what": run.what, "model": run.model, "seed": run.seed,
                                 "steps": study.steps(run), "final_loss": train["result"]["final_loss"],
                                 "train_seconds": train["seconds"], **last, "points": points}
    boundaries = read_json(markers / "boundaries.json")
    if boundaries is not None:
        for name, b in boundaries["result"].items():
            if name in out["runs"]:
                out["runs"][name]["held_out"] = b
    seeds = {}
    for label, family, first in SEED_FAMILIES:
        runs = [out["runs"][n] for n in out["runs"] if n == first or n.startswith(f"{family}_seed")]
        if runs:
            seeds[label] = {"fd": spread([r["fd"] for r in runs]),
                            "class_consistency": spread([r["class_consistency"] for r in runs]),
                            "final_loss": spread([r["final_loss"] for r in runs])}
    out["seeds"] = seeds
    out["fd_ratios_of_means"] = {depth: seeds[f"DPAR-{depth}"]["fd"]["mean"] / seeds[f"GPT-{depth}"]["fd"]["mean"]
                                 for depth in ("XS", "XS8") if f"GPT-{depth}" in seeds and f"DPAR-{depth}" in seeds}
    return out


def fmt(x, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def write_markdown(d: dict, path: Path, figure: Optional[str]) -> None:
    runs, lines = d["runs"], ["# Quality study: DPAR against its GPT baseline", ""]
    m = d["machine"]
    lines += [f"Machine: {m['cpu_count']} CPUs, torch {m['torch']}, GPU {m['cuda'] or 'none'}; "
              f"written {time.strftime('%Y-%m-%d %H:%M')}. Samples per class: {d['config']['samples_per_class']}, "
              f"guidance {d['config']['cfg_scale']}. FD = domain Frechet distance (lower is better), "
              "CC = class consistency.", ""]
    if d["seeds"]:
        lines += ["## Seed spread (training seeds 0-2, same data)", "",
                  "| model | runs | FD mean (min-max) | CC mean (min-max) | final loss mean |", "|---|---|---|---|---|"]
        for family, s in d["seeds"].items():
            lines.append(f"| {family} | {s['fd']['n']} | {fmt(s['fd']['mean'], 1)} "
                         f"({fmt(s['fd']['min'], 1)}-{fmt(s['fd']['max'], 1)}) | {fmt(s['class_consistency']['mean'])} "
                         f"({fmt(s['class_consistency']['min'])}-{fmt(s['class_consistency']['max'])}) | "
                         f"{fmt(s['final_loss']['mean'])} |")
        for depth, ratio in d["fd_ratios_of_means"].items():
            lines.append(f"\nDPAR-{depth} / GPT-{depth} domain FD, ratio of the seed means: **{ratio:.2f}**.")
        lines.append("")
    lines += ["## Every run", "",
              "| run | what | steps | FD | floor | CC | train loss (last log) | loss in eval: train images / held-out | held-out loss: row starts / other patch starts / inside patches | sampled patch decisions off |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in runs.items():
        h = r.get("held_out")
        evals = f"{fmt(h['train_all'])} / {fmt(h['all'])}" if h else ""
        held = f"{fmt(h['row_start'])} / {fmt(h['patch_start'])} / {fmt(h['inside_patch'])}" if h else ""
        pd = r.get("patch_decisions")
        off = f"{pd['differing']} of {pd['tokens']}" if pd else ""
        lines.append(f"| {name} | {r['what']} | {r['steps']} | {fmt(r['fd'], 1)} | {fmt(r['floor'], 1)} | "
                     f"{fmt(r['class_consistency'])} | {fmt(r['final_loss'])} | {evals} | {held} | {off} |")
    long_runs = {n: r for n, r in runs.items() if len(r["points"]) > 1}
    if long_runs:
        lines += ["", "## Convergence (FD at every quarter of the long runs)", "",
                  "| run | " + " | ".join(f"step {s}" for s in next(iter(long_runs.values()))["points"]) + " |",
                  "|---|" + "---|" * len(next(iter(long_runs.values()))["points"])]
        for n, r in long_runs.items():
            lines.append(f"| {n} | " + " | ".join(fmt(p["fd"], 1) for p in r["points"].values()) + " |")
        if figure:
            lines += ["", f"![FD against steps]({figure})"]
    missing = [r.name for r in d["all_runs"] if r.name not in runs]
    if missing:
        lines += ["", f"Not run yet: {', '.join(missing)}."]
    path.write_text("\n".join(lines) + "\n")


def write_report(study: QualityStudy) -> dict:
    d = collect(study)
    out = study.paths.out
    figure = None
    long_runs = {n: r for n, r in d["runs"].items() if len(r["points"]) > 1}
    if long_runs:
        study.paths.figures.mkdir(parents=True, exist_ok=True)
        series = [(n, [int(s) for s in r["points"]], [p["fd"] for p in r["points"].values()])
                  for n, r in long_runs.items()]
        line_plot(series, "optimizer step", "domain Frechet distance", "Sample quality against training steps").save(
            study.paths.figures / "quality_convergence.png")
        figure = "figures/quality_convergence.png"
    write_json_atomic(out / "quality_study.json", d)
    write_markdown({**d, "all_runs": study.runs}, out / "quality_study.md", figure)
    return d


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.quality_study", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default="demo_out/quality", help="output folder")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS), help="rows of the study to run")
    p.add_argument("--jobs", type=int, default=None,
                   help="trainings side by side, each with cpus/jobs threads (default: 2 with 2 or more CPUs)")
    p.add_argument("--seeds", type=int, default=SEEDS, help="training seeds of the seed-spread row")
    p.add_argument("--samples-per-class", type=int, default=STUDY_SAMPLES_PER_CLASS,
                   help="samples per class and run for the domain metric")
    p.add_argument("--train-steps", type=int, default=None, help="steps of the XS runs (default: the preset's)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                   help="redo every stage, or only the named ones (e.g. --force boundaries)")
    p.add_argument("--report-only", action="store_true", help="write the table from the finished runs only")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # the tests' scale
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    config = preset("tiny" if args.tiny else "default")
    config = dataclasses.replace(config, samples_per_class=args.samples_per_class, device=args.device,
                                 **({"train_steps": args.train_steps} if args.train_steps else {}))
    config.check()
    jobs = args.jobs or (2 if (os.cpu_count() or 1) >= 2 else 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study = QualityStudy(config, out, jobs, args.seeds, args.force)
    clear_stale(study.paths)
    start = time.time()
    try:
        if not args.report_only:
            study.run(args.rows)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"python -m demo.quality_study: error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; rerun the same command to continue where it stopped")
    d = write_report(study)
    print(f"finished in {(time.time() - start) / 60:.1f} min; {len(d['runs'])} of {len(study.runs)} runs measured; "
          f"table: {out / 'quality_study.md'}")


if __name__ == "__main__":
    main()
