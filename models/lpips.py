"""LPIPS perceptual distance (Zhang et al., 2018) on VGG16 features, for tokenizer training.

No weights ship with this code: the features take torchvision's ImageNet VGG16 weights (`vgg16-397923af.pth`) and,
optionally, the linear heads take LPIPS v0.1's (`vgg.pth` of the `lpips` package); without heads every channel weighs
the same (a plain normalised-feature distance). `vgg_features_state` / `lpips_heads_state` map those files' keys.
"""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F

# VGG16 convolution widths, 'M' = 2x2 max-pool; the indices of `features` match torchvision's vgg16().features.
VGG16_LAYOUT = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512)
TAPS = (3, 8, 15, 22, 29)               # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
TAP_CHANNELS = (64, 128, 256, 512, 512)
# LPIPS input scaling of images in [-1, 1].
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


class LPIPS(nn.Module):
    """Frozen perceptual distance between two image batches in [-1, 1]: one value per image."""

    def __init__(self):
        super().__init__()
        layers, c = [], 3
        for v in VGG16_LAYOUT:
            if v == 'M':
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(c, v, kernel_size=3, padding=1), nn.ReLU(inplace=False)]
                c = v
        self.features = nn.Sequential(*layers)
        self.lins = nn.ModuleList([nn.Conv2d(ch, 1, kernel_size=1, bias=False) for ch in TAP_CHANNELS])
        for lin in self.lins:
            nn.init.ones_(lin.weight)
        self.register_buffer('shift', torch.tensor(SHIFT).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('scale', torch.tensor(SCALE).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False).eval()

    def forward(self, x_B3HW: torch.Tensor, y_B3HW: torch.Tensor) -> torch.Tensor:
        h = (torch.cat((x_B3HW, y_B3HW)) - self.shift) / self.scale
        dist_B = x_B3HW.new_zeros(x_B3HW.shape[0], dtype=torch.float32)
        tap = 0
        for i, layer in enumerate(self.features[:TAPS[-1] + 1]):
            h = layer(h)
            if i == TAPS[tap]:
                fx, fy = h.float().chunk(2)
                fx = fx / (fx.square().sum(1, keepdim=True).sqrt() + NORM_EPS)
                fy = fy / (fy.square().sum(1, keepdim=True).sqrt() + NORM_EPS)
                dist_B = dist_B + F.conv2d((fx - fy).square(), self.lins[tap].weight.float()).mean(dim=(1, 2, 3))
                tap += 1
        return dist_B


def vgg_features_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`LPIPS.features` weights from a torchvision VGG16 state dict (its `features.*` up to relu5_3)."""
    return {k[len('features.'):]: v for k, v in sd.items()
            if k.startswith('features.') and int(k.split('.')[1]) <= TAPS[-1]}


def lpips_heads_state(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """`LPIPS.lins` weights from the LPIPS v0.1 file (keys `lin{i}.model.1.weight`)."""
    return {k[len('lin'):].replace('.model.1.', '.'): v for k, v in sd.items() if k.startswith('lin')}
