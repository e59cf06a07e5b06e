"""Metric math of the ADM evaluator: Fréchet distance, feature statistics, Inception Score, precision/recall.

All functions take plain feature arrays, so they serve FID (pool_3 features), sFID (spatial features)
and the domain metric (a small classifier's features) alike.
"""
import warnings

import numpy as np
import scipy.linalg
import torch
from scipy.special import logsumexp

FD_EPS = 1e-6
FD_IMAG_ATOL = 1e-3
SQRTM_RESIDUAL_TOL = 1e-5  # relative; a failed square root (e.g. of a singular product) is far off
FD_METHODS = ("sqrtm", "eigh")


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) features -> mean (D,) and covariance (D, D), float64, covariance with N - 1 (np.cov rowvar=False)."""
    features = np.asarray(features, dtype=np.float64)
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"need a (N >= 2, D) feature array for statistics, got shape {features.shape}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


class RunningStatistics:
    """Mean and covariance accumulated over batches (float64 sums on the batches' device), equal to np.cov at the end."""

    def __init__(self) -> None:
        self.count = 0
        self.sum: torch.Tensor | None = None  # (D,)
        self.sum_outer: torch.Tensor | None = None  # (D, D)

    def update(self, batch: torch.Tensor) -> None:
        """batch: (B, D) features."""
        batch = batch.to(torch.float64)
        if self.sum is None:
            self.sum = torch.zeros(batch.shape[1], dtype=torch.float64, device=batch.device)
            self.sum_outer = torch.zeros(batch.shape[1], batch.shape[1], dtype=torch.float64, device=batch.device)
        self.count += batch.shape[0]
        self.sum += batch.sum(dim=0)
        self.sum_outer += batch.t() @ batch

    def compute(self) -> tuple[np.ndarray, np.ndarray]:
        """Mean (D,) and covariance (D, D) as float64 numpy arrays."""
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for statistics, got {self.count}")
        mu = self.sum / self.count
        sigma = (self.sum_outer - self.count * torch.outer(mu, mu)) / (self.count - 1)
        return mu.cpu().numpy(), sigma.cpu().numpy()


def _sqrtm_checked(matrix: np.ndarray) -> tuple[np.ndarray, bool]:
    """scipy's sqrtm plus whether the result is usable (finite, and actually squares back to the input).

    Recent SciPy returns huge finite values (with a LinAlgWarning) instead of NaN/inf for some singular
    products, so finiteness alone (the ADM test) does not catch every failure; the residual check does.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the outcome is judged below; sqrtm's own warnings would be noise
        root = scipy.linalg.sqrtm(matrix)  # `disp` is deprecated (SciPy 1.16) and left out on purpose
    if not np.isfinite(root).all():
        return root, False
    scale = max(np.linalg.norm(matrix), np.finfo(np.float64).tiny)
    with np.errstate(over="ignore", invalid="ignore"):  # a wildly wrong root may overflow when squared
        residual = np.linalg.norm(root @ root - matrix) / scale
    return root, bool(residual < SQRTM_RESIDUAL_TOL)


def _symmetric_eigh(matrix: torch.Tensor, vectors: bool):
    """torch.linalg.eigh / eigvalsh of a float64 symmetric matrix (faster than numpy's); where
    torch's LAPACK driver does not converge (seen on rank-deficient covariances of a few samples),
    SciPy's relatively robust representation driver (evr) instead."""
    try:
        return torch.linalg.eigh(matrix) if vectors else torch.linalg.eigvalsh(matrix)
    except torch.linalg.LinAlgError:
        result = scipy.linalg.eigh(matrix.numpy(), eigvals_only=not vectors, driver="evr")
        return tuple(map(torch.from_numpy, result)) if vectors else torch.from_numpy(result)


def _trace_sqrt_product_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """Tr sqrtm(S1 S2) for symmetric PSD S1, S2 as sum sqrt(eig(S1^1/2 S2 S1^1/2)) (two symmetric eigensolves)."""
    s1, s2 = torch.from_numpy(sigma1), torch.from_numpy(sigma2)  # float64
    w, v = _symmetric_eigh((s1 + s1.T) / 2, vectors=True)
    root1 = (v * w.clamp_min(0.0).sqrt()) @ v.T  # S1^1/2
    inner = root1 @ s2 @ root1
    return _symmetric_eigh((inner + inner.T) / 2, vectors=False).clamp_min(0.0).sqrt().sum().item()


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    eps: float = FD_EPS,
    method: str = "sqrtm",
) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) in float64.

    FD = |mu1 - mu2|^2 + Tr(sigma1) + Tr(sigma2) - 2 Tr(sqrtm(sigma1 sigma2)).
    method="sqrtm" (ADM, default): scipy's sqrtm; if the square root fails, warn and retry with eps * I
    added to both covariances; a complex root is an error when a diagonal imaginary part exceeds 1e-3,
    otherwise its real part is used.
    method="eigh": the same trace from symmetric eigendecompositions, exact for PSD covariances, no eps
    needed for singular ones, several times faster than sqrtm at 2048 dimensions.
    """
    if method not in FD_METHODS:
        raise ValueError(f"method must be one of {FD_METHODS}, got {method!r}")
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
        raise ValueError(
            f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}"
        )
    diff = mu1 - mu2
    if method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(sigma1, sigma2)
        return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    covmean, ok = _sqrtm_checked(sigma1 @ sigma2)
    if not ok:
        warnings.warn(f"Fréchet distance: sqrtm(sigma1 sigma2) failed; retrying with eps * I (eps={eps}) added")
        offset = np.eye(sigma1.shape[0]) * eps
        covmean, ok = _sqrtm_checked((sigma1 + offset) @ (sigma2 + offset))
        if not np.isfinite(covmean).all():
            raise ValueError("Fréchet distance: sqrtm is not finite even with eps * I added to the covariances")
        if not ok:  # ADM goes on here too; say so instead of failing silently
            warnings.warn("Fréchet distance: sqrtm residual is large even with eps * I added; the value may be off")
    if np.iscomplexobj(covmean):
        max_imag = np.max(np.abs(np.diagonal(covmean).imag))
        if max_imag > FD_IMAG_ATOL:
            raise ValueError(f"Fréchet distance: sqrtm has imaginary diagonal components up to {max_imag:.3g}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(
    logits: np.ndarray, split_size: int | None = 5000, num_splits: int | None = None
) -> tuple[float, float]:
    """Inception Score of (N, C) logits: exp(E_x KL(p(y|x) || p(y))) per split; returns (mean, std) over splits.

    Splits are consecutive and unshuffled. ADM: split_size=5000 (the last split keeps the remainder).
    Alternatively num_splits=K cuts N into K consecutive near-equal splits. Softmax in float64 via log-softmax.
    """
    logits = np.asarray(logits, dtype=np.float64)
    if logits.ndim != 2 or logits.shape[0] < 1:
        raise ValueError(f"need (N >= 1, C) logits for the Inception Score, got shape {logits.shape}")
    if (split_size is None) == (num_splits is None):
        raise ValueError("give exactly one of split_size and num_splits")
    n = logits.shape[0]
    if num_splits is not None:
        if not 1 <= num_splits <= n:
            raise ValueError(f"num_splits must be in [1, {n}], got {num_splits}")
        bounds = np.linspace(0, n, num_splits + 1).round().astype(int)
    else:
        if split_size < 1:
            raise ValueError(f"split_size must be positive, got {split_size}")
        bounds = np.append(np.arange(0, n, split_size), n)
    log_p = logits - logsumexp(logits, axis=1, keepdims=True)  # (N, C) log p(y|x)
    scores = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        part = log_p[start:end]  # (n_split, C)
        log_marginal = logsumexp(part, axis=0) - np.log(len(part))  # (C,) log p(y)
        kl = np.sum(np.exp(part) * (part - log_marginal), axis=1)  # (n_split,)
        scores.append(np.exp(kl.mean()))
    return float(np.mean(scores)), float(np.std(scores))


def _pairwise_sq_distances(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Squared L2 distances (A, D) x (B, D) -> (A, B) as |a|^2 - 2ab + |b|^2 in `dtype` (float32 if fp16 overflows)."""
    for compute_dtype in (dtype, torch.float32) if dtype == torch.float16 else (dtype,):
        x, y = a.to(compute_dtype), b.to(compute_dtype)
        d = (x * x).sum(1, keepdim=True) - 2.0 * (x @ y.t()) + (y * y).sum(1)[None, :]
        if torch.isfinite(d).all():
            break
    return d.to(torch.float32 if dtype == torch.float16 else dtype).clamp_min_(0.0)


def manifold_radii(
    features: torch.Tensor, k: int = 3, batch_size: int = 10000, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(N, D) -> (N,) squared distance from each point to its k-th nearest neighbour in the same set.

    As ADM: the (k+1)-th smallest distance with the point itself counted (at distance 0), i.e. self excluded.
    """
    n = features.shape[0]
    if n < k + 1:
        raise ValueError(f"precision/recall with k={k} needs at least {k + 1} feature vectors, got {n}")
    radii = torch.empty(n, dtype=torch.float32 if dtype == torch.float16 else dtype, device=features.device)
    for r0 in range(0, n, batch_size):
        rows = features[r0 : r0 + batch_size]
        best = None  # (rows, k+1) smallest distances so far
        for c0 in range(0, n, batch_size):
            d = _pairwise_sq_distances(rows, features[c0 : c0 + batch_size], dtype)  # (rows, cols)
            candidates = d if best is None else torch.cat([best, d], dim=1)
            best = torch.topk(candidates, k + 1, dim=1, largest=False).values
        radii[r0 : r0 + batch_size] = best[:, k]
    return radii


def precision_recall(
    ref_features: np.ndarray | torch.Tensor,
    sample_features: np.ndarray | torch.Tensor,
    k: int = 3,
    batch_size: int = 10000,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[float, float]:
    """Improved precision and recall (Kynkäänniemi et al.) as the ADM evaluator computes them.

    Each set's manifold is the union of balls around its points with radius = distance to the k-th
    nearest neighbour in that set. Precision = fraction of samples inside the reference manifold
    (dist <= radius of some reference point), recall = fraction of references inside the sample manifold.
    ADM computes distances in float16 (float32 fallback); dtype=torch.float16 reproduces that.
    """
    ref = torch.as_tensor(ref_features).to(device=device, dtype=torch.float32)  # (N_ref, D)
    sample = torch.as_tensor(sample_features).to(device=device, dtype=torch.float32)  # (N_sample, D)
    if ref.ndim != 2 or sample.ndim != 2 or ref.shape[1] != sample.shape[1]:
        raise ValueError(f"feature sets must be (N, D) with equal D, got {tuple(ref.shape)} and {tuple(sample.shape)}")
    ref_radii = manifold_radii(ref, k, batch_size, dtype)  # (N_ref,)
    sample_radii = manifold_radii(sample, k, batch_size, dtype)  # (N_sample,)
    sample_in_ref = torch.zeros(sample.shape[0], dtype=torch.bool, device=sample.device)
    ref_in_sample = torch.zeros(ref.shape[0], dtype=torch.bool, device=ref.device)
    for r0 in range(0, ref.shape[0], batch_size):
        for s0 in range(0, sample.shape[0], batch_size):
            d = _pairwise_sq_distances(ref[r0 : r0 + batch_size], sample[s0 : s0 + batch_size], dtype)  # (R, S)
            sample_in_ref[s0 : s0 + batch_size] |= (d <= ref_radii[r0 : r0 + batch_size, None]).any(dim=0)
            ref_in_sample[r0 : r0 + batch_size] |= (d <= sample_radii[None, s0 : s0 + batch_size]).any(dim=1)
    return sample_in_ref.double().mean().item(), ref_in_sample.double().mean().item()
