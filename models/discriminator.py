"""A small PatchGAN discriminator and hinge losses for adversarial tokenizer training."""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

LEAKY_SLOPE = 0.2
MAX_WIDTH_MULT = 8
GN_GROUPS = 32
INIT_STD = 0.02


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: per-sample statistics, so real and fake images can share one batch under DDP.
    return nn.GroupNorm(math.gcd(GN_GROUPS, channels), channels)


class PatchDiscriminator(nn.Module):
    """Strided 4x4 convs halve the image `num_down` times, then two 3x3 convs give one real/fake logit per patch."""

    def __init__(self, in_channels: int = 3, width: int = 64, num_down: int = 3):
        super().__init__()
        layers = [nn.Conv2d(in_channels, width, kernel_size=4, stride=2, padding=1), nn.LeakyReLU(LEAKY_SLOPE)]
        c = width
        for i in range(1, num_down):
            out = width * min(2 ** i, MAX_WIDTH_MULT)
            layers += [nn.Conv2d(c, out, kernel_size=4, stride=2, padding=1), _norm(out), nn.LeakyReLU(LEAKY_SLOPE)]
            c = out
        layers += [nn.Conv2d(c, c, kernel_size=3, padding=1), _norm(c), nn.LeakyReLU(LEAKY_SLOPE),
                   nn.Conv2d(c, 1, kernel_size=3, padding=1)]
        self.net = nn.Sequential(*layers)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.normal_(m.weight, 0.0, INIT_STD)
                nn.init.zeros_(m.bias)

    def forward(self, img_B3HW: torch.Tensor) -> torch.Tensor:
        return self.net(img_B3HW)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1 - logits_real.float()).mean() + F.relu(1 + logits_fake.float()).mean())


def hinge_g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    return -logits_fake.float().mean()
