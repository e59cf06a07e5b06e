"""Train a VQ tokenizer (LlamaGen VQModel layout) on an ImageFolder, single process.

    python -m tokenizer.train_vq --data-path IMAGEFOLDER --results-dir runs/vq --vq-model VQ-16 \
        --image-size 64 --ch 32 --ch-mult 1 2 2 --codebook-size 512 --z-channels 32 --max-steps 1000

Loss = reconstruction (L2 by default, or L1) + codebook + beta * commitment (+ LlamaGen's entropy term
when --entropy-loss-ratio > 0; off by default as in LlamaGen). LlamaGen's perceptual (LPIPS) and
adversarial (PatchGAN) losses are not available here, so reconstructions are blurrier than those of its
released tokenizers. With --restart-dead-every N, codes chosen by no latent in the last N steps are moved
onto latents of the current batch (small data leaves most of a randomly initialised codebook unused);
--lr-schedule cosine decays the learning rate to --min-lr after --warmup-steps of linear warmup.

Writes DIR/log.txt, DIR/checkpoints/{step:07d}.pt every --ckpt-every steps and DIR/checkpoints/final.pt
({"model", "optimizer", "step", "epoch", "args": {"vq_model", "model_config", ...}}), and DIR/metrics.json
with reconstruction PSNR and codebook usage on the evaluation images.
"""
import argparse
import copy
import json
import logging
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision import datasets, transforms
from tqdm import tqdm

from dataset.imagefolder import load_rgb
from tokenizer.vq_model import VQ_models, VQConfig, VQModel, vq_config
from utils.checkpoint import save_checkpoint_atomic
from utils.cli import HelpFormatter


@dataclass
class Setup:
    """Validated inputs of a run."""
    config: VQConfig
    train_set: Dataset
    eval_set: Dataset
    eval_split: str  # "val" (--val-data-path) or "train" (first --eval-images training images, no flip)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tokenizer.train_vq",
                                description="Train a VQ image tokenizer (LlamaGen VQModel layout).",
                                formatter_class=HelpFormatter)
    p.add_argument("--data-path", type=str, required=True, help="ImageFolder root (class subfolders)")
    p.add_argument("--val-data-path", type=str, default=None, help="held-out ImageFolder for the final metrics")
    p.add_argument("--results-dir", type=str, default="results/vq",
                   help="run folder (checkpoints/, log.txt, metrics.json)")
    p.add_argument("--vq-model", type=str, choices=list(VQ_models), default="VQ-16", help="tokenizer registry name")
    p.add_argument("--image-size", type=int, default=256, help="training image size")
    defaults = VQConfig()
    p.add_argument("--ch", type=int, default=None, help=f"base width (default: {defaults.ch})")
    p.add_argument("--ch-mult", type=int, nargs="+", default=None, help="width multipliers (default: the registry's)")
    p.add_argument("--num-res-blocks", type=int, default=None, help=f"default: {defaults.num_res_blocks}")
    p.add_argument("--z-channels", type=int, default=None, help=f"default: {defaults.z_channels}")
    p.add_argument("--codebook-size", type=int, default=None, help=f"default: {defaults.codebook_size}")
    p.add_argument("--codebook-embed-dim", type=int, default=None, help=f"default: {defaults.codebook_embed_dim}")
    p.add_argument("--codebook-l2-norm", action=argparse.BooleanOptionalAction, default=None,
                   help=f"default: {defaults.codebook_l2_norm}")
    p.add_argument("--norm-groups", type=int, default=None, help=f"GroupNorm groups (default: {defaults.norm_groups})")
    p.add_argument("--dropout", type=float, default=None, help=f"default: {defaults.dropout}")
    p.add_argument("--commit-loss-beta", type=float, default=None, help=f"default: {defaults.commit_loss_beta}")
    p.add_argument("--entropy-loss-ratio", type=float, default=None, help=f"default: {defaults.entropy_loss_ratio}")
    p.add_argument("--rec-loss", type=str, choices=["l2", "l1"], default="l2", help="pixel reconstruction loss")
    p.add_argument("--codebook-weight", type=float, default=1.0, help="weight of the codebook and commitment losses")
    p.add_argument("--epochs", type=int, default=None, help="epochs to train (unless --max-steps)")
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps")
    p.add_argument("--global-batch-size", type=int, default=16, help="images per optimizer step")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate")
    p.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant, or cosine decay to --min-lr at the last step")
    p.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0")
    p.add_argument("--min-lr", type=float, default=0.0, help="final learning rate of the cosine schedule")
    p.add_argument("--restart-dead-every", type=int, default=0,
                   help="every N steps, move codes unused in those N steps onto current latents (0 = off)")
    p.add_argument("--beta1", type=float, default=0.9, help="Adam beta1")
    p.add_argument("--beta2", type=float, default=0.95, help="Adam beta2")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    p.add_argument("--seed", type=int, default=0, help="seed of weights and data order")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes (0 = in process)")
    p.add_argument("--log-every", type=int, default=100, help="log line every N steps")
    p.add_argument("--ckpt-every", type=int, default=5000, help="checkpoint every N steps (and at the end)")
    p.add_argument("--eval-images", type=int, default=256,
                   help="training images (evenly spaced, no flip) for the final PSNR / usage when no --val-data-path")
    p.add_argument("--device", type=str, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cuda or cpu (default: cuda when available)")
    return p


CONFIG_FLAGS = ("ch", "ch_mult", "num_res_blocks", "z_channels", "codebook_size", "codebook_embed_dim",
                "codebook_l2_norm", "norm_groups", "dropout", "commit_loss_beta", "entropy_loss_ratio")


def build_config(args: argparse.Namespace) -> VQConfig:
    """The registry model's config with every flag that was given applied; raises ValueError when invalid."""
    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    config = vq_config(args.vq_model, **overrides)
    f = config.downsample_factor
    if args.image_size % f:
        raise ValueError(f"--image-size {args.image_size} is not divisible by the downsample factor {f} "
                         f"of ch_mult {config.ch_mult}")
    return config


def image_transform(image_size: int, flip: bool) -> transforms.Compose:
    """Resize the short side, center crop to image_size, optional random flip, to [-1, 1]."""
    steps = [transforms.Resize(image_size, interpolation=transforms.InterpolationMode.BICUBIC),
             transforms.CenterCrop(image_size)]
    if flip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5, 0.5, 0.5], [0.5, 0.5, 0.5])]
    return transforms.Compose(steps)


def image_folder(path: str, image_size: int, flip: bool, flag: str) -> datasets.ImageFolder:
    if not Path(path).is_dir():
        raise ValueError(f"{flag} {path} is not a directory")
    try:
        # load_rgb: 16-bit grayscale is scaled to 8 bits (torchvision's loader clips it to white)
        return datasets.ImageFolder(path, transform=image_transform(image_size, flip), loader=load_rgb)
    except FileNotFoundError as e:
        raise ValueError(f"{flag} {path}: {e}") from None


def prepare(args: argparse.Namespace) -> Setup:
    """Validate the flags and open the datasets; raises ValueError with a one-line message."""
    if args.epochs is None and args.max_steps is None:
        raise ValueError("give --epochs or --max-steps")
    for flag in ("epochs", "max_steps", "global_batch_size", "log_every", "ckpt_every", "eval_images"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    for flag in ("warmup_steps", "restart_dead_every", "min_lr"):
        if getattr(args, flag) < 0:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    config = build_config(args)
    train_set = image_folder(args.data_path, args.image_size, flip=True, flag="--data-path")
    if len(train_set) < args.global_batch_size:
        raise ValueError(f"--data-path has {len(train_set)} images, fewer than --global-batch-size "
                         f"{args.global_batch_size}")
    if args.val_data_path is not None:
        eval_set = image_folder(args.val_data_path, args.image_size, flip=False, flag="--val-data-path")
        split = "val"
    else:  # evenly spaced training images (ImageFolder order is by class), without the random flip
        plain = copy.copy(train_set)
        plain.transform = image_transform(args.image_size, flip=False)
        stride = max(1, len(plain) // args.eval_images)
        eval_set, split = Subset(plain, range(0, len(plain), stride)[:args.eval_images]), "train"
    return Setup(config, train_set, eval_set, split)


def setup_torch(seed: int) -> None:
    """Global torch settings for a run: seeded RNG, no autotuned (nondeterministic) conv algorithms."""
    torch.manual_seed(seed)
    torch.backends.cudnn.benchmark = False


def create_logger(results_dir: Path) -> logging.Logger:
    """Log to stdout and results_dir/log.txt."""
    logger = logging.getLogger(f"train_vq:{results_dir.resolve()}")
    logger.handlers.clear()
    logger.setLevel(logging.INFO)
    logger.propagate = False
    fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%Y-%m-%d %H:%M:%S")
    for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(results_dir / "log.txt")):
        handler.setFormatter(fmt)
        logger.addHandler(handler)
    return logger


def close_logger(logger: logging.Logger) -> None:
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)


def save_json_atomic(obj: dict, path: Path) -> None:
    """Write JSON to a temporary file, then rename over `path`."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def checkpoint(model: VQModel, optimizer: torch.optim.Optimizer, step: int, epoch: int,
               args: argparse.Namespace) -> dict:
    """Project checkpoint dict: plain-value args with the registry name and the full model config."""
    plain_args = {**vars(args), "vq_model": args.vq_model, "model_config": asdict(model.config)}
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step, "epoch": epoch,
            "args": plain_args}


def psnr(reconstruction: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB (B,) of (B, 3, H, W) tensors in [-1, 1], measured on the [0, 1] scale."""
    rec = (reconstruction.clamp(-1, 1).double() + 1) / 2
    ref = (images.double() + 1) / 2
    mse = (rec - ref).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return -10 * torch.log10(mse)


@torch.no_grad()
def evaluate(model: VQModel, loader: DataLoader, device: torch.device) -> dict:
    """Reconstruction PSNR and codebook usage (fraction of codes chosen at least once) over `loader`."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(model.config.codebook_size, dtype=torch.long, device=device)
    total_psnr, n = torch.zeros((), dtype=torch.float64, device=device), 0
    for images, _ in loader:
        images = images.to(device)
        quant, _, indices = model.encode(images)
        total_psnr += psnr(model.decode(quant), images).sum()
        counts += torch.bincount(indices.flatten(), minlength=model.config.codebook_size)
        n += images.shape[0]
    model.train(was_training)
    used = int((counts > 0).sum())
    return {"psnr": float(total_psnr) / n, "codebook_usage": used / model.config.codebook_size,
            "codes_used": used, "num_images": n}


def vq_loss_terms(model: VQModel, images: torch.Tensor, rec_loss: str, codebook_weight: float
                  ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """One training forward: total loss, its detached terms, and the chosen indices (B, h, w)."""
    quant, losses, indices = model.encode(images)
    reconstruction = model.decode(quant)  # (B, 3, H, W)
    if rec_loss == "l2":
        rec = F.mse_loss(reconstruction, images)
    else:
        rec = F.l1_loss(reconstruction, images)
    codebook = losses.vq_loss + losses.commit_loss + losses.entropy_loss
    total = rec + codebook_weight * codebook
    terms = {"loss": total, "rec_loss": rec, "vq_loss": losses.vq_loss, "commit_loss": losses.commit_loss,
             "entropy_loss": losses.entropy_loss}
    return total, {k: v.detach() for k, v in terms.items()}, indices


def learning_rate(step: int, total: int, args: argparse.Namespace) -> float:
    """Learning rate of optimizer step `step` (0-based) of `total`: linear warmup, then constant or cosine."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = (step - args.warmup_steps) / max(1, total - args.warmup_steps)
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


@torch.no_grad()
def restart_dead_codes(model: VQModel, optimizer: torch.optim.Optimizer, images: torch.Tensor,
                       used: torch.Tensor, generator: torch.Generator) -> int:
    """Move every code not in `used` (K,) bool onto a latent of `images` (B, 3, H, W) drawn at random
    (with replacement when there are more dead codes than latents), and clear the optimizer's
    moments of those rows. Returns the number of codes moved."""
    dead = (~used).nonzero().flatten()  # (n,)
    if len(dead) == 0:
        return 0
    quantize = model.quantize
    latents = quantize.normalised_latent(model._latent(images))  # (B, h, w, D)
    latents = latents.reshape(-1, latents.shape[-1])  # (B*h*w, D)
    pick = torch.randint(0, len(latents), (len(dead),), generator=generator).to(latents.device)
    weight = quantize.embedding.weight
    weight[dead] = latents[pick].to(weight.dtype)
    for moment in optimizer.state.get(weight, {}).values():
        if moment.shape == weight.shape:
            moment[dead] = 0
    return len(dead)


def train_vq(args: argparse.Namespace, setup: Setup | None = None) -> dict:
    """Train, checkpoint and evaluate; returns the metrics written to results_dir/metrics.json."""
    setup = setup or prepare(args)
    setup_torch(args.seed)
    device = torch.device(args.device)
    results_dir = Path(args.results_dir)
    ckpt_dir = results_dir / "checkpoints"
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    logger = create_logger(results_dir)
    try:
        model = VQModel(setup.config).to(device).train()
        optimizer = torch.optim.Adam(model.parameters(), lr=args.lr, betas=(args.beta1, args.beta2))
        logger.info(f"{args.vq_model} {asdict(setup.config)}: {sum(p.numel() for p in model.parameters()):,} "
                    f"parameters, downsample {model.downsample_factor}, {len(setup.train_set)} training images")
        logger.info("losses: rec %s + codebook + commitment (beta %s); perceptual and adversarial losses: "
                    "not available", args.rec_loss, setup.config.commit_loss_beta)
        loader = DataLoader(setup.train_set, batch_size=args.global_batch_size, shuffle=True, drop_last=True,
                            num_workers=args.num_workers, generator=torch.Generator().manual_seed(args.seed))
        eval_loader = DataLoader(setup.eval_set, batch_size=args.global_batch_size, shuffle=False,
                                 num_workers=args.num_workers)
        history, step, epoch = train_loop(model, optimizer, loader, args, ckpt_dir, logger)
        save_checkpoint_atomic(checkpoint(model, optimizer, step, epoch, args), ckpt_dir / "final.pt")
        eval_metrics = evaluate(model, eval_loader, device)
        logger.info(f"eval on {eval_metrics['num_images']} {setup.eval_split} images: PSNR "
                    f"{eval_metrics['psnr']:.2f} dB, codebook usage {eval_metrics['codebook_usage']:.3f} "
                    f"({eval_metrics['codes_used']}/{setup.config.codebook_size} codes)")
        metrics = {"step": step, "epoch": epoch, "eval_split": setup.eval_split, **eval_metrics,
                   "train": history}
        save_json_atomic(metrics, results_dir / "metrics.json")
        logger.info(f"saved {ckpt_dir / 'final.pt'} and {results_dir / 'metrics.json'}")
        return metrics
    finally:
        close_logger(logger)


def train_loop(model: VQModel, optimizer: torch.optim.Optimizer, loader: DataLoader, args: argparse.Namespace,
               ckpt_dir: Path, logger: logging.Logger) -> tuple[list[dict], int, int]:
    """Run until --max-steps or --epochs; returns the logged training history, the final step and the
    number of completed epochs."""
    device = next(model.parameters()).device
    total = len(loader) * args.epochs if args.epochs is not None else args.max_steps
    if args.max_steps is not None:
        total = min(total, args.max_steps)
    K = model.config.codebook_size
    sums: dict[str, torch.Tensor] = {}
    seen = torch.zeros(K, dtype=torch.bool, device=device)  # codes chosen since the last log
    alive = torch.zeros(K, dtype=torch.bool, device=device)  # codes chosen since the last restart
    generator = torch.Generator().manual_seed(args.seed + 1)
    history, step, window, restarted = [], 0, 0, 0
    bar = tqdm(total=total, desc="train_vq", dynamic_ncols=True)
    while step < total:
        for images, _ in loader:
            images = images.to(device)
            for group in optimizer.param_groups:
                group["lr"] = learning_rate(step, total, args)
            loss, terms, indices = vq_loss_terms(model, images, args.rec_loss, args.codebook_weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if args.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
            optimizer.step()
            model.quantize.record_usage(indices)
            seen[indices.flatten()] = True
            alive[indices.flatten()] = True
            if args.restart_dead_every and (step + 1) % args.restart_dead_every == 0 and step + 1 < total:
                restarted += restart_dead_codes(model, optimizer, images, alive, generator)
                alive.zero_()
            for k, v in terms.items():
                sums[k] = sums.get(k, 0) + v
            step, window = step + 1, window + 1
            bar.update(1)
            if step % args.log_every == 0 or step == total:
                entry = {"step": step, **{k: float(v) / window for k, v in sums.items()},
                         "codebook_usage": float(seen.sum()) / K, "lr": optimizer.param_groups[0]["lr"],
                         "codes_restarted": restarted}
                history.append(entry)
                logger.info(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                     for k, v in entry.items()))
                bar.set_postfix(loss=f"{entry['loss']:.4f}", usage=f"{entry['codebook_usage']:.3f}")
                sums, window, restarted = {}, 0, 0
                seen.zero_()
            if step % args.ckpt_every == 0 and step < total:
                save_checkpoint_atomic(checkpoint(model, optimizer, step, step // len(loader), args),
                            ckpt_dir / f"{step:07d}.pt")
                logger.info(f"saved checkpoint at step {step}")
            if step == total:
                break
    bar.close()
    return history, step, step // len(loader)


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        setup = prepare(args)
    except ValueError as e:
        parser.exit(2, f"{parser.prog}: error: {e}\n")
    train_vq(args, setup)


if __name__ == "__main__":
    main()
