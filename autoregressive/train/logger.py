"""Training log: one line per --log-every steps on rank 0 (console or tqdm, log.txt), one
JSON record per line in log.jsonl (for plotting), and wandb when asked.

Per-step losses and gradient norms stay on the device; they are all-reduced (one small
collective, every rank takes part) and read only at log steps.

Speed (steps/s, images/s, tokens/s, patches/s, MFU) is steady-state: the first
--speed-warmup-steps steps of a run (compilation, autotuning, allocator warm-up) are timed
apart: a record whose timed steps include any of them carries "warmup": true ("warm-up" in the
line), and the window in which the warm-up ends is timed from its end.
"""
import argparse
import json
import os
import re
import sys
import time
from pathlib import Path

import torch

from utils.distributed import DistInfo, all_reduce


def truncate_log(path: Path, step: int) -> None:
    """Drop records after `step` (written by a run that died after its last checkpoint)."""
    if not path.is_file():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


class TrainLogger:
    def __init__(self, run_dir: Path, args: argparse.Namespace, info: DistInfo, total_steps: int, flop_params: tuple):
        self.args, self.info, self.total_steps = args, info, total_steps
        self.jsonl, self.text = run_dir / "log.jsonl", run_dir / "log.txt"
        self.flop_params = flop_params  # (token-level, patch-level) matmul parameters
        self.sums = torch.zeros(3, dtype=torch.float64, device=info.device)  # loss, grad norm, counted steps
        self.tokens = self.patches = self.images = self.steps = 0  # timed: after the warm-up
        self.window_steps = 0  # every step since the last log line
        self.window_warm = False  # the timed steps include warm-up steps
        self.warmup_left = args.speed_warmup_steps
        self.last_time = time.perf_counter()
        self.bar = None  # tqdm, opened at the first step when stdout is a terminal
        self.wandb = self._init_wandb(run_dir) if args.wandb and info.is_main else None

    def _init_wandb(self, run_dir: Path):
        os.environ.setdefault("WANDB_MODE", "offline")
        import wandb

        run_id = re.sub(r"[^A-Za-z0-9_.-]", "_", run_dir.name)
        config = {k: v for k, v in vars(self.args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        return wandb.init(project=self.args.wandb_project, name=run_dir.name, id=run_id, dir=str(run_dir),
                          config=config, resume="allow")

    def print(self, message: str) -> None:
        """Rank 0: to the console (above the bar) and log.txt."""
        if not self.info.is_main:
            return
        (self.bar.write if self.bar else print)(message)
        sys.stdout.flush()
        with open(self.text, "a") as f:
            f.write(message + "\n")

    def update(self, step: int, epoch: int, lr: float, loss: torch.Tensor, grad_norm: torch.Tensor,
               weight: torch.Tensor, batches: list) -> None:
        """Accumulate one optimizer step (weight 0 for a skipped non-finite step)."""
        w = weight.double()
        self.sums += torch.stack([torch.nan_to_num(loss.double()) * w, torch.nan_to_num(grad_norm.double()) * w, w])
        self.window_steps += 1
        self.tokens += sum(b.tokens for b in batches)
        self.patches += sum(b.patches or 0 for b in batches)
        self.images += sum(b.images for b in batches)
        self.steps += 1
        logging = step % self.args.log_every == 0 or step == self.total_steps
        if self.warmup_left > 0:
            self.warmup_left -= 1
            self.window_warm = True
            if self.warmup_left == 0 and not logging:  # a log line now restarts the timing anyway
                self._restart_speed()
        if self.bar is None and self.info.is_main and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=self.total_steps, initial=step - 1, dynamic_ncols=True, leave=False)
        if self.bar is not None:
            self.bar.update(1)
        if logging:
            self.flush(step, epoch, lr)

    def _restart_speed(self) -> None:
        """End of the warm-up: time from here, once the device has finished the warm-up steps
        (one synchronisation per run)."""
        if self.info.device.type == "cuda":
            torch.cuda.synchronize(self.info.device)
        self.tokens = self.patches = self.images = self.steps = 0
        self.window_warm = False
        self.last_time = time.perf_counter()

    def flush(self, step: int, epoch: int, lr: float) -> None:
        counts = torch.tensor([self.tokens, self.patches, self.images], dtype=torch.float64, device=self.info.device)
        totals = all_reduce(torch.cat([self.sums, counts]), "sum").tolist()
        loss_sum, norm_sum, counted, tokens, patches, images = totals
        elapsed = time.perf_counter() - self.last_time
        record = {"step": step, "epoch": epoch, "lr": lr,
                  "loss": loss_sum / counted if counted else float("nan"),
                  "grad_norm": norm_sum / counted if counted else float("nan"),
                  "steps_per_s": self.steps / elapsed, "images_per_s": images / elapsed,
                  "tokens_per_s": tokens / elapsed}
        if patches:
            record.update(patches_per_s=patches / elapsed, mean_patch_length=tokens / patches)
        if self.info.device.type == "cuda":  # 6 * N * D: matmul FLOPs, attention scores left out
            tok_params, patch_params = self.flop_params
            flops = 6 * (tok_params * tokens + patch_params * (patches or tokens))
            record["mfu"] = flops / elapsed / (self.args.peak_tflops * 1e12 * self.info.world_size)
        if self.window_warm:
            record["warmup"] = True
        if self.window_steps > counted / self.info.world_size:
            record["skipped"] = int(self.window_steps - counted / self.info.world_size)
        self._write(record)
        self.sums.zero_()
        self.tokens = self.patches = self.images = self.steps = self.window_steps = 0
        self.window_warm = False
        self.last_time = time.perf_counter()

    def _write(self, r: dict) -> None:
        if not self.info.is_main:
            return
        line = (f"step {r['step']:>7d}/{self.total_steps} | loss {r['loss']:.4f} | lr {r['lr']:.2e} | "
                f"grad {r['grad_norm']:.3f} | {r['steps_per_s']:.2f} steps/s | {r['images_per_s']:,.1f} img/s | "
                f"{r['tokens_per_s']:,.0f} tok/s")
        if "patches_per_s" in r:
            line += f" | {r['patches_per_s']:,.0f} patches/s | patch len {r['mean_patch_length']:.2f}"
        if "mfu" in r:
            line += f" | mfu {100 * r['mfu']:.1f}%"
        if "warmup" in r:
            line += " | warm-up"
        if "skipped" in r:
            line += f" | skipped {r['skipped']}"
        self.print(line)
        with open(self.jsonl, "a") as f:
            f.write(json.dumps(r) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in r.items() if k != "step"}, step=r["step"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
