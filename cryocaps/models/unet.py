"""The DeepFinder 3D U-Net baseline (Moebel et al. 2021), as used in the paper.

Two 2× down-sampling levels with widths 32/48/64, two 3×3×3 convolutions per
level (four at the bottom), transposed-convolution up-sampling, skip
connections by concatenation, ReLU, a 1×1×1 output convolution to K classes
(softmax is applied by the loss / at inference). About 0.9 M parameters.
"""

from __future__ import annotations

import numbers

import torch
from torch import nn

from cryocaps.errors import CryocapsError
from cryocaps.models.losses import dice_ce_loss


def _conv_block(in_channels: int, out_channels: int, n: int, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(n):
        layers.append(
            nn.Conv3d(in_channels if i == 0 else out_channels, out_channels, 3, padding=1)
        )
        if batch_norm:
            layers.append(nn.BatchNorm3d(out_channels))
        layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


def pointwise_conv(conv: nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """``conv(x)`` for a 1×1×1 convolution, as a matrix product over the voxels.

    Same parameters and result; on CPU, oneDNN's backward of a 1×1×1
    convolution with few output channels is an order of magnitude slower than
    the matrix product. The output has ``x``'s channels-last memory layout.
    """
    out = nn.functional.linear(
        x.permute(0, 2, 3, 4, 1), conv.weight.flatten(1).to(x.dtype), conv.bias
    )
    return out.permute(0, 4, 1, 2, 3)


def _three_widths(widths) -> tuple[int, int, int]:
    """``widths`` as three positive channel counts (CryocapsError otherwise)."""
    values = list(widths) if isinstance(widths, (list, tuple)) else [widths]
    if len(values) != 3 or not all(
        isinstance(w, numbers.Integral) and not isinstance(w, bool) and w > 0 for w in values
    ):
        raise CryocapsError(
            f"widths {widths!r}: give three positive channel counts, shallow to deep, e.g. 32,48,64"
        )
    return values[0], values[1], values[2]


class UNet3D(nn.Module):
    """DeepFinder-style 3D U-Net.

    Parameters
    ----------
    n_classes : outputs including background
    widths : channels per level, shallow to deep (paper: 32, 48, 64)
    batch_norm : add BatchNorm after each convolution (DeepFinder has none)
    """

    name = "unet"
    size_multiple = 4

    def __init__(self, n_classes: int, widths=(32, 48, 64), batch_norm: bool = False):
        super().__init__()
        w1, w2, w3 = _three_widths(widths)
        self.config = {
            "n_classes": int(n_classes),
            "widths": [w1, w2, w3],
            "batch_norm": bool(batch_norm),
        }
        self.enc1 = _conv_block(1, w1, 2, batch_norm)
        self.enc2 = _conv_block(w1, w2, 2, batch_norm)
        self.bottom = _conv_block(w2, w3, 4, batch_norm)
        self.pool = nn.MaxPool3d(2)
        self.up2 = nn.ConvTranspose3d(w3, w3, 2, stride=2)
        self.dec2 = _conv_block(w3 + w2, w2, 2, batch_norm)
        self.up1 = nn.ConvTranspose3d(w2, w2, 2, stride=2)
        self.dec1 = _conv_block(w2 + w1, w1, 2, batch_norm)
        self.head = nn.Conv3d(w1, n_classes, 1)
        # Channels-last weights and activations: oneDNN's fast convolution path
        # (measured 2x faster forward under bf16 autocast on AVX-512/AMX CPUs).
        self.to(memory_format=torch.channels_last_3d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1, D, H, W) -> (B, K, D, H, W) logits; D, H, W multiples of 4."""
        x = x.contiguous(memory_format=torch.channels_last_3d)
        e1 = self.enc1(x)
        e2 = self.enc2(self.pool(e1))
        b = self.bottom(self.pool(e2))
        d2 = self.dec2(torch.cat([self.up2(b), e2], dim=1))
        d1 = self.dec1(torch.cat([self.up1(d2), e1], dim=1))
        return pointwise_conv(self.head, d1)

    def compute_loss(self, images, labels, class_weights=None):
        """Dice + cross-entropy on the segmentation; returns (loss, parts)."""
        logits = self(images)
        return dice_ce_loss(logits, labels, class_weights)
