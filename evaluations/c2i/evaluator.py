"""FID, sFID, Inception Score, precision and recall of a sample .npz, following the ADM evaluator.

    python -m evaluations.c2i.evaluator REF.npz SAMPLE.npz [--inception-weights PATH]
    python -m evaluations.c2i.evaluator SAMPLE.npz --ref-folder DIR --ref-size 256

Both .npz files hold images under `arr_0`: (N, H, W, 3) uint8, any H x W (resized to 299 inside the
network). A reference .npz may instead (or also) hold statistics: `mu`/`sigma` (pool_3) and
`mu_s`/`sigma_s` (spatial); stored statistics win over statistics of its images, as in ADM (the
official VIRTUAL_imagenet256_labeled.npz stores statistics of the whole training set plus 10k
images used only for precision/recall). A reference built from an ImageFolder is cached as an .npz
holding mu, sigma, mu_s, sigma_s and `pool_features` of a seeded random subset (10k by default) for
precision/recall, and reused when it matches the folder, size and network.

Results are printed and written beside the sample file as <sample>_eval.txt and <sample>_eval.json.
"""
import argparse
import contextlib
import functools
import json
import os
import sys
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from dataset.augmentation import center_crop_arr
from dataset.imagefolder import ImageFolderDataset
from evaluations.c2i.inception import (
    InceptionWeightsError,
    FIDInceptionV3,
    RESIZE_MODES,
    file_sha256,
    load_fid_inception,
    resolve_inception_weights,
)
from evaluations.c2i.metrics import FD_METHODS, RunningStatistics, frechet_distance, inception_score, precision_recall
from utils.cli import HelpFormatter

IMAGES_KEY = "arr_0"
POOL_FEATURES_KEY = "pool_features"
IS_SPLIT_SIZE = 5000
PR_NEIGHBOURS = 3
PR_BATCH_SIZE = 10000
REF_PR_COUNT = 10000  # ADM's reference batch holds 10k images for precision/recall


@dataclass
class FeatureSet:
    """What one image set contributes to the metrics; None where the source cannot provide it."""

    pool_stats: tuple[np.ndarray, np.ndarray] | None  # mu (2048,), sigma (2048, 2048), float64
    spatial_stats: tuple[np.ndarray, np.ndarray] | None  # mu_s (2023,), sigma_s (2023, 2023), float64
    pool: np.ndarray | None  # (M, 2048) float32 features for precision/recall
    logits: np.ndarray | None  # (N, 1008) float32 for the Inception Score
    count: int  # images passed through the network


@contextlib.contextmanager
def full_fp32() -> Iterator[None]:
    """Disable TF32 inside (cuDNN convolutions use it by default), so features are true float32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def _read_npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version in ((2, 0), (3, 0)):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"unsupported .npy format version {version}")


def iter_npz_images(path: str, batch_size: int, key: str = IMAGES_KEY) -> Iterator[np.ndarray]:
    """Stream (B, H, W, 3) batches of `key` from an .npz without loading the whole array (50k images are ~10 GB)."""
    with zipfile.ZipFile(path) as archive:
        member = key + ".npy"
        if member not in archive.namelist():
            raise ValueError(f"{path} has no array {key!r}")
        with archive.open(member) as f:
            shape, fortran_order, dtype = _read_npy_header(f)
            if len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"{path}:{key} must be (N, H, W, 3) images, got shape {shape}")
            if fortran_order or dtype.hasobject or dtype.kind not in "uif":
                raise ValueError(f"{path}:{key} must be a C-ordered numeric array, got {dtype} fortran={fortran_order}")
            image_bytes = int(np.prod(shape[1:])) * dtype.itemsize
            for start in range(0, shape[0], batch_size):
                count = min(batch_size, shape[0] - start)
                buffer = f.read(count * image_bytes)
                if len(buffer) != count * image_bytes:
                    raise ValueError(f"{path}:{key} is truncated after image {start + len(buffer) // image_bytes}")
                yield np.frombuffer(bytearray(buffer), dtype=dtype).reshape(count, *shape[1:])  # (B, H, W, 3)


@torch.inference_mode()
def extract_features(
    model: FIDInceptionV3,
    batches: Iterator[np.ndarray | torch.Tensor],
    device: torch.device,
    keep_pool: np.ndarray | None = None,
    keep_logits: bool = True,
    total: int | None = None,
) -> FeatureSet:
    """Run (B, H, W, 3) 0..255 batches through the network; statistics over all images.

    keep_pool: sorted global indices whose pool features to keep (None = all); total: number of
    batches, for the progress bar only.
    """
    pool_stats, spatial_stats = RunningStatistics(), RunningStatistics()
    pools, logits = [], []
    seen = 0
    with full_fp32():
        for batch in tqdm(batches, total=total, desc="Inception features", unit="batch", leave=False):
            images = torch.as_tensor(batch).to(device)
            out = model(images)
            pool_stats.update(out.pool)
            spatial_stats.update(out.spatial)
            if keep_pool is None:
                pools.append(out.pool.float().cpu().numpy())
            else:
                lo, hi = np.searchsorted(keep_pool, [seen, seen + len(images)])
                pools.append(out.pool[torch.as_tensor(keep_pool[lo:hi] - seen, device=device)].float().cpu().numpy())
            if keep_logits:
                logits.append(out.logits.float().cpu().numpy())
            seen += len(images)
    if seen == 0:
        raise ValueError("no images to evaluate")
    return FeatureSet(
        pool_stats=pool_stats.compute() if seen > 1 else None,
        spatial_stats=spatial_stats.compute() if seen > 1 else None,
        pool=np.concatenate(pools),
        logits=np.concatenate(logits) if keep_logits else None,
        count=seen,
    )


def _stored_stats(data, mean_key: str, cov_key: str) -> tuple[np.ndarray, np.ndarray] | None:
    if mean_key not in data.files:
        return None
    if cov_key not in data.files:
        raise ValueError(f"npz has {mean_key!r} but no {cov_key!r}")
    return data[mean_key].astype(np.float64), data[cov_key].astype(np.float64)


def features_from_npz(
    path: str, model: FIDInceptionV3, device: torch.device, batch_size: int, keep_logits: bool
) -> FeatureSet:
    """Features of an .npz: network features of `arr_0` (if present); stored mu/sigma, mu_s/sigma_s win (ADM)."""
    if not os.path.isfile(path):
        raise ValueError(f"npz file not found: {path}")
    if not zipfile.is_zipfile(path):
        raise ValueError(f"{path} is not an .npz archive")
    with np.load(path) as data:
        pool_stats = _stored_stats(data, "mu", "sigma")
        spatial_stats = _stored_stats(data, "mu_s", "sigma_s")
        has_images = IMAGES_KEY in data.files
        stored_pool = data[POOL_FEATURES_KEY].astype(np.float32) if POOL_FEATURES_KEY in data.files else None
    if not has_images:
        if pool_stats is None:
            raise ValueError(f"{path} holds neither images ({IMAGES_KEY!r}) nor statistics ('mu', 'sigma')")
        return FeatureSet(pool_stats, spatial_stats, stored_pool, None, 0)
    computed = extract_features(model, iter_npz_images(path, batch_size), device, keep_logits=keep_logits)
    return FeatureSet(
        pool_stats=pool_stats or computed.pool_stats,
        spatial_stats=spatial_stats or computed.spatial_stats,
        pool=computed.pool,
        logits=computed.logits,
        count=computed.count,
    )


def _folder_item(pil_image, size: int) -> torch.Tensor:
    """ADM center crop -> (size, size, 3) uint8."""
    return torch.from_numpy(np.array(center_crop_arr(pil_image, size), dtype=np.uint8))


def _collate_images(items: list[tuple[torch.Tensor, int, int]]) -> torch.Tensor:
    return torch.stack([image for image, _, _ in items])  # (B, size, size, 3)


def reference_from_folder(
    folder: str,
    size: int,
    model: FIDInceptionV3,
    device: torch.device,
    batch_size: int,
    cache_path: str,
    network_id: str,
    pr_count: int = REF_PR_COUNT,
    workers: int = 0,
    seed: int = 0,
) -> FeatureSet:
    """Reference statistics of an ImageFolder (ADM center crop to `size`), cached at cache_path.

    Pool features of a seeded random subset of pr_count images are kept for precision/recall.
    The cache is reused when its folder name, image count, size, network id and P/R subset match.
    """
    dataset = ImageFolderDataset(folder, transform=functools.partial(_folder_item, size=size))
    meta = {
        "folder": os.path.basename(os.path.normpath(folder)),
        "image_count": len(dataset),
        "ref_size": size,
        "network": network_id,
        "pr_count": min(pr_count, len(dataset)),
        "pr_seed": seed,
    }
    if os.path.isfile(cache_path):
        with np.load(cache_path) as data:
            cached_meta = json.loads(str(data["meta"])) if "meta" in data.files else None
        if cached_meta == meta:
            print(f"Using cached reference statistics {cache_path}")
            return features_from_npz(cache_path, model, device, batch_size, keep_logits=False)
        print(f"Cached reference {cache_path} does not match (folder, count, size, network or P/R subset); recomputing")
    rng = np.random.default_rng(seed)
    keep = np.sort(rng.permutation(len(dataset))[: min(pr_count, len(dataset))])
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate_images)
    features = extract_features(model, iter(loader), device, keep_pool=keep, keep_logits=False, total=len(loader))
    if features.pool_stats is None:
        raise ValueError(f"reference folder {folder} needs at least 2 images")
    os.makedirs(os.path.dirname(os.path.abspath(cache_path)), exist_ok=True)
    tmp_path = cache_path + ".tmp.npz"
    np.savez(
        tmp_path,
        mu=features.pool_stats[0],
        sigma=features.pool_stats[1],
        mu_s=features.spatial_stats[0],
        sigma_s=features.spatial_stats[1],
        pool_features=features.pool,
        meta=np.array(json.dumps(meta, sort_keys=True)),
    )
    os.replace(tmp_path, cache_path)
    print(f"Saved reference statistics to {cache_path}")
    return features


def compute_metrics(
    ref: FeatureSet,
    sample: FeatureSet,
    is_split_size: int = IS_SPLIT_SIZE,
    pr_dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    fd_method: str = "sqrtm",
) -> dict[str, float | None]:
    """Inception Score (sample only), FID, sFID, precision, recall; None where the inputs do not allow one."""
    results: dict[str, float | None] = dict.fromkeys(
        ["inception_score", "inception_score_std", "fid", "sfid", "precision", "recall"]
    )
    if sample.logits is not None:
        results["inception_score"], results["inception_score_std"] = inception_score(sample.logits, is_split_size)
    if ref.pool_stats is not None and sample.pool_stats is not None:
        results["fid"] = frechet_distance(*ref.pool_stats, *sample.pool_stats, method=fd_method)
    if ref.spatial_stats is not None and sample.spatial_stats is not None:
        results["sfid"] = frechet_distance(*ref.spatial_stats, *sample.spatial_stats, method=fd_method)
    enough = PR_NEIGHBOURS + 1
    if ref.pool is not None and sample.pool is not None and min(len(ref.pool), len(sample.pool)) >= enough:
        results["precision"], results["recall"] = precision_recall(
            ref.pool, sample.pool, k=PR_NEIGHBOURS, batch_size=PR_BATCH_SIZE, dtype=pr_dtype, device=device
        )
    return results


def format_results(results: dict[str, float | None]) -> str:
    names = [("inception_score", "Inception Score"), ("fid", "FID"), ("sfid", "sFID"), ("precision", "Precision"),
             ("recall", "Recall")]
    lines = []
    for key, name in names:
        value = results[key]
        lines.append(f"{name}: {'n/a' if value is None else value}")
    return "\n".join(lines)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name} requested but CUDA is not available")
    return torch.device(name)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("paths", nargs="+", metavar="NPZ", help="REF.npz SAMPLE.npz, or SAMPLE.npz with --ref-folder")
    parser.add_argument("--ref-folder", default=None, help="ImageFolder to build reference statistics from")
    parser.add_argument("--ref-size", type=int, default=256, help="center-crop size for --ref-folder images")
    parser.add_argument("--ref-cache", default=None,
                        help="npz cache of --ref-folder statistics (default: ref_<folder>_<size>.npz beside the sample)")
    parser.add_argument("--ref-pr-count", type=int, default=REF_PR_COUNT,
                        help="reference images kept for precision/recall (seeded random subset)")
    parser.add_argument("--inception-weights", default=None,
                        help="path of pt_inception-2015-12-05-6726825d.pth (else $DPAR_INCEPTION_WEIGHTS, hub cache)")
    parser.add_argument("--no-download", action="store_true", help="never try to download the Inception weights")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="tf1",
                        help="resize to 299: tf1 = the graph's legacy bilinear (ADM), torch = F.interpolate")
    parser.add_argument("--batch-size", type=int, default=64, help="images per Inception batch")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers for --ref-folder")
    parser.add_argument("--is-split-size", type=int, default=IS_SPLIT_SIZE,
                        help="images per Inception Score split (ADM: 5000)")
    parser.add_argument("--pr-dtype", choices=["float32", "float16"], default="float32",
                        help="distance precision for precision/recall (ADM: float16 with float32 fallback)")
    parser.add_argument("--fd-method", choices=FD_METHODS, default="sqrtm",
                        help="sqrtm = ADM's scipy.linalg.sqrtm; eigh = same trace via eigendecompositions (faster)")
    parser.add_argument("--random-init-inception", action="store_true",
                        help="TESTING ONLY: random network weights, the numbers mean nothing")
    args = parser.parse_args(argv)
    expected = 1 if args.ref_folder else 2
    if len(args.paths) != expected:
        parser.error("give REF.npz SAMPLE.npz, or SAMPLE.npz together with --ref-folder")
    if args.batch_size < 1 or args.ref_size < 1 or args.ref_pr_count < 1 or args.is_split_size < 1:
        parser.error("--batch-size, --ref-size, --ref-pr-count and --is-split-size must be positive")
    return args


def load_network(args: argparse.Namespace) -> tuple[FIDInceptionV3, str]:
    """The network and an id recorded with results and caches (weights file name + SHA-256, resize mode)."""
    if args.random_init_inception:
        print("WARNING: randomly initialised Inception network (testing only); the metrics are meaningless")
        return load_fid_inception(random_init=True, resize_mode=args.resize), f"random-init/{args.resize}"
    path = resolve_inception_weights(args.inception_weights, allow_download=False if args.no_download else None)
    model = load_fid_inception(path, resize_mode=args.resize)
    return model, f"{os.path.basename(path)}:sha256={file_sha256(path)}/{args.resize}"


def main(argv: list[str] | None = None) -> dict[str, float | None]:
    args = parse_args(argv)
    sample_path = args.paths[-1]
    device = resolve_device(args.device)
    model, network_id = load_network(args)
    model = model.to(device)
    if args.ref_folder:
        stem = os.path.basename(os.path.normpath(args.ref_folder))
        cache = args.ref_cache or os.path.join(os.path.dirname(os.path.abspath(sample_path)),
                                               f"ref_{stem}_{args.ref_size}.npz")
        ref = reference_from_folder(args.ref_folder, args.ref_size, model, device, args.batch_size, cache, network_id,
                                    pr_count=args.ref_pr_count, workers=args.workers)
        ref_name = args.ref_folder
    else:
        print("Computing reference features...")
        ref = features_from_npz(args.paths[0], model, device, args.batch_size, keep_logits=False)
        ref_name = args.paths[0]
    print("Computing sample features...")
    sample = features_from_npz(sample_path, model, device, args.batch_size, keep_logits=True)
    if sample.count == 0:
        raise ValueError(f"{sample_path} has no images under {IMAGES_KEY!r}")
    print("Computing evaluations...")
    pr_dtype = torch.float16 if args.pr_dtype == "float16" else torch.float32
    results = compute_metrics(ref, sample, args.is_split_size, pr_dtype, device, args.fd_method)
    text = format_results(results)
    print(text)
    base = os.path.splitext(sample_path)[0] + "_eval"
    record = {
        "metrics": results,
        "sample": os.path.basename(sample_path),
        "sample_count": sample.count,
        "reference": os.path.basename(os.path.normpath(ref_name)),
        "reference_pr_count": None if ref.pool is None else len(ref.pool),
        "network": network_id,
        "is_split_size": args.is_split_size,
        "pr_dtype": args.pr_dtype,
        "fd_method": args.fd_method,
        "device": str(device),
    }
    with open(base + ".txt", "w") as f:
        f.write(text + "\n")
    with open(base + ".json", "w") as f:
        json.dump(record, f, indent=2)
    print(f"Wrote {base}.txt and {base}.json")
    return results


if __name__ == "__main__":
    try:
        main()
    except (InceptionWeightsError, ValueError, zipfile.BadZipFile) as error:
        sys.exit(f"error: {error}")
