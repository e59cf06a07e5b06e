"""The resolution-scaling study (the paper's Fig. 5 on synthetic data): patches per image against
tokens per image at one fixed tau, on log-log axes, with the fitted exponent.

    python -m demo.resolution_study                          # 32, 48, 64, 96 px; about 6 minutes on 2 idle CPU cores
    python -m demo.resolution_study --out DIR --sizes 32 64 128 256 --device cuda

The same scenes at every size: dataset.synthetic draws image (class k, index i) from (seed, k, i)
with positions and sizes as fractions of the image, so only the pixel count grows, not the detail.
One convolutional VQ tokenizer, trained at the smallest size, encodes every size (as the paper's
VQ-16 serves 256 to 512 px); each size gets its own unconditional entropy model, because its token
grid differs (the paper trains one per resolution too). tau is calibrated at the smallest size for
the paper's 1.81 tokens per patch and then held fixed. Sub-quadratic growth in image side means an
exponent below 1 in tokens (tokens grow with the square of the side).

The stages are the demo's (demo/pipeline.py): data, tokenizer, codes, entropy model, entropies and
patch statistics per size, with the same done markers, so a rerun skips what is finished. Writes
<out>/resolution_scaling.{json,md,png}.
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

from demo.config import DemoConfig
from demo.figures import BLACK, COLOURS, GREY, WHITE, font
from demo.pipeline import Demo, Paths, clear_stale, machine_description
from demo.stages import Stage, print_now, read_json, write_json_atomic
from utils.cli import HelpFormatter

SIZES = (32, 48, 64, 96)


def study_config(sizes: Sequence[int] = SIZES, seed: int = 0, device: str = "auto", **overrides) -> DemoConfig:
    """The study's settings as a demo config: the demo's data style (6 shape classes, 4 colours,
    flat backgrounds, objects 0.3-0.45 image sizes in radius), a downsample-4 VQ with 64 codes,
    GPT-T entropy models, tau for 1.81 tokens per patch at sizes[0], P_max 4, row reset."""
    if len(sizes) < 2 or sorted(set(sizes)) != list(sizes):
        raise ValueError(f"--sizes must be at least two increasing image sizes, got {list(sizes)}")
    config = DemoConfig(preset="resolution", seed=seed, device=device, per_class=60, image_size=sizes[0],
                        resolutions=list(sizes[1:]), vq_ch=16, vq_steps=600, entropy_steps=300, entropy_batch=16,
                        entropy_lr=2e-3, target_compression=1.81, max_patch_length=4, inference_compressions=[])
    config = dataclasses.replace(config, **overrides)
    config.check()
    return config


def fit_power_law(tokens: Sequence[float], patches: Sequence[float]) -> dict:
    """Least squares on logs: log patches = log a + b log tokens. Returns exponent b, its
    standard error (exponent_se; 0 with two points), prefactor a and r2 (of the log fit)."""
    x, y = np.log(np.asarray(tokens, dtype=np.float64)), np.log(np.asarray(patches, dtype=np.float64))
    if x.size < 2 or np.ptp(x) == 0:
        raise ValueError("a power-law fit needs at least two different token counts")
    b, log_a = np.polyfit(x, y, 1)
    residual = y - (log_a + b * x)
    spread = ((y - y.mean()) ** 2).sum()
    r2 = 1.0 - (residual**2).sum() / spread if spread > 0 else 1.0
    se = math.sqrt((residual**2).sum() / (x.size - 2) / ((x - x.mean()) ** 2).sum()) if x.size > 2 else 0.0
    return {"exponent": float(b), "exponent_se": float(se), "prefactor": float(math.exp(log_a)), "r2": float(r2)}


def is_sub_quadratic(fit: dict) -> bool:
    """Patches grow slower than the pixel count: the exponent in tokens is below 1 by more than
    two standard errors (and more than rounding)."""
    return fit["exponent"] + 2 * fit["exponent_se"] < 1.0 - 1e-9


@dataclass
class SharedTokenizerPaths(Paths):
    """The demo's layout, with one tokenizer folder for every size."""

    def vq_dir(self, size: int) -> Path:
        return self.out / "vq"


class ResolutionStudy(Demo):
    """The demo's per-size stages for every size (one shared tokenizer), then the scaling fit."""

    def __init__(self, config: DemoConfig, out: Path, force: Optional[list[str]] = None, log=print_now):
        super().__init__(config, out, force, log)
        self.paths = SharedTokenizerPaths(self.paths.out)

    @property
    def sizes(self) -> list[int]:
        return [self.config.image_size, *self.config.resolutions]

    def stages(self) -> list[Stage]:
        c, first = self.config, self.config.image_size
        out = [self.data_stage(size, c.per_class) for size in self.sizes] + [self.vq_stage(first)]
        for size in self.sizes:
            codes = self.codes_stage(size, c.per_class)
            out += [dataclasses.replace(codes, deps=[f"data_{size}", f"vq_{first}"]), self.entropy_model_stage(size),
                    self.entropy_stage(size), self.analysis_stage(size, main=size == first)]
        return out + [self.scaling_stage()]

    def run_study(self) -> dict:
        stages = self.stages()
        self.runner.total = len(stages)
        for stage in stages:
            self.runner.run(stage)
        return self.runner.results["scaling"]["result"]

    def scaling_stage(self) -> Stage:
        out = self.paths.out

        def run() -> dict:
            rows = [scaling_row(read_json(self.paths.analysis(size))) for size in self.sizes]
            result = scaling_result(rows)
            write_json_atomic(out / "resolution_scaling.json", result)
            (out / "resolution_scaling.md").write_text(scaling_markdown(result))
            scaling_figure(result).save(out / "resolution_scaling.png")
            return {k: result[k] for k in ("exponent", "exponent_se", "r2", "threshold", "sub_quadratic")}

        def validate() -> None:
            if read_json(out / "resolution_scaling.json") is None or not (out / "resolution_scaling.png").is_file():
                raise ValueError("no resolution_scaling.json / .png")

        return Stage("scaling", "patches vs tokens per image at the fixed tau, log-log fit", {"sizes": self.sizes},
                     run, validate, outputs=[out / f"resolution_scaling.{e}" for e in ("json", "md", "png")],
                     deps=[f"analysis_{size}" for size in self.sizes])


def scaling_row(analysis: dict) -> dict:
    """One size's numbers from its analysis.json (demo.analysis.analyse_store)."""
    return {"image_size": analysis["image_size"], "grid": analysis["grid"], "tokens": analysis["tokens_per_image"],
            "patches": analysis["patches_per_image"], "compression": analysis["compression"],
            "threshold": analysis["patching"]["threshold"], "max_patch_length": analysis["patching"]["max_patch_length"],
            "sequences": analysis["num_sequences"], "detailed_share": analysis["masks"]["detailed_share"],
            "mean_entropy": analysis["entropy_mean"]}


def scaling_result(rows: list[dict]) -> dict:
    """The fit over the sizes' rows (one tau throughout)."""
    taus = {r["threshold"] for r in rows}
    if len(taus) != 1:
        raise ValueError(f"the sizes were patched at different thresholds {sorted(taus)}")
    fit = fit_power_law([r["tokens"] for r in rows], [r["patches"] for r in rows])
    return {"rows": rows, "threshold": taus.pop(), "calibrated_at": rows[0]["image_size"],
            "compression_at_calibration": rows[0]["compression"], **fit, "sub_quadratic": is_sub_quadratic(fit),
            "side_exponent": 2 * fit["exponent"]}


def scaling_markdown(result: dict) -> str:
    lines = [f"Patches per image at tau = {result['threshold']:.4f} (calibrated at {result['calibrated_at']} px), "
             f"P_max {result['rows'][0]['max_patch_length']}, row reset.", "",
             "| image size | token grid | tokens/image | patches/image | tokens/patch | detailed tokens |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['image_size']} px | {r['grid'][0]}x{r['grid'][1]} | {r['tokens']} | {r['patches']:.1f} | "
                     f"{r['compression']:.2f} | {100 * r['detailed_share']:.0f}% |")
    verdict = ("sub-quadratic in the image side (exponent + 2 standard errors < 1)" if result["sub_quadratic"]
               else "not shown sub-quadratic (exponent + 2 standard errors >= 1)")
    lines += ["", f"Fit (least squares on logs): patches = {result['prefactor']:.3f} x tokens^{result['exponent']:.3f} "
              f"(standard error {result['exponent_se']:.3f}, r2 {result['r2']:.4f}), i.e. "
              f"side^{result['side_exponent']:.2f}: {verdict}."]
    return "\n".join(lines) + "\n"


def scaling_figure(result: dict, size: tuple[int, int] = (640, 440)) -> Image.Image:
    """Log-log plot: DPAR's patches per image (points, fitted line) and GPT's tokens (slope 1)."""
    rows = result["rows"]
    tokens = np.array([r["tokens"] for r in rows], dtype=np.float64)
    patches = np.array([r["patches"] for r in rows], dtype=np.float64)
    f, small = font(13), font(11)
    W, H = size
    left, right, top, bottom = 64, 16, 34, 46
    x_lo, x_hi = math.log10(tokens.min() / 1.2), math.log10(tokens.max() * 1.2)
    y_lo, y_hi = math.log10(patches.min() / 1.3), math.log10(tokens.max() * 1.2)
    canvas = Image.new("RGB", size, WHITE)
    draw = ImageDraw.Draw(canvas)

    def px(x: float, y: float) -> tuple[float, float]:  # data values (not logs) -> pixels
        return (left + (math.log10(x) - x_lo) / (x_hi - x_lo) * (W - left - right),
                H - bottom - (math.log10(y) - y_lo) / (y_hi - y_lo) * (H - top - bottom))

    def width(text: str) -> float:
        l, _, r, _ = draw.textbbox((0, 0), text, font=small)
        return r - l

    draw.rectangle([left, top, W - right, H - bottom], outline=BLACK)
    ticks = [m * 10**e for e in range(0, 6) for m in (1, 2, 5)]
    for t in (t for t in ticks if x_lo <= math.log10(t) <= x_hi):
        x, _ = px(t, 10**y_lo)
        draw.line([(x, top + 1), (x, H - bottom - 1)], fill=(235, 235, 235))
        draw.text((x - width(f"{t:g}") / 2, H - bottom + 6), f"{t:g}", fill=BLACK, font=small)
    for t in (t for t in ticks if y_lo <= math.log10(t) <= y_hi):
        _, y = px(10**x_lo, t)
        draw.line([(left + 1, y), (W - right - 1, y)], fill=(235, 235, 235))
        draw.text((left - 6 - width(f"{t:g}"), y - 6), f"{t:g}", fill=BLACK, font=small)
    span = np.geomspace(tokens.min() / 1.1, tokens.max() * 1.1, 2)
    draw.line([px(t, t) for t in span], fill=GREY, width=2)  # GPT: one position per token
    fit = [px(t, result["prefactor"] * t ** result["exponent"]) for t in span]
    draw.line(fit, fill=COLOURS[0], width=2)
    for r, t, p in zip(rows, tokens, patches):
        x, y = px(t, p)
        draw.ellipse([x - 4, y - 4, x + 4, y + 4], fill=COLOURS[1])
        draw.text((x + 6, y + 2), f"{r['image_size']} px", fill=BLACK, font=small)
    legend = [(GREY, "GPT: positions = tokens (exponent 1)"),
              (COLOURS[0], f"DPAR fit: exponent {result['exponent']:.3f} (r2 {result['r2']:.3f})"),
              (COLOURS[1], "DPAR: patches per image (measured)")]
    for k, (colour, text) in enumerate(legend):
        ly = top + 8 + 16 * k
        draw.line([(left + 10, ly + 7), (left + 30, ly + 7)], fill=colour, width=3)
        draw.text((left + 36, ly), text, fill=BLACK, font=small)
    title = f"Patches vs tokens per image at a fixed tau ({result['threshold']:.3f}, set at {result['calibrated_at']} px)"
    draw.text((left, 10), title, fill=BLACK, font=f)
    x_label = "tokens per image (log)"
    draw.text((left + (W - left - right - width(x_label)) / 2, H - 18), x_label, fill=BLACK, font=small)
    label = Image.new("RGB", (int(width("patches per image (log)")) + 4, 14), WHITE)
    ImageDraw.Draw(label).text((2, 0), "patches per image (log)", fill=BLACK, font=small)
    rotated = label.rotate(90, expand=True)
    canvas.paste(rotated, (4, top + (H - top - bottom - rotated.height) // 2))
    return canvas


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo.resolution_study", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter, epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default="resolution_out", help="output folder")
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="image sizes, increasing")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and every model")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--per-class", type=int, default=None, help="images per class (default 60, 6 classes)")
    p.add_argument("--vq-steps", type=int, default=None, help="tokenizer training steps (default 600)")
    p.add_argument("--entropy-steps", type=int, default=None, help="steps of each entropy model (default 300)")
    p.add_argument("--target-compression", type=float, default=None,
                   help="tokens per patch tau is calibrated to at the smallest size (default the paper's 1.81)")
    p.add_argument("--max-patch-length", type=int, default=None, help="P_max (default 4)")
    p.add_argument("--force", nargs="*", default=None, metavar="STAGE", help="redo every stage, or the named ones")
    return p.parse_args(argv)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    overrides = {k: v for k, v in (("per_class", args.per_class), ("vq_steps", args.vq_steps),
                                   ("entropy_steps", args.entropy_steps),
                                   ("target_compression", args.target_compression),
                                   ("max_patch_length", args.max_patch_length)) if v is not None}
    start = time.time()
    try:
        config = study_config(args.sizes, args.seed, args.device, **overrides)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        machine = machine_description()
        load = " ".join(f"{x:.2f}" for x in machine.get("load_average", []))
        print(f"resolution study: sizes {args.sizes} px, {config.classes} classes x {config.per_class} images; "
              f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']}, load average {load or '?'}")
        study = ResolutionStudy(config, out, args.force)
        clear_stale(study.paths)
        result = study.run_study()
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"python -m demo.resolution_study: error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; rerun the same command to continue where it stopped")
    print(f"finished in {(time.time() - start) / 60:.1f} min: exponent {result['exponent']:.3f} "
          f"+- {result['exponent_se']:.3f} in tokens (r2 {result['r2']:.3f}) at tau {result['threshold']:.4f}; "
          f"{out / 'resolution_scaling.png'}")


if __name__ == "__main__":
    main(sys.argv[1:])
