"""The ADM-compatible evaluator: metric math against closed forms, the Inception network against the offline
TorchScript model, .npz/PNG input checks, the activation cache, and a small end-to-end run on the CPU."""
import contextlib
import io
import os
import threading

import numpy as np
import pytest
import scipy.linalg
import torch
import torch.nn.functional as F
from PIL import Image

from evaluation import evaluator_cli
from evaluation.batches import open_batch
from evaluation.evaluate import evaluate, format_results
from evaluation.evaluator_cli import get_parser
from evaluation.inception import (NUM_CLASSES, POOL_DIM, SPATIAL_DIM, FIDInceptionV3, preprocess, spatial_features,
                                  tf1_resize_bilinear)
from evaluation.inception_weights import (TORCHSCRIPT_LAYERS, NO_LOGITS_REASON, load_inception, load_offline_inception,
                                          state_dict_from_torchscript, torchscript_path)
from evaluation.metrics import (FRECHET_METHODS, GaussianStats, class_probabilities, frechet_distance,
                                frechet_distance_eigh, gaussian_stats, inception_score, manifold_radii,
                                precision_recall)
from evaluation.stats import (BatchStats, batch_stats, cache_path, default_batch_size, load_stats, prepared_batches,
                              save_stats, subset_batch)
from utils.checkpoint import CheckpointError
from utils.cli import UserError, run

E2E_IMAGES = 40        # per batch; Inception runs at 3-7 images/s on 2 CPU cores
E2E_SIZE = 32          # pixels; every image is resized to 299 anyway
PNG_IMAGES = 4         # the --save-stats run on a PNG folder
IS_IMAGES = 4          # per batch, for the run with (random) logits (k = 3 needs 4)


# ----------------------------------------------------------------------------------------------------------------------
# Helpers


def psd_factor(sigma: np.ndarray) -> np.ndarray:
    """F (r, D) with F.T @ F = sigma for a PSD sigma of numerical rank r (pivoted Cholesky, O(D^2 r))."""
    upper, piv, rank, _ = scipy.linalg.lapack.dpstrf(sigma, lower=0)
    factor = np.zeros((rank, sigma.shape[0]))
    factor[:, piv - 1] = np.triu(upper)[:rank]
    return factor


def low_rank_frechet(a: GaussianStats, b: GaussianStats) -> float:
    """Closed form for covariances of few samples: tr sqrtm(S1 S2) = sum of singular values of F1 F2^T.

    scipy's sqrtm of a 2048x2048 product takes 20-60 s on 2 CPU cores; the end-to-end tests use this instead (it is
    checked against `frechet_distance` below), everything else in them is the real evaluator.
    """
    tr_covmean = np.linalg.svd(psd_factor(a.sigma) @ psd_factor(b.sigma).T, compute_uv=False).sum()
    diff = np.asarray(a.mu, np.float64) - np.asarray(b.mu, np.float64)
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * tr_covmean)


def make_images(n: int, seed: int, noise: float) -> np.ndarray:
    """Smooth coloured patterns (plus uniform noise) as uint8 (n, 32, 32, 3)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:E2E_SIZE, 0:E2E_SIZE] / E2E_SIZE
    freq = rng.uniform(1, 6, (n, 3, 2))
    phase = rng.uniform(0, 2 * np.pi, (n, 3))
    waves = np.sin(2 * np.pi * (freq[:, :, None, None, 0] * xx + freq[:, :, None, None, 1] * yy)
                   + phase[..., None, None])
    images = (waves.transpose(0, 2, 3, 1) * 0.5 + 0.5) * (1 - noise) + rng.uniform(0, noise, (n, E2E_SIZE, E2E_SIZE, 3))
    return (images * 255).round().astype(np.uint8)


class ForwardCalled(Exception):
    pass


class NoForward:
    """A network stand-in that must not run: proves a cache (or stats file) was used."""
    device = torch.device('cpu')
    logits_weight_KD = None
    no_logits_reason = NO_LOGITS_REASON

    def __init__(self, features_id: str):
        self.weights_id = self.features_id = features_id

    def features(self, images):
        raise ForwardCalled

    prepare = run = features


@pytest.fixture(scope='module')
def offline():
    """The offline weights run by the TorchScript file's own module: the reference implementation."""
    return load_offline_inception('cpu', 'torchscript')


@pytest.fixture(scope='module')
def e2e(tmp_path_factory, offline):
    """One CLI run on two 50-image .npz files with the offline weights; its stdout and paths."""
    root = tmp_path_factory.mktemp('e2e')
    ref, sample = root / 'ref.npz', root / 'sample.npz'
    np.savez(ref, arr_0=make_images(E2E_IMAGES, seed=0, noise=0.0))
    np.savez(sample, arr_0=make_images(E2E_IMAGES, seed=1, noise=0.5))
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setitem(FRECHET_METHODS, 'scipy', low_rank_frechet)
        code = run(evaluator_cli.main, get_parser(), [str(ref), str(sample), '--device', 'cpu', '--batch-size',
                                                  str(E2E_IMAGES), '--no-progress'])
    return {'code': code, 'stdout': out.getvalue(), 'ref': ref, 'sample': sample, 'root': root}


def result_lines(stdout: str) -> dict:
    """{'FID': '12.3', ...} from the evaluator's output lines."""
    labels = ('Inception Score', 'FID', 'sFID', 'Precision', 'Recall')
    return {line.split(': ', 1)[0]: line.split(': ', 1)[1] for line in stdout.splitlines()
            if line.split(': ', 1)[0] in labels}


# ----------------------------------------------------------------------------------------------------------------------
# Metric math


def test_fid_of_a_set_against_itself_is_zero():
    acts = np.random.default_rng(0).standard_normal((400, 16)).astype(np.float32)
    stats = gaussian_stats(acts)
    assert stats.mu.dtype == np.float32 and stats.sigma.dtype == np.float64   # ADM's dtypes
    assert abs(frechet_distance(stats, stats)) < 1e-8 * np.trace(stats.sigma)


def test_frechet_distance_matches_closed_forms():
    rng = np.random.default_rng(1)
    # Diagonal covariances: d^2 = |mu1 - mu2|^2 + sum (s1 + s2 - 2 sqrt(s1 s2)).
    mu1, mu2 = rng.standard_normal(5), rng.standard_normal(5)
    s1, s2 = rng.uniform(0.1, 3, 5), rng.uniform(0.1, 3, 5)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    got = frechet_distance(GaussianStats(mu1, np.diag(s1)), GaussianStats(mu2, np.diag(s2)))
    assert got == pytest.approx(expected, rel=1e-10)
    # General (non-commuting) covariances against the symmetric eigendecomposition form.
    a, b = rng.standard_normal((6, 6)), rng.standard_normal((6, 6))
    g1 = GaussianStats(rng.standard_normal(6), a @ a.T + 0.1 * np.eye(6))
    g2 = GaussianStats(rng.standard_normal(6), b @ b.T + 0.1 * np.eye(6))
    assert frechet_distance(g1, g2) == pytest.approx(frechet_distance_eigh(g1, g2), rel=1e-9)
    assert frechet_distance(g1, g2) == pytest.approx(frechet_distance(g2, g1), rel=1e-9)


@pytest.mark.parametrize('samples', [8, 200], ids=['rank-deficient', 'full-rank'])
def test_low_rank_closed_form_used_by_the_end_to_end_tests(samples):
    rng = np.random.default_rng(8)
    a = gaussian_stats(rng.standard_normal((samples, 24)))
    b = gaussian_stats(rng.standard_normal((samples + 3, 24)) * 1.5 + 0.3)
    assert psd_factor(a.sigma).shape == (min(samples - 1, 24), 24)
    assert low_rank_frechet(a, b) == pytest.approx(frechet_distance_eigh(a, b), rel=1e-7)
    if samples > 24:
        assert low_rank_frechet(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-9)


@pytest.mark.filterwarnings('ignore::scipy.linalg.LinAlgWarning')
def test_frechet_distance_fallbacks_and_errors():
    eye = np.eye(2)
    # A nilpotent product has no square root: sqrtm returns inf, and ADM retries with 1e-6 on both diagonals.
    nilpotent = np.array([[0.0, 1.0], [0.0, 0.0]])
    assert not np.isfinite(scipy.linalg.sqrtm(nilpotent @ eye)).all()
    got = frechet_distance(GaussianStats(np.zeros(2), nilpotent), GaussianStats(np.zeros(2), eye))
    assert got == pytest.approx(2 - 4 * np.sqrt(1e-6 * (1 + 1e-6)), rel=1e-6)
    # A negative eigenvalue gives an imaginary diagonal, which ADM refuses.
    with pytest.raises(ValueError, match='imaginary'):
        frechet_distance(GaussianStats(np.zeros(2), np.diag([1.0, -1.0])), GaussianStats(np.zeros(2), eye))
    with pytest.raises(ValueError, match='mismatched'):
        frechet_distance(GaussianStats(np.zeros(2), eye), GaussianStats(np.zeros(3), np.eye(3)))


def test_inception_score_uniform_one_hot_and_splits():
    classes = 10
    assert inception_score(np.full((200, classes), 1 / classes, np.float32)) == pytest.approx(1.0, abs=1e-5)
    one_hot = np.eye(classes, dtype=np.float32)[np.arange(100) % classes]
    assert inception_score(one_hot) == pytest.approx(classes, rel=1e-6)
    # Class-sorted rows: each 5000-row split sees 5 of the 10 classes, so IS = 5; shuffling first restores ~10.
    sorted_rows = np.eye(classes, dtype=np.float32)[np.arange(10_000) * classes // 10_000]
    assert inception_score(sorted_rows) == pytest.approx(5.0, rel=1e-6)
    shuffled = inception_score(sorted_rows, rng=np.random.default_rng(0))
    assert 9.8 < shuffled <= classes + 1e-4
    assert shuffled == inception_score(sorted_rows, rng=np.random.default_rng(0))


def test_class_probabilities_use_the_weight_without_bias():
    rng = np.random.default_rng(2)
    pool, weight = rng.standard_normal((700, 16)).astype(np.float32), rng.standard_normal((12, 16)).astype(np.float32)
    probs = class_probabilities(torch.from_numpy(pool), torch.from_numpy(weight))
    logits = pool.astype(np.float64) @ weight.T.astype(np.float64)
    expected = np.exp(logits - logits.max(1, keepdims=True))
    expected /= expected.sum(1, keepdims=True)
    assert probs.dtype == np.float32 and probs.shape == (700, 12)
    np.testing.assert_allclose(probs, expected, rtol=1e-4, atol=1e-6)


def brute_force_precision_recall(ref: np.ndarray, sample: np.ndarray, k: int = 3):
    """Improved precision/recall from full float64 distance matrices."""
    def sq_dists(u, v):
        return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
    ref_radii = np.sort(sq_dists(ref, ref), axis=1)[:, k]
    sample_radii = np.sort(sq_dists(sample, sample), axis=1)[:, k]
    d = sq_dists(ref, sample)
    precision = np.mean((d <= ref_radii[:, None]).any(axis=0))
    recall = np.mean((d <= sample_radii[None, :]).any(axis=1))
    return precision, recall


@pytest.mark.parametrize('scale', [1, 100], ids=['float16', 'float32-fallback'])
def test_precision_recall_matches_brute_force(scale):
    # Integer coordinates make every distance exact in float16 (scale 1) and overflow float16 at scale 100,
    # which forces ADM's float32 fallback; either way the result must equal the float64 brute force.
    rng = np.random.default_rng(3)
    ref = rng.integers(-4, 5, (60, 6)) * scale
    sample = (rng.integers(-4, 5, (45, 6)) + np.array([1, 0, 2, 0, 0, 1])) * scale
    expected = brute_force_precision_recall(ref, sample)
    assert 0 < expected[0] < 1 and 0 < expected[1] < 1     # a non-trivial case
    ref_t, sample_t = torch.tensor(ref, dtype=torch.float32), torch.tensor(sample, dtype=torch.float32)
    assert precision_recall(ref_t, sample_t) == pytest.approx(expected, abs=0)
    assert precision_recall(ref_t, sample_t, batch=7) == pytest.approx(expected, abs=0)   # blockwise
    assert precision_recall(ref_t, ref_t) == (1.0, 1.0)


def test_manifold_radius_is_the_third_nearest_other_point():
    points = torch.tensor([[0.0], [1.0], [2.0], [3.0], [10.0]])
    assert manifold_radii(points).tolist() == [9.0, 4.0, 4.0, 9.0, 81.0]
    with pytest.raises(ValueError, match='needs more than 3'):
        precision_recall(points[:3], points)


def test_sfid_features_are_first_7_channels_in_nhwc_order():
    n, c, s = 2, 10, 17
    idx = torch.arange(n * c * s * s, dtype=torch.float32).reshape(n, c, s, s)
    feats = spatial_features(idx)
    assert feats.shape == (n, SPATIAL_DIM)
    for h, w, ch in [(0, 0, 0), (0, 0, 6), (0, 1, 0), (5, 3, 2), (16, 16, 6)]:
        assert feats[1, (h * s + w) * 7 + ch] == idx[1, ch, h, w]


# ----------------------------------------------------------------------------------------------------------------------
# The network


def tf1_resize_reference(image: np.ndarray, out_h: int, out_w: int) -> np.ndarray:
    """TF1 legacy bilinear resize written from its definition, one pixel at a time (float64)."""
    in_h, in_w, _ = image.shape
    out = np.zeros((out_h, out_w, image.shape[2]))
    for i in range(out_h):
        y = i * in_h / out_h
        y0, y1, fy = int(np.floor(y)), min(int(np.ceil(y)), in_h - 1), y - np.floor(y)
        for j in range(out_w):
            x = j * in_w / out_w
            x0, x1, fx = int(np.floor(x)), min(int(np.ceil(x)), in_w - 1), x - np.floor(x)
            top = image[y0, x0] + (image[y0, x1] - image[y0, x0]) * fx
            bottom = image[y1, x0] + (image[y1, x1] - image[y1, x0]) * fx
            out[i, j] = top + (bottom - top) * fy
    return out


def test_tf1_bilinear_resize():
    # 2 -> 4 pixels: sources at 0, 0.5, 1, 1.5 (no half-pixel offset), the last clamped to the edge.
    row = torch.tensor([0.0, 10.0]).view(1, 1, 2, 1).expand(1, 2, 2, 1)
    assert tf1_resize_bilinear(row, 4)[0, 0, :, 0].tolist() == [0.0, 5.0, 10.0, 10.0]
    image = np.random.default_rng(4).uniform(0, 255, (5, 7, 3)).astype(np.float32)
    got = tf1_resize_bilinear(torch.from_numpy(image)[None], 11)[0].numpy()
    np.testing.assert_allclose(got, tf1_resize_reference(image, 11, 11), atol=1e-3)
    same = torch.from_numpy(image)[None, :5, :5]
    assert torch.equal(tf1_resize_bilinear(same, 5), same)
    # PyTorch's half-pixel bilinear is a different kernel.
    half_pixel = F.interpolate(torch.from_numpy(image).permute(2, 0, 1)[None], size=(11, 11), mode='bilinear',
                               align_corners=False)[0].permute(1, 2, 0).numpy()
    assert np.abs(half_pixel - got).max() > 1


def test_preprocess_scales_to_adm_range():
    images = torch.tensor([0, 128, 255], dtype=torch.uint8).view(1, 1, 3, 1).expand(1, 3, 3, 3)
    x = preprocess(images)
    assert x.shape == (1, 3, 299, 299) and x.dtype == torch.float32
    assert x.min() == -1.0 and x.max() == pytest.approx(127 / 128)


@pytest.fixture(scope='module')
def few_images():
    return np.random.default_rng(5).integers(0, 256, (2, 40, 56, 3), dtype=np.uint8)


@pytest.fixture(scope='module')
def few_features(offline, few_images):
    return offline.features(few_images)


def test_offline_features_equal_the_torchscript_model(offline, few_images, few_features):
    script = offline.network.module
    assert isinstance(script, torch.jit.ScriptModule)          # the file's own module, run as is
    pool, spatial = few_features
    assert pool.shape == (2, POOL_DIM) and spatial.shape == (2, SPATIAL_DIM)
    assert offline.logits_weight_KD is None and offline.no_logits_reason == NO_LOGITS_REASON
    x = preprocess(torch.from_numpy(few_images))
    with torch.inference_mode():
        assert torch.equal(pool, script(x))                       # the module's own forward
        h = x
        for name in TORCHSCRIPT_LAYERS[:TORCHSCRIPT_LAYERS.index('mixed_6')]:
            h = getattr(script.net.layers, name)(h)
        conv_branch = script.net.layers.mixed_6.conv(h)            # ADM's mixed_6/conv, taken directly
    assert conv_branch.shape == (2, 192, 17, 17)
    assert torch.equal(spatial, spatial_features(conv_branch))


def test_pytorch_architecture_reproduces_torchscript(offline, few_images, few_features):
    eager = load_offline_inception('cpu', 'eager')
    assert isinstance(eager.network, FIDInceptionV3) and eager.network.fc is None
    assert eager.weights_id == offline.weights_id           # same weights, same cache
    pool, spatial = eager.features(few_images)
    torch.testing.assert_close(pool, few_features[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spatial, few_features[1], rtol=1e-5, atol=1e-5)
    # The weights map one to one: every TorchScript tensor lands in the architecture (BN scales are ones).
    script_sd = offline.network.module.state_dict()     # 4 tensors per conv layer: weight, beta, mean, var
    converted = state_dict_from_torchscript(offline.network.module)
    assert len(converted) == len(script_sd) // 4 * 5
    assert all(torch.equal(v, torch.ones_like(v)) for k, v in converted.items() if k.endswith('bn.weight'))


def assert_relative_close(got: torch.Tensor, want: torch.Tensor, rel: float):
    """Each row of `got` within `rel` of `want` relative to the row's norm, and every entry within `rel` of the
    largest magnitude (single entries near zero, e.g. after a ReLU, have no meaningful relative error)."""
    assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
    assert ((got - want).norm(dim=1) / want.norm(dim=1)).max() <= rel
    assert (got - want).abs().max() <= rel * want.abs().max()


def test_fast_backend_matches_the_torchscript_model(offline, few_images, few_features):
    fast = load_offline_inception('cpu')
    assert fast.backend == 'fast' and fast.weights_id == offline.weights_id        # one cache for both
    net = fast.network
    assert net.Mixed_5b.branch1x1 is None and net.Mixed_5b.merged_heads.splits == [64, 48, 64]
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())    # folded into the convolutions
    assert fast.prepare(few_images).is_contiguous(memory_format=torch.channels_last)
    for got, want in zip(fast.features(few_images), few_features):
        assert_relative_close(got, want, 1e-4)
    # Natural-looking 256px images as well (ADM's size).
    images = np.repeat(np.repeat(make_images(2, seed=3, noise=0.2), 8, axis=1), 8, axis=2)
    for got, want in zip(fast.features(images), offline.features(images)):
        assert_relative_close(got, want, 1e-4)


def test_bf16_features_are_close_and_keyed_apart(offline, few_images, few_features, tmp_path):
    fast32 = load_inception(None, 'cpu')
    fast16 = load_inception(None, 'cpu', precision='bf16')
    assert fast32.features_id == fast32.weights_id == offline.weights_id
    kind, _, digest = offline.weights_id.rpartition('-')
    assert fast16.weights_id == offline.weights_id and fast16.features_id == f'{kind}-bf16-{digest}'
    ref = tmp_path / 'ref.npz'
    assert cache_path(ref, fast16.features_id) != cache_path(ref, fast32.features_id)
    got = fast16.features(few_images)
    for g, want in zip(got, few_features):
        assert g.dtype == torch.float32
        assert not torch.equal(g, want)                  # bf16 arithmetic really ran ...
        assert ((g - want).norm(dim=1) / want.norm(dim=1)).max() <= 0.05   # ... and stays near fp32's
    with pytest.raises(CheckpointError, match="precision 'fp16'"):
        load_inception(None, 'cpu', precision='fp16')


def test_backends_are_checked():
    with pytest.raises(CheckpointError, match='unknown Inception backend'):
        load_offline_inception('cpu', 'onnx')
    with pytest.raises(CheckpointError, match='offline TorchScript file only'):
        load_inception('pt_inception.pth', 'cpu', 'torchscript')


class ListImages:
    """An image source of given batches that fails after them when `error` is set."""
    path = None

    def __init__(self, batches, error=None):
        self._batches, self.error = batches, error

    def batches(self, batch_size):
        yield from self._batches
        if self.error is not None:
            raise self.error


class RecordingNetwork:
    """Stand-in whose `prepare` records the thread it ran in."""

    def __init__(self):
        self.threads = []

    def prepare(self, images):
        self.threads.append(threading.current_thread().name)
        return torch.as_tensor(images).float()


def test_batches_are_prepared_ahead_in_order_and_errors_surface():
    batches = [np.full((n, 2, 2, 3), n, np.uint8) for n in (3, 1, 2)]
    network = RecordingNetwork()
    got = list(prepared_batches(ListImages(batches), network, batch_size=3))
    assert [size for size, _ in got] == [3, 1, 2]
    assert all(torch.equal(x, torch.as_tensor(b).float()) for (_, x), b in zip(got, batches))
    assert network.threads and all(name.startswith('inception-prefetch') for name in network.threads)
    failing = prepared_batches(ListImages(batches[:1], UserError('truncated arr_0')), network, 3)
    assert next(failing)[0] == 3
    with pytest.raises(UserError, match='truncated'):
        next(failing)


class SizeRecordingNetwork:
    """Stand-in that records the size of every batch it runs and returns features that depend on each image only."""
    features_id = weights_id = 'torchscript-' + '0' * 64

    def __init__(self, device: str):
        self.device, self.sizes = torch.device(device), []

    def prepare(self, images):
        return torch.as_tensor(images).float()

    def run(self, x_NHWC):
        self.sizes.append(len(x_NHWC))
        mean_N1 = x_NHWC.flatten(1).mean(1, keepdim=True)
        return mean_N1.expand(-1, POOL_DIM), mean_N1.expand(-1, SPATIAL_DIM)


def test_default_batch_size_is_16_on_a_cpu_and_adms_64_on_a_gpu(tmp_path):
    assert default_batch_size(torch.device('cpu')) == 16 and default_batch_size(torch.device('cuda:0')) == 64
    np.savez(tmp_path / 'b.npz', arr_0=make_images(18, seed=0, noise=0.5))
    network = SizeRecordingNetwork('cpu')
    default = batch_stats(open_batch(tmp_path / 'b.npz'), network, cache=False, progress=False)
    assert network.sizes == [16, 2]
    network.sizes = []
    chosen = batch_stats(open_batch(tmp_path / 'b.npz'), network, batch_size=5, cache=False, progress=False)
    assert network.sizes == [5, 5, 5, 3] and np.array_equal(chosen.pool_ND, default.pool_ND)
    assert get_parser().parse_args(['ref.npz', 'sample.npz']).batch_size is None   # resolved on the device


@pytest.fixture(scope='module')
def random_weights(tmp_path_factory):
    """A randomly initialised pytorch-fid-format state dict saved as a .pth (without num_batches_tracked)."""
    torch.manual_seed(0)
    sd = {k: v for k, v in FIDInceptionV3().state_dict().items() if not k.endswith('num_batches_tracked')}
    path = tmp_path_factory.mktemp('weights') / 'pt_inception-random.pth'
    torch.save(sd, path)
    return path, sd


@pytest.fixture(scope='module')
def random_network(random_weights):
    return load_inception(random_weights[0], 'cpu')


def test_fast_backend_matches_eager_on_pytorch_fid_weights(random_weights, random_network, few_images):
    eager = load_inception(random_weights[0], 'cpu', 'eager')
    assert random_network.backend == 'fast' and torch.equal(random_network.logits_weight_KD, eager.logits_weight_KD)
    for got, want in zip(random_network.features(few_images), eager.features(few_images)):
        assert_relative_close(got, want, 1e-4)


def test_pytorch_fid_state_dict_loads_and_runs(random_weights, random_network, few_images, tmp_path):
    _, sd = random_weights
    network = random_network
    assert network.logits_weight_KD.shape == (NUM_CLASSES, POOL_DIM)
    assert torch.equal(network.logits_weight_KD, sd['fc.weight'])
    pool, spatial = network.features(few_images[:1])
    assert pool.shape == (1, POOL_DIM) and spatial.shape == (1, SPATIAL_DIM) and torch.isfinite(pool).all()
    # Strict keys: a missing and an unexpected key are named.
    broken = {k: v for k, v in sd.items() if k != 'Mixed_6d.branch1x1.conv.weight'}
    broken['aux.weight'] = torch.zeros(1)
    torch.save(broken, tmp_path / 'broken.pth')
    with pytest.raises(CheckpointError, match=r'missing: Mixed_6d\.branch1x1\.conv\.weight.*unexpected: aux\.weight'):
        load_inception(tmp_path / 'broken.pth')
    torch.save({'fc.weight': torch.zeros(NUM_CLASSES, POOL_DIM)}, tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='pt_inception-2015-12-05-6726825d.pth'):
        load_inception(tmp_path / 'other.pth')
    with pytest.raises(CheckpointError, match='not found'):
        load_inception(tmp_path / 'absent.pth')
    (tmp_path / 'text.pth').write_text('not a checkpoint\n')
    with pytest.raises(CheckpointError, match='text.pth'):
        load_inception(tmp_path / 'text.pth')
    with pytest.raises(CheckpointError, match='is a TorchScript file'):
        load_inception(torchscript_path())


# ----------------------------------------------------------------------------------------------------------------------
# Inputs


@pytest.mark.parametrize('arrays, message', [
    ({'images': np.zeros((2, 8, 8, 3), np.uint8)}, 'has no arr_0'),
    ({'arr_0': np.zeros((2, 8, 8, 3), np.float32)}, 'must hold uint8'),
    ({'arr_0': np.zeros((2, 3, 8, 8), np.uint8)}, 'looks like NCHW'),
    ({'arr_0': np.zeros((2, 8, 8), np.uint8)}, r'shape \(N, H, W, 3\)'),
    ({'arr_0': np.zeros((0, 8, 8, 3), np.uint8)}, 'no pixels'),
    ({'arr_0': np.zeros((2, 8, 8, 3), np.uint8), 'mu': np.zeros(POOL_DIM)}, 'lacks sigma, mu_s, sigma_s'),
    ({'arr_0': np.zeros((2, 8, 8, 3), np.uint8), 'mu': np.zeros(3), 'sigma': np.zeros((3, 3)),
      'mu_s': np.zeros(3), 'sigma_s': np.zeros((3, 3))}, r'mu must be a float array of shape \(2048,\)'),
], ids=['missing-key', 'dtype', 'nchw', 'grey', 'empty', 'partial-stats', 'stats-shape'])
def test_malformed_npz_gets_one_clear_line(tmp_path, capsys, arrays, message):
    bad = tmp_path / 'bad.npz'
    np.savez(bad, **arrays)
    with pytest.raises(UserError, match=message):
        open_batch(bad)
    assert run(evaluator_cli.main, get_parser(), [str(bad), str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'bad.npz' in err


def test_not_an_npz_and_missing_paths(tmp_path):
    (tmp_path / 'text.npz').write_text('hello')
    with pytest.raises(UserError, match='not an .npz'):
        open_batch(tmp_path / 'text.npz')
    with pytest.raises(UserError, match='no such file'):
        open_batch(tmp_path / 'absent.npz')
    with pytest.raises(UserError, match='no .png files'):
        open_batch(tmp_path)


def test_cli_usage_errors(tmp_path, capsys):
    good = tmp_path / 'good.npz'
    np.savez(good, arr_0=np.zeros((4, 8, 8, 3), np.uint8))
    cases = [([str(good)], 'give a reference batch and a sample batch'),
             ([str(good), str(good), '--save-stats', str(tmp_path / 'o.npz')], 'one input batch'),
             ([str(good), str(good), '--batch-size', '0'], 'argument --batch-size: must be a positive integer'),
             ([str(good), '--save-stats', str(good)], 'would overwrite the input')]
    if not torch.cuda.is_available():
        cases.append(([str(good), str(good), '--device', 'cuda'], 'CUDA is not available'))
    for argv, message in cases:
        assert run(evaluator_cli.main, get_parser(), argv + ['--no-progress']) == 2
        err = capsys.readouterr().err
        assert err.count('\n') == 1 and message in err, (argv, err)


def test_npz_images_stream_in_order(tmp_path):
    images = np.random.default_rng(6).integers(0, 256, (7, 5, 4, 3), dtype=np.uint8)
    for save in (np.savez, np.savez_compressed):
        save(tmp_path / 'x.npz', arr_0=images)
        batch = open_batch(tmp_path / 'x.npz')
        chunks = list(batch.images.batches(3))
        assert [len(c) for c in chunks] == [3, 3, 1]
        assert np.array_equal(np.concatenate(chunks), images)


def test_png_folder_reads_sorted_rgb_and_checks_sizes(tmp_path):
    rgb = np.random.default_rng(7).integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    Image.fromarray(rgb[0]).save(tmp_path / '000002.png')
    Image.fromarray(np.dstack([rgb[1], np.full((6, 5), 7, np.uint8)]), 'RGBA').save(tmp_path / '000000.png')
    Image.fromarray(rgb[2][..., 0], 'L').save(tmp_path / '000001.png')
    (tmp_path / 'notes.txt').write_text('ignored')
    batch = open_batch(tmp_path)
    got = np.concatenate(list(batch.images.batches(2)))
    assert got.shape == (3, 6, 5, 3)
    assert np.array_equal(got[0], rgb[1]) and np.array_equal(got[2], rgb[0])          # sorted, alpha dropped
    assert np.array_equal(got[1], np.repeat(rgb[2][..., :1], 3, axis=2))              # grey -> RGB
    Image.fromarray(rgb[0][:4]).save(tmp_path / '000003.png')
    with pytest.raises(UserError, match='000003.png: size 5x4 differs'):
        open_batch(tmp_path)


# ----------------------------------------------------------------------------------------------------------------------
# End to end (offline weights) and the cache


def test_end_to_end_cli_on_two_npz_files(e2e):
    assert e2e['code'] == 0
    lines = result_lines(e2e['stdout'])
    assert list(lines) == ['Inception Score', 'FID', 'sFID', 'Precision', 'Recall']
    assert lines['Inception Score'] == f'unavailable ({NO_LOGITS_REASON})'
    fid, sfid, precision, recall = (float(lines[k]) for k in ('FID', 'sFID', 'Precision', 'Recall'))
    assert fid > 1 and sfid > 1
    assert 0 <= precision <= 1 and 0 <= recall <= 1
    # The numbers follow from the cached activations exactly as ADM combines them.
    offline_id = load_stats(next(e2e['root'].glob('sample.npz.*.stats.npz'))).weights_id
    ref_stats = load_stats(cache_path(e2e['ref'], offline_id))
    sample_stats = load_stats(cache_path(e2e['sample'], offline_id))
    assert ref_stats.pool_ND.shape == (E2E_IMAGES, POOL_DIM) and ref_stats.pool_ND.dtype == np.float32
    assert fid == low_rank_frechet(sample_stats.fid, ref_stats.fid)
    assert (precision, recall) == precision_recall(torch.from_numpy(ref_stats.pool_ND),
                                                   torch.from_numpy(sample_stats.pool_ND))


def test_same_set_scores_zero_fid_and_full_precision_recall_from_the_cache(e2e, offline, monkeypatch):
    monkeypatch.setitem(FRECHET_METHODS, 'scipy', low_rank_frechet)
    results = evaluate(e2e['ref'], e2e['ref'], network=NoForward(offline.weights_id), progress=False)
    assert abs(results['fid']) < 1e-6 * POOL_DIM and abs(results['sfid']) < 1e-6 * SPATIAL_DIM
    assert results['precision'] == 1.0 and results['recall'] == 1.0
    assert results['inception_score'] is None


def test_cache_is_keyed_by_weights_and_invalidated_by_a_newer_batch(e2e, offline, tmp_path):
    ref = tmp_path / 'ref.npz'
    ref.write_bytes(e2e['ref'].read_bytes())
    cached = cache_path(e2e['ref'], offline.weights_id)
    stats = load_stats(cached)
    save_stats(stats, cache_path(ref, offline.weights_id))
    batch = open_batch(ref)
    assert np.array_equal(batch_stats(batch, NoForward(offline.weights_id)).pool_ND, stats.pool_ND)
    other_weights = 'pytorch-fid-' + '0' * 64
    assert cache_path(ref, other_weights) != cache_path(ref, offline.weights_id)
    with pytest.raises(ForwardCalled):
        batch_stats(batch, NoForward(other_weights))
    newer = cache_path(ref, offline.weights_id).stat().st_mtime_ns + 10**9
    os.utime(ref, ns=(newer, newer))
    with pytest.raises(ForwardCalled):
        batch_stats(batch, NoForward(offline.weights_id))
    with pytest.raises(ForwardCalled):
        batch_stats(open_batch(e2e['ref']), NoForward(offline.weights_id), cache=False)


def test_a_subset_carries_the_cached_activations(tmp_path):
    images = make_images(6, seed=4, noise=0.2)
    source = tmp_path / 'set.npz'
    np.savez(source, arr_0=images)
    rng = np.random.default_rng(0)
    pool, spatial = rng.random((6, POOL_DIM), dtype=np.float32), rng.random((6, SPATIAL_DIM), dtype=np.float32)
    weights = 'torchscript-' + '1' * 64
    save_stats(BatchStats(pool, gaussian_stats(pool), gaussian_stats(spatial), weights, spatial),
               cache_path(source, weights))
    rows = [1, 3, 4]
    subset = subset_batch(source, rows, tmp_path / 'subset.npz')
    assert np.array_equal(np.load(subset)['arr_0'], images[rows])
    stats = batch_stats(open_batch(subset), NoForward(weights), spatial=True)    # no network run
    assert np.array_equal(stats.pool_ND, pool[rows]) and np.array_equal(stats.spatial_NS, spatial[rows])
    np.testing.assert_allclose(stats.sfid.sigma, gaussian_stats(spatial[rows]).sigma)
    np.testing.assert_allclose(stats.fid.mu, pool[rows].mean(0), rtol=1e-6)
    # A cache without the spatial activations cannot give the subset's sFID: the subset then needs the network.
    save_stats(BatchStats(pool, gaussian_stats(pool), gaussian_stats(spatial), weights), cache_path(source, weights))
    with pytest.raises(ForwardCalled):
        batch_stats(open_batch(subset_batch(source, rows, tmp_path / 'other.npz')), NoForward(weights))
    with pytest.raises(UserError, match='rows must increase'):
        subset_batch(source, [3, 1], tmp_path / 'bad.npz')
    with pytest.raises(UserError, match='rows must increase'):
        subset_batch(source, [5, 6], tmp_path / 'bad.npz')


def test_stats_mode_on_a_png_folder(e2e, offline, tmp_path, capsys):
    folder = tmp_path / 'pngs'
    folder.mkdir()
    images = np.load(e2e['ref'])['arr_0'][:PNG_IMAGES]
    for i, image in enumerate(images):
        Image.fromarray(image).save(folder / f'{i:06d}.png')
    out = tmp_path / 'ref_stats.npz'
    assert run(evaluator_cli.main, get_parser(), [str(folder), '--save-stats', str(out), '--no-progress']) == 0
    stats = load_stats(out)
    ref_pool = load_stats(cache_path(e2e['ref'], offline.weights_id)).pool_ND
    assert stats.weights_id == offline.weights_id and stats.sfid.mu.shape == (SPATIAL_DIM,)
    np.testing.assert_allclose(stats.pool_ND, ref_pool[:PNG_IMAGES], rtol=1e-5, atol=1e-5)
    assert not list(tmp_path.glob('pngs.*.stats.npz'))      # --save-stats writes only its output
    # A stats file stands in for its batch; with other weights it is refused.
    assert open_batch(out).images is None
    assert np.array_equal(batch_stats(open_batch(out), NoForward(offline.weights_id)).pool_ND,
                          stats.pool_ND)
    with pytest.raises(UserError, match='computed with Inception weights'):
        batch_stats(open_batch(out), NoForward('pytorch-fid-' + '0' * 64))
    # So is a stats file computed in another precision: its numbers would not be comparable.
    code = run(evaluator_cli.main, get_parser(), [str(out), str(e2e['sample']), '--inception-precision', 'bf16',
                                                  '--no-progress'])
    assert code != 0 and '--inception-precision' in capsys.readouterr().err


def test_precomputed_reference_statistics_are_used_as_adm_does(e2e, offline, tmp_path, monkeypatch):
    monkeypatch.setitem(FRECHET_METHODS, 'scipy', low_rank_frechet)
    full = load_stats(cache_path(e2e['ref'], offline.weights_id))
    ref = tmp_path / 'ref_with_stats.npz'
    np.savez(ref, arr_0=np.load(e2e['ref'])['arr_0'][:PNG_IMAGES], mu=full.fid.mu + 1.0, sigma=full.fid.sigma,
             mu_s=full.sfid.mu, sigma_s=full.sfid.sigma)
    results = evaluate(e2e['ref'], ref, network=offline, progress=False)
    # The stored statistics (mu shifted by 1 in each of 2048 dimensions) replace those of the 4 images: FID = 2048,
    # sFID = 0, while precision/recall still come from the images' activations.
    assert results['fid'] == pytest.approx(POOL_DIM, rel=1e-6)
    assert abs(results['sfid']) < 1e-6 * SPATIAL_DIM
    assert results['precision'] == 1.0   # the 4 images are reference images
    cached = load_stats(cache_path(ref, offline.weights_id))
    assert len(cached.pool_ND) == PNG_IMAGES and np.array_equal(cached.fid.mu, full.fid.mu + 1.0)


def test_inception_score_with_logits(random_network, tmp_path, monkeypatch):
    monkeypatch.setitem(FRECHET_METHODS, 'scipy', low_rank_frechet)
    np.savez(tmp_path / 'ref.npz', arr_0=make_images(IS_IMAGES, seed=2, noise=0.0))
    np.savez(tmp_path / 'sample.npz', arr_0=make_images(IS_IMAGES, seed=3, noise=0.3))
    network = random_network
    results = evaluate(tmp_path / 'ref.npz', tmp_path / 'sample.npz', network=network, progress=False)
    assert results['inception_score_unavailable'] is None
    sample = load_stats(cache_path(tmp_path / 'sample.npz', network.weights_id))
    probs = class_probabilities(torch.from_numpy(sample.pool_ND), network.logits_weight_KD)
    expected = inception_score(probs, rng=np.random.default_rng(0))
    assert results['inception_score'] == expected and 1 <= expected <= NUM_CLASSES
    assert cache_path(tmp_path / 'sample.npz', network.weights_id).name.startswith('sample.npz.pytorch-fid-')


def test_eigh_method_matches_scipy_on_a_full_rank_and_a_singular_pair():
    rng = np.random.default_rng(3)
    for n in (300, 20):  # 300 points in 40-d: full rank; 20 points: singular covariances
        a = gaussian_stats(rng.standard_normal((n, 40)))
        b = gaussian_stats(rng.standard_normal((n, 40)) * 1.5 + 0.3)
        assert frechet_distance_eigh(a, b) == pytest.approx(frechet_distance(a, b), rel=1e-6)


def test_bootstrap_adds_standard_errors_and_keeps_the_numbers(e2e, offline, tmp_path, monkeypatch):
    monkeypatch.setitem(FRECHET_METHODS, 'scipy', low_rank_frechet)
    sample = tmp_path / 'sample.npz'
    sample.write_bytes(e2e['sample'].read_bytes())
    plain = evaluate(e2e['ref'], sample, network=offline, progress=False)
    boot = evaluate(e2e['ref'], sample, network=offline, progress=False, resamples=20)
    assert {k: boot[k] for k in plain} == plain
    assert boot['fid_se'] > 0 and boot['sfid_se'] > 0
    for k in ('precision', 'recall'):     # a proportion of 0 or 1 has no spread under resampling
        assert (boot[k + '_se'] > 0) == (0 < boot[k] < 1)
    assert load_stats(cache_path(sample, offline.weights_id)).spatial_NS.shape == (E2E_IMAGES, SPATIAL_DIM)
    lines = format_results(boot)
    assert lines[1] == f'FID: {boot["fid"]} (bootstrap standard error {boot["fid_se"]:.4g})'
    stats_file = tmp_path / 'stats.npz'
    save_stats(load_stats(cache_path(sample, offline.weights_id)), stats_file)
    with pytest.raises(UserError, match='--bootstrap resamples the sample images'):
        evaluate(e2e['ref'], stats_file, network=offline, progress=False, resamples=5)
