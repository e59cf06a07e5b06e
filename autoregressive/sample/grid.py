"""Grid mode: sample chosen classes in one process and save them as one PNG grid."""
from pathlib import Path
from typing import List

import torch
from torchvision.utils import save_image

from autoregressive.sample.sampler import Sampler, Throughput, batches, format_throughput, image_seed
from autoregressive.sample.settings import SampleRun

LLAMAGEN_GRID_CLASSES = [207, 360, 387, 974, 88, 979, 417, 279]  # LlamaGen's demo classes


def grid_classes(requested, num_classes: int) -> List[int]:
    """--class-labels, or LlamaGen's demo classes when the model has them, else the first 8."""
    if requested is not None:
        return list(requested)
    if max(LLAMAGEN_GRID_CLASSES) < num_classes:
        return list(LLAMAGEN_GRID_CLASSES)
    return list(range(min(num_classes, 8)))


def run_grid(cfg: SampleRun, sampler: Sampler) -> dict:
    """Image j has class classes[j] and seed image_seed(cfg.seed, j). Writes cfg.out
    (torchvision grid, cfg.nrow images per row, pixels mapped from [-1, 1]); returns the
    throughput summary it prints."""
    classes = grid_classes(cfg.class_labels, sampler.num_classes)
    sampler.check_classes(classes)
    out = Path(cfg.out or f"sample_{cfg.gpt_model}.png")
    throughput, images = Throughput(), []
    for chunk in batches(list(range(len(classes))), cfg.per_proc_batch_size):
        batch = sampler.sample([classes[j] for j in chunk], [image_seed(cfg.seed, j) for j in chunk])
        throughput.add(batch)
        images.append(batch.images.cpu())
    out.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.cat(images), str(out), nrow=cfg.nrow, normalize=True, value_range=(-1, 1))
    summary = throughput.summary(sampler.patched)
    print(format_throughput(summary))
    print(f"wrote {out}")
    return summary
