"""Domain metric for small datasets: a small CNN trained on the dataset's own images judges samples.

Inception features mean little on small toy datasets (and need downloaded weights), so offline runs
use this domain metric instead. It is NOT FID and its numbers are not comparable to FID.

    python -m evaluations.domain_metric train --data-path DIR --out clf.pt --image-size 64
    python -m evaluations.domain_metric score --classifier clf.pt --samples samples.npz --data-path DIR

`train` fits a small CNN classifier on a seeded, class-stratified training split of the ImageFolder
(images center-cropped to --image-size) and keeps the held-out file list in the checkpoint.
`score` reports, for generated images with their requested classes (npz: `arr_0` (N, H, W, 3) uint8
plus `labels` (N,)):
- class_consistency: fraction of samples the classifier assigns to the requested class;
- domain_frechet_distance: Fréchet distance between samples and held-out real images in the
  classifier's penultimate (pooled) feature space;
and two references: the classifier's accuracy on held-out real images (the ceiling for class
consistency) and the same Fréchet distance between real training images, drawn with the samples'
class histogram (as many per class as there are), and the held-out images (a floor: what real
data scores at that sample size).
"""
import argparse
import json
import math
import os
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from dataset.augmentation import center_crop_arr
from dataset.imagefolder import list_image_folder, load_rgb
from evaluations.c2i.metrics import feature_statistics, frechet_distance
from utils.cli import HelpFormatter

METRIC_NAME = "domain metric"
BLUR_SIGMA, NOISE_STD = 1.2, 0.1  # training augmentation: blur (pixels at 32px) and noise (on [-1, 1]) at most
METRIC_NOTE = "domain metric: small CNN trained on the dataset itself; not FID, not comparable to FID"


@dataclass
class DomainClassifierConfig:
    image_size: int = 64
    num_classes: int = 2
    width: int = 16  # channels of the first stage; the feature dimension is 4 * width


def _conv_bn_relu(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class DomainClassifier(nn.Module):
    """Small CNN: conv stages with max-pool downsampling, global max pool (the feature space), linear head.

    Global max pooling ("is this pattern anywhere?") learns objects on flat backgrounds in far fewer
    steps than average pooling, which matters for a classifier trained in about a minute on CPU.
    """

    def __init__(self, config: DomainClassifierConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        self.body = nn.Sequential(
            _conv_bn_relu(3, w, stride=2),  # S/2
            _conv_bn_relu(w, 2 * w),
            nn.MaxPool2d(2),  # S/4
            _conv_bn_relu(2 * w, 4 * w),
            nn.MaxPool2d(2),  # S/8
            _conv_bn_relu(4 * w, 4 * w),
        )
        self.head = nn.Linear(4 * w, config.num_classes)

    @property
    def feature_dim(self) -> int:
        return 4 * self.config.width

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, 4 * width) globally max-pooled features."""
        return self.body(x).amax(dim=(2, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 3, S, S) in [-1, 1] -> (N, num_classes) logits."""
        return self.head(self.features(x))


def load_folder_images(root: str, paths: list[str], size: int) -> torch.Tensor:
    """Images at root/<relative path>, ADM center crop to size -> (N, size, size, 3) uint8."""
    arrays = [np.asarray(center_crop_arr(load_rgb(os.path.join(root, p)), size), dtype=np.uint8) for p in paths]
    return torch.from_numpy(np.stack(arrays))


def to_model_input(images: np.ndarray | torch.Tensor, size: int) -> torch.Tensor:
    """uint8 (N, H, W, 3) 0..255, or float (N, 3, H, W) in [-1, 1] -> float (N, 3, size, size) in [-1, 1]."""
    images = torch.as_tensor(images)
    if images.dtype == torch.uint8:
        if images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got shape {tuple(images.shape)}")
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (N, 3, H, W)
    else:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got shape {tuple(images.shape)}")
        x = images.float().clamp(-1.0, 1.0)
    if x.shape[-2:] != (size, size):
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    return x


def split_held_out(samples: list[tuple[str, int]], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Class-stratified seeded split of sample indices -> (train, held_out); each class with >= 2 images
    puts at least one image on each side."""
    rng = np.random.default_rng(seed)
    labels = np.array([label for _, label in samples])
    train, held_out = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        n_held = int(round(fraction * len(idx)))
        if len(idx) >= 2:
            n_held = min(max(n_held, 1), len(idx) - 1)
        held_out += idx[:n_held].tolist()
        train += idx[n_held:].tolist()
    return sorted(train), sorted(held_out)


@torch.no_grad()
def _run(model: DomainClassifier, x: torch.Tensor, batch_size: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, 3, S, S) -> features (N, F), logits (N, C) in eval mode."""
    model.eval()
    feats = torch.cat([model.features(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return feats, model.head(feats)


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of a (B, 3, S, S) batch (reflect padding); sigma in pixels."""
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).repeat(3, 1)  # (3, 2r+1): one kernel per channel
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=3)
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=3)


def _augment(x: torch.Tensor, generator: torch.Generator, shift: int = 4) -> torch.Tensor:
    """Random horizontal flip and random translation (reflect padding) of a (B, 3, S, S) batch; then
    half of the images blurred and all given pixel noise of a random strength, so that the classifier
    judges shapes rather than the sharpness of a small tokenizer's reconstructions."""
    flip = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    size = x.shape[-1]
    padded = F.pad(x, (shift,) * 4, mode="reflect")  # (B, 3, S + 2 shift, S + 2 shift)
    dy, dx = torch.randint(0, 2 * shift + 1, (2,), generator=generator).tolist()
    x = padded[:, :, dy : dy + size, dx : dx + size]
    sigma = BLUR_SIGMA * size / 32 * (0.3 + 0.7 * torch.rand((), generator=generator).item())
    blur = torch.rand(len(x), generator=generator) < 0.5
    x = torch.where(blur[:, None, None, None], _gaussian_blur(x, sigma), x)
    noise = NOISE_STD * torch.rand(len(x), 1, 1, 1, generator=generator)  # (B, 1, 1, 1) per-image strength
    return (x + noise * torch.randn(x.shape, generator=generator)).clamp(-1.0, 1.0)


def _frechet(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if len(a) < 2 or len(b) < 2:
        return None
    return frechet_distance(*feature_statistics(a.double().numpy()), *feature_statistics(b.double().numpy()))


def train_domain_classifier(
    data_path: str,
    out: str,
    image_size: int = 64,
    epochs: int = 40,
    batch_size: int = 64,
    lr: float = 1e-2,
    held_out_fraction: float = 0.2,
    width: int = 16,
    seed: int = 0,
) -> dict:
    """Train the domain classifier on an ImageFolder and save it to `out`; returns the training summary."""
    classes, samples = list_image_folder(data_path)
    if len(classes) < 2:
        raise ValueError(f"the domain metric needs at least 2 classes, {data_path} has {len(classes)}")
    if not 0.0 < held_out_fraction < 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1), got {held_out_fraction}")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rel = [Path(p).relative_to(data_path).as_posix() for p, _ in samples]
    labels = torch.tensor([label for _, label in samples])
    train_idx, held_idx = split_held_out(samples, held_out_fraction, seed)
    images = to_model_input(load_folder_images(data_path, rel, image_size), image_size)  # (N, 3, S, S)
    x_train, y_train = images[train_idx], labels[train_idx]
    x_held, y_held = images[held_idx], labels[held_idx]

    config = DomainClassifierConfig(image_size=image_size, num_classes=len(classes), width=width)
    model = DomainClassifier(config).to(memory_format=torch.channels_last)  # ~30% faster convolutions on CPU
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps_per_epoch = max(1, -(-len(x_train) // batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=epochs * steps_per_epoch)
    start = time.time()
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(x_train), generator=generator)
        total_loss = 0.0
        for i in range(0, len(order), batch_size):
            batch = order[i : i + batch_size]
            if len(batch) < 2:  # BatchNorm needs two images
                continue
            x = _augment(x_train[batch], generator).contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(model(x), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total_loss += loss.item() * len(batch)
        print(f"[{METRIC_NAME}] epoch {epoch + 1}/{epochs} train loss {total_loss / len(x_train):.4f}")

    train_feats, _ = _run(model, x_train)
    held_feats, held_logits = _run(model, x_held)
    held_acc = (held_logits.argmax(1) == y_held).double().mean().item() if len(held_idx) else None
    summary = {
        "metric": METRIC_NOTE,
        "classifier_held_out_accuracy": held_acc,
        "train_vs_held_out_domain_frechet_distance": _frechet(train_feats, held_feats),
        "num_train": len(train_idx),
        "num_held_out": len(held_idx),
        "train_seconds": round(time.time() - start, 2),
    }
    checkpoint = {
        "model": model.state_dict(),
        "config": asdict(config),
        "classes": classes,
        "held_out": [rel[i] for i in held_idx],
        "held_out_labels": [int(labels[i]) for i in held_idx],
        "train": [rel[i] for i in train_idx],
        "train_labels": [int(labels[i]) for i in train_idx],
        "seed": seed,
        "summary": summary,
    }
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    torch.save(checkpoint, out + ".tmp")
    os.replace(out + ".tmp", out)
    return summary


def _class_matched_subset(paths: list[str], path_labels: list[int], wanted: torch.Tensor, seed: int) -> list[str]:
    """Real images with the class histogram of the requested labels (as many per class as available), seeded."""
    rng = np.random.default_rng(seed)
    path_labels = np.asarray(path_labels)
    chosen: list[int] = []
    for label, count in zip(*np.unique(wanted.numpy(), return_counts=True)):
        pool = np.flatnonzero(path_labels == label)
        chosen += rng.permutation(pool)[:count].tolist()
    return [paths[i] for i in sorted(chosen)]


def load_domain_classifier(path: str) -> tuple[DomainClassifier, dict]:
    """(model in eval mode, checkpoint dict) from a file written by train_domain_classifier."""
    if not os.path.isfile(path):
        raise ValueError(f"domain classifier not found: {path}")
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(checkpoint, dict) or "config" not in checkpoint or "held_out" not in checkpoint:
        raise ValueError(f"{path} is not a domain-metric classifier checkpoint")
    model = DomainClassifier(DomainClassifierConfig(**checkpoint["config"]))
    model.load_state_dict(checkpoint["model"])
    return model.eval(), checkpoint


def score_domain_metric(
    classifier: str,
    images: np.ndarray | torch.Tensor,
    labels: np.ndarray | torch.Tensor,
    data_path: str,
    seed: int = 0,
) -> dict:
    """Domain metric of generated images.

    images: uint8 (N, H, W, 3) or float (N, 3, H, W) in [-1, 1] (resized to the classifier's size);
    labels: (N,) requested class ids. Returns a JSON-ready dict (see the module docstring).
    """
    model, checkpoint = load_domain_classifier(classifier)
    size = model.config.image_size
    x = to_model_input(images, size)
    labels = torch.as_tensor(np.asarray(labels)).long().reshape(-1)
    if len(labels) != len(x):
        raise ValueError(f"{len(x)} images but {len(labels)} labels")
    if len(x) == 0:
        raise ValueError("no images to score")
    if labels.min() < 0 or labels.max() >= model.config.num_classes:
        raise ValueError(f"labels must be in [0, {model.config.num_classes}), got [{labels.min()}, {labels.max()}]")
    classes, _ = list_image_folder(data_path)
    if classes != checkpoint["classes"]:
        raise ValueError(f"{data_path} classes {classes[:5]}... differ from the classifier's {checkpoint['classes'][:5]}...")
    held_rel = checkpoint["held_out"]
    held_labels = torch.tensor(checkpoint["held_out_labels"])
    held_feats, held_logits = _run(model, to_model_input(load_folder_images(data_path, held_rel, size), size))
    floor_rel = _class_matched_subset(checkpoint["train"], checkpoint["train_labels"], labels, seed)
    floor_feats, _ = _run(model, to_model_input(load_folder_images(data_path, floor_rel, size), size))

    feats, logits = _run(model, x)
    pred = logits.argmax(1)
    per_class = {
        classes[c]: (pred[labels == c] == c).double().mean().item() for c in labels.unique().tolist()
    }
    return {
        "metric": METRIC_NOTE,
        "class_consistency": (pred == labels).double().mean().item(),
        "domain_frechet_distance": _frechet(feats, held_feats),
        "classifier_held_out_accuracy": (held_logits.argmax(1) == held_labels).double().mean().item(),
        "real_vs_real_domain_frechet_distance": _frechet(floor_feats, held_feats),
        "per_class_consistency": per_class,
        "num_samples": len(x),
        "num_held_out": len(held_rel),
        "num_real_for_floor": len(floor_rel),
        "feature_dim": model.feature_dim,
    }


def read_samples_npz(path: str, labels_key: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, 3) uint8, labels (N,)) from an npz with `arr_0` and `labels` (or `arr_1`)."""
    if not os.path.isfile(path):
        raise ValueError(f"samples file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive")
    with np.load(path) as data:
        if "arr_0" not in data.files:
            raise ValueError(f"{path} has no 'arr_0' images")
        keys = [labels_key] if labels_key else ["labels", "arr_1"]
        found = next((k for k in keys if k in data.files), None)
        if found is None:
            raise ValueError(f"{path} has no labels array (looked for {', '.join(keys)}); the domain metric needs them")
        return data["arr_0"], data[found]


def format_report(report: dict) -> str:
    def fmt(value) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join([
        f"[{METRIC_NAME}] (not FID) {report['num_samples']} samples vs {report['num_held_out']} held-out real images",
        f"[{METRIC_NAME}] class consistency: {fmt(report['class_consistency'])}"
        f" (classifier held-out accuracy: {fmt(report['classifier_held_out_accuracy'])})",
        f"[{METRIC_NAME}] Fréchet distance in classifier features: {fmt(report['domain_frechet_distance'])}"
        f" (real-vs-real floor with {report['num_real_for_floor']} images:"
        f" {fmt(report['real_vs_real_domain_frechet_distance'])})",
    ])


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train the domain classifier on an ImageFolder",
                           formatter_class=HelpFormatter)
    train.add_argument("--data-path", required=True, help="ImageFolder root of the real images: <class>/<image>")
    train.add_argument("--out", required=True, help="classifier checkpoint to write")
    train.add_argument("--image-size", type=int, default=64, help="images are resized to this size")
    train.add_argument("--epochs", type=int, default=40, help="training epochs")
    train.add_argument("--batch-size", type=int, default=64, help="images per batch")
    train.add_argument("--lr", type=float, default=1e-2, help="peak AdamW learning rate (one-cycle schedule)")
    train.add_argument("--held-out-fraction", type=float, default=0.2,
                       help="share of the images kept out of training to measure accuracy")
    train.add_argument("--width", type=int, default=16, help="channels of the classifier's first layer")
    train.add_argument("--seed", type=int, default=0, help="seed of weights, split and data order")
    score = sub.add_parser("score", help="score generated samples",
                           formatter_class=HelpFormatter)
    score.add_argument("--classifier", required=True, help="classifier checkpoint written by the train command")
    score.add_argument("--samples", required=True, help="npz with arr_0 (N, H, W, 3) uint8 and labels (N,)")
    score.add_argument("--data-path", required=True, help="the ImageFolder the classifier was trained on")
    score.add_argument("--labels-key", default=None, help="labels array in the npz (default: labels, then arr_1)")
    score.add_argument("--out-json", default=None, help="default: <samples>_domain_metric.json")
    score.add_argument("--seed", type=int, default=0,
                       help="seed of the class-matched subset of training images (the floor)")
    args = parser.parse_args(argv)

    if args.command == "train":
        if args.image_size < 8 or args.epochs < 1 or args.batch_size < 2 or args.width < 1:
            parser.error("--image-size >= 8, --epochs >= 1, --batch-size >= 2 and --width >= 1 required")
        summary = train_domain_classifier(
            args.data_path, args.out, args.image_size, args.epochs, args.batch_size, args.lr,
            args.held_out_fraction, args.width, args.seed,
        )
        print(json.dumps(summary, indent=2))
        print(f"[{METRIC_NAME}] saved classifier to {args.out}")
        return summary

    images, labels = read_samples_npz(args.samples, args.labels_key)
    report = score_domain_metric(args.classifier, images, labels, args.data_path, args.seed)
    print(format_report(report))
    out_json = args.out_json or os.path.splitext(args.samples)[0] + "_domain_metric.json"
    with open(out_json, "w") as f:
        json.dump(report, f, indent=2)
    print(f"[{METRIC_NAME}] wrote {out_json}")
    return report


if __name__ == "__main__":
    try:
        main()
    except ValueError as error:
        sys.exit(f"error: {error}")
