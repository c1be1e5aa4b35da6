"""The metric math of OpenAI's ADM evaluator: Fréchet distance, Inception Score, improved precision/recall (k = 3).

Each function keeps the numerics of ADM's TensorFlow evaluator: float32 activations, float64 covariances, scipy's sqrtm
with the same fallbacks, float32 softmax, and squared distances computed from float16 inputs.
Shape suffixes: N/M points, D feature width, K classes.
"""
import logging
from dataclasses import dataclass
from typing import Optional, Tuple

import numpy as np
import scipy.linalg
import torch

log = logging.getLogger('viar')

SQRTM_EPS = 1e-6           # added to both covariance diagonals when sqrtm of their product is not finite
IMAGINARY_ATOL = 1e-3      # largest tolerated imaginary part on the diagonal of sqrtm(sigma1 @ sigma2)
IS_SPLIT_SIZE = 5000       # Inception Score: images per split (10 splits for 50k samples)
SOFTMAX_BATCH = 512        # rows per softmax call, as in ADM
PR_NEIGHBOURS = 3          # improved precision/recall: radius = distance to the 3rd nearest other point
PR_BATCH = 10_000          # rows/columns per distance block; the float16 -> float32 fallback is decided per block


# ----------------------------------------------------------------------------------------------------------------------
# Fréchet distance (FID, sFID)


@dataclass
class GaussianStats:
    """Mean and covariance of a set of activations (ADM's FIDStatistics)."""
    mu: np.ndarray
    sigma: np.ndarray


def gaussian_stats(acts_ND: np.ndarray) -> GaussianStats:
    """np.mean (in the activations' dtype) and np.cov(rowvar=False) (float64, ddof 1), exactly as ADM."""
    return GaussianStats(np.mean(acts_ND, axis=0), np.cov(acts_ND, rowvar=False))


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    # ADM passes disp=False only to silence a print; the argument is deprecated since SciPy 1.16 and the
    # returned square root is the same.
    return scipy.linalg.sqrtm(matrix)


def frechet_distance(a: GaussianStats, b: GaussianStats, eps: float = SQRTM_EPS) -> float:
    """|mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr sqrtm(S_a S_b), with ADM's fallbacks for near-singular products."""
    mu1, mu2 = np.atleast_1d(a.mu), np.atleast_1d(b.mu)
    sigma1, sigma2 = np.atleast_2d(a.sigma), np.atleast_2d(b.sigma)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError(f'Fréchet distance of mismatched statistics: means {mu1.shape} vs {mu2.shape}, '
                         f'covariances {sigma1.shape} vs {sigma2.shape}')
    diff = mu1 - mu2
    covmean = _sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        log.warning(f'Fréchet distance: singular product; adding {eps} to the diagonal of both covariances')
        offset = np.eye(sigma1.shape[0]) * eps
        covmean = _sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=IMAGINARY_ATOL):
            raise ValueError(f'Fréchet distance: sqrtm has an imaginary component of {np.max(np.abs(covmean.imag))}')
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_eigh(a: GaussianStats, b: GaussianStats) -> float:
    """The same distance through symmetric eigendecompositions, tr sqrtm(S1 S2) = sum sqrt eig(S1^1/2 S2 S1^1/2).

    Not ADM's numerics (scipy's sqrtm), but equal in exact arithmetic, robust for the singular covariances of small
    sets, and 10-20x faster on a CPU (two 2048x2048 eigh instead of a Schur-based sqrtm): `--fid-method eigh`.
    """
    w, v = np.linalg.eigh(a.sigma)
    root = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root @ b.sigma @ root), 0, None)).sum()
    diff = np.asarray(a.mu, np.float64) - np.asarray(b.mu, np.float64)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


FRECHET_METHODS = {'scipy': frechet_distance, 'eigh': frechet_distance_eigh}


# ----------------------------------------------------------------------------------------------------------------------
# Inception Score


def class_probabilities(pool_ND: torch.Tensor, logits_weight_KD: torch.Tensor) -> np.ndarray:
    """float32 softmax(pool_3 @ W) over all 1008 outputs, in chunks of 512; W has no bias (ADM's softmax graph)."""
    weight_DK = logits_weight_KD.float().t()
    chunks = []
    for start in range(0, len(pool_ND), SOFTMAX_BATCH):
        logits = pool_ND[start:start + SOFTMAX_BATCH].to(weight_DK.device, torch.float32) @ weight_DK
        chunks.append(torch.softmax(logits, dim=1).cpu().numpy())
    return np.concatenate(chunks, axis=0)


def inception_score(probs_NK: np.ndarray, split_size: int = IS_SPLIT_SIZE,
                    rng: Optional[np.random.Generator] = None) -> float:
    """Mean over splits of exp(mean_i KL(p_i || p_split)); with `rng`, rows are shuffled first (VIAR's evaluator)."""
    if rng is not None:
        # VIAR shuffles before splitting: its samples are class-ordered, and a split must not see only 100 classes.
        probs_NK = probs_NK[rng.permutation(len(probs_NK))]
    scores = []
    for start in range(0, len(probs_NK), split_size):
        part = probs_NK[start:start + split_size]
        with np.errstate(divide='ignore', invalid='ignore'):
            kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        # 0 * log 0 = 0 (ADM would return nan when a probability underflows to exactly 0).
        kl = np.where(part > 0, kl, 0)
        scores.append(np.exp(np.mean(np.sum(kl, 1))))
    return float(np.mean(scores))


# ----------------------------------------------------------------------------------------------------------------------
# Improved precision and recall (Kynkäänniemi et al. 2019)


def _squared_distances_in(u_ND: torch.Tensor, v_MD: torch.Tensor) -> torch.Tensor:
    """max(|u|^2 - 2 u.v + |v|^2, 0) with every result rounded to the inputs' dtype; products accumulate in float32."""
    dtype = u_ND.dtype
    norm_u = (u_ND * u_ND).float().sum(1).to(dtype)
    norm_v = (v_MD * v_MD).float().sum(1).to(dtype)
    dot_NM = (u_ND.float() @ v_MD.float().t()).to(dtype)
    return torch.clamp_min(norm_u[:, None] - 2 * dot_NM + norm_v[None, :], 0)


def squared_distances(u_ND: torch.Tensor, v_MD: torch.Tensor) -> torch.Tensor:
    """ADM's pairwise squared distances: from float16 inputs, or float32 for the whole block if any is non-finite."""
    d_NM = _squared_distances_in(u_ND.half(), v_MD.half())
    if not torch.isfinite(d_NM).all():
        d_NM = _squared_distances_in(u_ND.float(), v_MD.float())
    return d_NM.float()


def manifold_radii(feats_ND: torch.Tensor, k: int = PR_NEIGHBOURS, batch: int = PR_BATCH) -> torch.Tensor:
    """Per point, the k-th smallest squared distance to its own set other than itself (sorted position k)."""
    radii = torch.empty(len(feats_ND), dtype=torch.float32, device=feats_ND.device)
    for r0 in range(0, len(feats_ND), batch):
        rows = feats_ND[r0:r0 + batch]
        d_NM = torch.cat([squared_distances(rows, feats_ND[c0:c0 + batch])
                          for c0 in range(0, len(feats_ND), batch)], dim=1)
        # Position k of the sorted row; position 0 is the point itself (np.partition in ADM, same value).
        radii[r0:r0 + batch] = torch.kthvalue(d_NM, k + 1, dim=1).values
    return radii


def precision_recall(ref_ND: torch.Tensor, sample_MD: torch.Tensor, k: int = PR_NEIGHBOURS,
                     batch: int = PR_BATCH) -> Tuple[float, float]:
    """Precision: samples inside some reference point's k-NN ball; recall: reference points inside some sample's."""
    sample_covered, ref_covered = precision_recall_hits(ref_ND, sample_MD, k, batch)
    return float(sample_covered.double().mean()), float(ref_covered.double().mean())


def precision_recall_hits(ref_ND: torch.Tensor, sample_MD: torch.Tensor, k: int = PR_NEIGHBOURS,
                          batch: int = PR_BATCH) -> Tuple[torch.Tensor, torch.Tensor]:
    """The points precision and recall count: (samples inside the reference manifold (M,), reference points inside
    the sample manifold (N,)) as booleans."""
    if len(ref_ND) <= k or len(sample_MD) <= k:
        raise ValueError(f'precision/recall with k={k} needs more than {k} reference and sample images, '
                         f'got {len(ref_ND)} and {len(sample_MD)}')
    ref_radii = manifold_radii(ref_ND, k, batch)
    sample_radii = manifold_radii(sample_MD, k, batch)
    ref_covered = torch.zeros(len(ref_ND), dtype=torch.bool, device=ref_ND.device)
    sample_covered = torch.zeros(len(sample_MD), dtype=torch.bool, device=sample_MD.device)
    for r0 in range(0, len(ref_ND), batch):
        for c0 in range(0, len(sample_MD), batch):
            d_NM = squared_distances(ref_ND[r0:r0 + batch], sample_MD[c0:c0 + batch])
            ref_covered[r0:r0 + batch] |= (d_NM <= sample_radii[None, c0:c0 + batch]).any(dim=1)
            sample_covered[c0:c0 + batch] |= (d_NM <= ref_radii[r0:r0 + batch, None]).any(dim=0)
    return sample_covered, ref_covered
