"""Run the whole DPAR pipeline offline on synthetic data and write a replication report.

    python -m demo                 # about 30 minutes on a 2-core CPU -> demo_out/report.md
    python -m demo --quick         # under 10 minutes, smaller everything
    python -m demo --full          # adds the static-patch model and the multi-resolution study
    python -m demo --out DIR --train-steps 1000 --model-size S --device cuda

Stages: synthetic data -> VQ tokenizer -> codes (with flips) -> entropy model -> entropies,
tau calibration, statistics -> domain-metric classifier -> GPT baseline and DPAR training ->
sampling with guidance + domain metric -> compute accounting -> report. A rerun skips every
finished stage whose settings did not change and resumes an interrupted training;
--force redoes everything (or the named stages).
"""
import argparse
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from demo.config import add_arguments, config_from_args
from demo.pipeline import Demo, clear_stale, machine_description, write_run_record
from demo.report import report_stage
from utils.cli import HelpFormatter


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m demo", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--out", default="demo_out", help="output folder (report.md lands here)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data, every model and the samples")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA when available")
    p.add_argument("--force", nargs="*", default=None, metavar="STAGE",
                   help="redo every stage, or only the named ones (e.g. --force sample report)")
    add_arguments(p)
    return p.parse_args(argv)


def load_text(machine: dict) -> str:
    """The 1-minute load average, rounded (or '?' where the platform has none)."""
    load = machine.get("load_average")
    return f"{load[0]:.2f}" if load else "?"


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    try:
        config = config_from_args(args)
    except ValueError as e:
        raise SystemExit(f"python -m demo: error: {e}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    machine = machine_description()
    print(f"DPAR demo, preset {config.preset}: {config.classes} classes x {config.per_class} images at "
          f"{config.image_size}px ({config.grid}x{config.grid} tokens), {config.gpt_model} vs {config.dpar_model}, "
          f"{config.train_steps} steps; output in {out}/")
    print(f"machine: {machine['cpu_count']} CPUs, torch {machine['torch']} ({machine['torch_threads']} threads), "
          f"GPU {machine['cuda'] or 'none'}, load average {load_text(machine)}")
    start = time.time()
    try:
        demo = Demo(config, out, args.force)
        clear_stale(demo.paths)
        demo.run(report_stage)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"python -m demo: error: {e}")
    except KeyboardInterrupt:
        raise SystemExit("\ninterrupted; rerun the same command to continue where it stopped")
    seconds = time.time() - start
    write_run_record(demo.paths, config, sys.argv[1:] if argv is None else list(argv), seconds)
    verdicts = demo.runner.results["report"]["result"]["verdicts"]
    print(f"finished in {seconds / 60:.1f} min; report: {out / 'report.md'}")
    words = {True: "held", False: "did not hold", None: "not measured"}
    print("claims: " + ", ".join(f"{k} {words.get(v, v)}" for k, v in verdicts.items()))


if __name__ == "__main__":
    main()
