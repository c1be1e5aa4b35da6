"""Bootstrap standard errors of the ADM metrics, so that a table says which differences between rows are real.

FID and sFID: the sample set is resampled with replacement against the fixed reference statistics. Each resample needs
tr sqrtm(R^1/2 S R^1/2) for the resample's covariance S = Xc^T Xc / (N - 1); with Y = X R^1/2 computed once, that is
the sum of square roots of the eigenvalues of the (N x N) Gram matrix of the centred rows of Y (or of the D x D matrix
when N > D), so a resample costs one small symmetric eigendecomposition. Precision and recall: the points they count
(samples inside the reference manifold, reference points inside the sample manifold) are resampled; the manifolds'
radii are kept, so this measures the counting noise at this N, not the noise of the radii themselves.
Shape suffixes: N samples, M reference points, D feature width.
"""
from typing import Dict

import numpy as np

from evaluation.metrics import GaussianStats

DEFAULT_RESAMPLES = 100


def _psd_sqrt(sigma_DD: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(sigma_DD)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


class FrechetResampler:
    """Fréchet distances of row subsets (with repeats) of sample activations against fixed reference statistics."""

    def __init__(self, acts_ND: np.ndarray, ref: GaussianStats):
        self.acts_ND = np.asarray(acts_ND, np.float64)
        if len(self.acts_ND) < 2:
            raise ValueError(f'a bootstrap of the Fréchet distance needs at least 2 samples, got {len(self.acts_ND)}')
        self.y_ND = self.acts_ND @ _psd_sqrt(np.asarray(ref.sigma, np.float64))
        self.ref_mu, self.tr_ref = np.asarray(ref.mu, np.float64), float(np.trace(ref.sigma))

    def distance(self, rows_N: np.ndarray) -> float:
        """The Fréchet distance of the activations self.acts_ND[rows_N] (any rows, repeats allowed)."""
        x_ND, y_ND = self.acts_ND[rows_N], self.y_ND[rows_N]
        n, d = x_ND.shape
        xc_ND, yc_ND = x_ND - x_ND.mean(0), y_ND - y_ND.mean(0)
        gram = (yc_ND @ yc_ND.T) if n <= d else (yc_ND.T @ yc_ND)
        tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(gram / (n - 1)), 0, None)).sum()
        diff = x_ND.mean(0) - self.ref_mu
        return float(diff @ diff + np.einsum('nd,nd->', xc_ND, xc_ND) / (n - 1) + self.tr_ref - 2 * tr_covmean)


def frechet_bootstrap(acts_ND: np.ndarray, ref: GaussianStats, resamples: int = DEFAULT_RESAMPLES,
                      seed: int = 0) -> np.ndarray:
    """Fréchet distances of `resamples` bootstrap resamples of the sample activations against fixed reference stats."""
    resampler = FrechetResampler(acts_ND, ref)
    n = len(resampler.acts_ND)
    rng = np.random.default_rng(seed)
    return np.array([resampler.distance(rng.integers(0, n, n)) for _ in range(resamples)])


def proportion_bootstrap(hits_N: np.ndarray, resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> np.ndarray:
    """Means of `resamples` bootstrap resamples of a 0/1 vector (a precision or a recall)."""
    hits_N = np.asarray(hits_N, np.float64)
    rng = np.random.default_rng(seed)
    return hits_N[rng.integers(0, len(hits_N), (resamples, len(hits_N)))].mean(1)


def standard_errors(sample_pool_ND: np.ndarray, sample_spatial_ND: np.ndarray, ref_fid: GaussianStats,
                    ref_sfid: GaussianStats, precision_hits_N: np.ndarray, recall_hits_M: np.ndarray,
                    resamples: int = DEFAULT_RESAMPLES, seed: int = 0) -> Dict[str, float]:
    """{'fid_se', 'sfid_se', 'precision_se', 'recall_se'}: the standard deviations over bootstrap resamples."""
    return {
        'fid_se': float(frechet_bootstrap(sample_pool_ND, ref_fid, resamples, seed).std(ddof=1)),
        'sfid_se': float(frechet_bootstrap(sample_spatial_ND, ref_sfid, resamples, seed).std(ddof=1)),
        'precision_se': float(proportion_bootstrap(precision_hits_N, resamples, seed).std(ddof=1)),
        'recall_se': float(proportion_bootstrap(recall_hits_M, resamples, seed).std(ddof=1)),
    }
