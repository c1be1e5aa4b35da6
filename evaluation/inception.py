"""Inception-v3 (TF release 2015-12-05) as OpenAI's ADM evaluator runs it, in PyTorch.

ADM feeds float32 NHWC images in [0, 255] of any size into the TF graph, which resizes them to 299x299 with TF1's
legacy bilinear kernel, scales them by (x - 128) / 128 and runs Inception. It reads three things:
    pool_3         (N, 2048)      FID and precision/recall
    mixed_6/conv   (N, 17, 17, 192), first 7 channels flattened in NHWC order -> (N, 2023)   sFID
    softmax/logits pool_3 @ W with W (2048, 1008) and no bias                              Inception Score

This file is the network: `FIDInceptionV3`, the architecture with pytorch-fid / torch-fidelity key names, and its
fused inference copy. evaluation/inception_weights.py loads its weights and wraps it as `InceptionFeatures`.

Shape suffixes: N images, H/W height/width, C channels, D pool width (2048), S sFID width (2023), K classes (1008).
"""
import copy
from typing import Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.fusion import fuse_conv_bn_eval

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
        # In place: nothing else reads the batch norm's output, and it saves a pass over the activations (ReLU was a
        # sixth of the CPU time).
        return F.relu(self.bn(self.conv(x)), inplace=True)

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
        return F.relu(self.conv(x), inplace=True).split(self.splits, 1)


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
