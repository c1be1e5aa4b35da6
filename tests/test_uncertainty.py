"""Bootstrap standard errors of the metrics (evaluation/uncertainty.py) and their place in the evaluator's results."""
import numpy as np
import pytest

from evaluation.metrics import frechet_distance, frechet_distance_eigh, gaussian_stats
from evaluation.uncertainty import FrechetResampler, frechet_bootstrap, proportion_bootstrap, standard_errors


def _acts(n, d, shift=0.0, seed=0):
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) * 0.3 + shift).astype(np.float32)


@pytest.mark.parametrize('n', [12, 40])   # fewer and more samples than dimensions: both Gram forms
def test_resampler_all_rows_is_the_frechet_distance(n):
    ref = gaussian_stats(_acts(50, 16, seed=1))
    acts = _acts(n, 16, shift=0.5)
    want = frechet_distance(gaussian_stats(acts), ref)
    assert FrechetResampler(acts, ref).distance(np.arange(n)) == pytest.approx(want, rel=1e-6)
    assert frechet_distance_eigh(gaussian_stats(acts), ref) == pytest.approx(want, rel=1e-6)


def test_resampler_with_repeats_equals_the_repeated_set():
    ref = gaussian_stats(_acts(50, 8, seed=1))
    acts = _acts(30, 8, shift=0.2)
    rows = np.array([0, 0, 3, 5, 5, 5, 7, 9, 11, 29])
    want = frechet_distance(gaussian_stats(acts[rows]), ref)
    assert FrechetResampler(acts, ref).distance(rows) == pytest.approx(want, rel=1e-6)


def test_bootstrap_spread_shrinks_with_more_samples():
    ref = gaussian_stats(_acts(400, 8, seed=1))
    small = frechet_bootstrap(_acts(50, 8, seed=2), ref, resamples=60).std()
    large = frechet_bootstrap(_acts(800, 8, seed=2), ref, resamples=60).std()
    assert large < small / 2      # about 1/sqrt(16) = 1/4 in theory


def test_proportion_bootstrap_matches_the_binomial_error():
    hits = np.zeros(2000)
    hits[:600] = 1                                        # p = 0.3
    se = proportion_bootstrap(hits, resamples=400).std(ddof=1)
    assert se == pytest.approx(np.sqrt(0.3 * 0.7 / 2000), rel=0.2)
    assert proportion_bootstrap(np.ones(50), resamples=10).std() == 0


def test_standard_errors_keys_and_determinism():
    ref_pool, ref_sp = _acts(60, 8, seed=1), _acts(60, 6, seed=3)
    s_pool, s_sp = _acts(40, 8, seed=2), _acts(40, 6, seed=4)
    hits_p, hits_r = np.arange(40) % 3 == 0, np.arange(60) % 2 == 0
    a = standard_errors(s_pool, s_sp, gaussian_stats(ref_pool), gaussian_stats(ref_sp), hits_p, hits_r, 30, seed=5)
    b = standard_errors(s_pool, s_sp, gaussian_stats(ref_pool), gaussian_stats(ref_sp), hits_p, hits_r, 30, seed=5)
    assert a == b and set(a) == {'fid_se', 'sfid_se', 'precision_se', 'recall_se'}
    assert all(v > 0 for v in a.values())
