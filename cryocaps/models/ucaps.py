"""3D-UCaps (Nguyen et al. 2021) as adapted to cryo-ET by Hajarolasvadi et al. 2022.

Encoder
    feature extractor: three 5×5×5 convolutions (16, 32, 64 channels; regular,
    not dilated — the cryo-ET paper's change), batch norm, ReLU (tanh on the
    last, so the 64 atoms of the capsule it becomes are bounded); the 64-channel
    map is read as one 64-atom capsule per voxel; primary capsules: 16 capsules
    × 4 atoms (3×3×3, one routing pass = squash of the summed votes); six
    convolutional capsule layers (3×3×3, 3 routing iterations) with
    [16, 16, 8, 8, 8, K] capsules of [8, 8, 16, 16, 32, 64] atoms, stride 2 on
    layers 1, 3 and 5 — the class capsules sit on a grid 8× coarser than the input.
Decoder (a CNN, as in 3D-UCaps)
    2×2×2 transposed convolutions up-sample; after each one the capsules of the
    encoder at that resolution are concatenated as a skip connection (capsule
    layer 4 at 1/4, layer 2 at 1/2, the primary capsules at full resolution,
    each flattened to capsules × atoms channels), then a 3×3×3 convolution +
    batch norm + ReLU; a 1×1×1 convolution reads the K segmentation logits off
    the last feature map.
Auxiliary outputs (training only)
    the lengths of the K class capsules (margin loss, against the fraction of
    each class in every 8³ block) and a reconstruction of the input patch from
    the last feature map (three 1×1×1 convolutions), trained with a
    class-weighted cross-entropy.

``variant="2layer"`` is the paper's two-capsule-layer encoder (its Fig. 10):
primary capsules, then 16×8 (stride 2) and K×32 (stride 2) capsule layers, and
a decoder with two up-sampling steps; its inputs need sides that are multiples
of 4.
"""

from __future__ import annotations

import torch
from torch import nn

from cryocaps.errors import CryocapsError
from cryocaps.models.capsules import ConvCapsule3d, capsule_lengths
from cryocaps.models.losses import (
    MARGIN_LOSS_WEIGHT,
    RECONSTRUCTION_LOSS_WEIGHT,
    ucaps_loss,
)
from cryocaps.models.unet import pointwise_conv

VARIANTS = ("6layer", "2layer")

# (capsules, atoms, stride) of the encoder capsule layers; "K" = n_classes.
_ENCODERS = {
    "6layer": [(16, 8, 2), (16, 8, 1), (8, 16, 2), (8, 16, 1), (8, 32, 2), ("K", 64, 1)],
    "2layer": [(16, 8, 2), ("K", 32, 2)],
}
# Which encoder capsule layers (0-based) feed the decoder skips, deepest first;
# the primary capsules always feed the full-resolution skip.
_SKIPS = {"6layer": [3, 1], "2layer": [0]}
# Decoder: channels after each up-sampling and after each 3×3×3 convolution, deepest first.
_DECODER = {
    "6layer": [(256, 128), (128, 64), (64, None)],
    "2layer": [(128, 64), (64, None)],
}

PRIMARY_CAPSULES = 16
PRIMARY_ATOMS = 4


def _conv_bn_act(
    in_channels: int, out_channels: int, kernel_size: int, activation: nn.Module
) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv3d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm3d(out_channels),
        activation,
    )


def _concat_channels_last(*maps: torch.Tensor) -> torch.Tensor:
    """Concatenate (B, C_k, D, H, W) maps along channels into a channels-last map.

    ``torch.cat`` of channels-last maps may return a channels-first result
    through a slow strided copy; concatenating the (B, D, H, W, C) views along
    their last axis writes the channels-last result directly.
    """
    dtype = maps[0].dtype
    voxel_major = [m.to(dtype).permute(0, 2, 3, 4, 1) for m in maps]
    return torch.cat(voxel_major, dim=-1).permute(0, 4, 1, 2, 3)


class UCaps3D(nn.Module):
    """3D-UCaps capsule U-Net for volumetric segmentation.

    Parameters
    ----------
    n_classes : outputs including background (K)
    variant : "6layer" (the paper's network, ~3 M parameters) or "2layer"
    routing_iterations : dynamic-routing iterations of the encoder capsule layers
    share_weights : one vote transform per output capsule type shared by all
        input types (True, ~3 M parameters) or one per input type (False)
    full_routing_gradient : back-propagate through every routing iteration
        (False: through the final weighted sum only, coupling held fixed —
        same outputs, a training step several times cheaper)
    margin_loss_weight, reconstruction_loss_weight : weights of the auxiliary
        losses next to Dice + cross-entropy (weight 1)
    """

    name = "ucaps"
    size_multiple = 8

    def __init__(
        self,
        n_classes: int,
        variant: str = "6layer",
        routing_iterations: int = 3,
        share_weights: bool = True,
        full_routing_gradient: bool = False,
        margin_loss_weight: float = MARGIN_LOSS_WEIGHT,
        reconstruction_loss_weight: float = RECONSTRUCTION_LOSS_WEIGHT,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise CryocapsError(
                f"unknown 3D-UCaps variant {variant!r}; choose one of {', '.join(VARIANTS)}"
            )
        if int(routing_iterations) < 1:
            raise CryocapsError(f"routing_iterations must be at least 1, got {routing_iterations}")
        n_classes = int(n_classes)
        self.n_classes = n_classes
        self.variant = variant
        self.config = {
            "n_classes": n_classes,
            "variant": variant,
            "routing_iterations": int(routing_iterations),
            "share_weights": bool(share_weights),
            "full_routing_gradient": bool(full_routing_gradient),
            "margin_loss_weight": float(margin_loss_weight),
            "reconstruction_loss_weight": float(reconstruction_loss_weight),
        }
        layers = [
            (n_classes if caps == "K" else caps, atoms, stride)
            for caps, atoms, stride in _ENCODERS[variant]
        ]
        self.size_multiple = 1
        for _, _, stride in layers:
            self.size_multiple *= stride
        self.skips = _SKIPS[variant]

        self.features = nn.Sequential(
            _conv_bn_act(1, 16, 5, nn.ReLU(inplace=True)),
            _conv_bn_act(16, 32, 5, nn.ReLU(inplace=True)),
            _conv_bn_act(32, 64, 5, nn.Tanh()),
        )
        self.primary_capsules = ConvCapsule3d(
            1, 64, PRIMARY_CAPSULES, PRIMARY_ATOMS, routing_iterations=1
        )
        self.encoder = nn.ModuleList()
        in_caps, in_atoms = PRIMARY_CAPSULES, PRIMARY_ATOMS
        for caps, atoms, stride in layers:
            self.encoder.append(
                ConvCapsule3d(
                    in_caps,
                    in_atoms,
                    caps,
                    atoms,
                    kernel_size=3,
                    stride=stride,
                    routing_iterations=routing_iterations,
                    share_weights=share_weights,
                    full_gradient=full_routing_gradient,
                )
            )
            in_caps, in_atoms = caps, atoms

        skip_channels = [layers[i][0] * layers[i][1] for i in self.skips] + [
            PRIMARY_CAPSULES * PRIMARY_ATOMS
        ]
        self.up = nn.ModuleList()
        self.decode = nn.ModuleList()
        channels = n_classes * layers[-1][1]
        for (up_channels, conv_channels), skip in zip(
            _DECODER[variant], skip_channels, strict=True
        ):
            self.up.append(nn.ConvTranspose3d(channels, up_channels, 2, stride=2))
            channels = up_channels + skip
            if conv_channels is not None:
                self.decode.append(_conv_bn_act(channels, conv_channels, 3, nn.ReLU(inplace=True)))
                channels = conv_channels
        self.head = nn.Conv3d(channels, n_classes, 1)
        self.reconstruct = nn.Sequential(
            nn.Conv3d(channels, 64, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(64, 128, 1),
            nn.ReLU(inplace=True),
            nn.Conv3d(128, 1, 1),
        )
        self.to(memory_format=torch.channels_last_3d)

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 5 or x.shape[1] != 1:
            raise CryocapsError(f"3D-UCaps expects input (B, 1, D, H, W), got {tuple(x.shape)}")
        bad = [int(side) for side in x.shape[2:] if side % self.size_multiple]
        if bad:
            raise CryocapsError(
                f"3D-UCaps input sides must be multiples of {self.size_multiple}, "
                f"got {tuple(x.shape[2:])}"
            )

    def forward(self, x: torch.Tensor, auxiliary: bool = False):
        """(B, 1, D, H, W) -> (B, K, D, H, W) segmentation logits.

        With ``auxiliary=True`` returns ``(logits, lengths, reconstruction)``:
        class-capsule lengths (B, K, D/s, H/s, W/s) for s = ``size_multiple`` and
        the pre-sigmoid input reconstruction (B, 1, D, H, W).
        """
        self._check_input(x)
        # Channels-last activations: oneDNN's fast (AMX/AVX-512) convolution path,
        # and the capsule layers' vote layout (see capsules.py).
        x = x.contiguous(memory_format=torch.channels_last_3d)
        primary = self.primary_capsules(self.features(x).unsqueeze(1))
        capsules = primary
        encoded = []
        for layer in self.encoder:
            capsules = layer(capsules)
            encoded.append(capsules)
        skips = [encoded[i] for i in self.skips] + [primary]

        features = capsules.flatten(1, 2)
        decode = iter(self.decode)
        for up, skip in zip(self.up, skips, strict=True):
            features = _concat_channels_last(up(features), skip.flatten(1, 2))
            conv = next(decode, None)
            if conv is not None:
                features = conv(features)
        logits = pointwise_conv(self.head, features)
        if not auxiliary:
            return logits
        lengths = capsule_lengths(capsules)
        hidden = torch.relu(pointwise_conv(self.reconstruct[0], features))
        hidden = torch.relu(pointwise_conv(self.reconstruct[2], hidden))
        reconstruction = pointwise_conv(self.reconstruct[4], hidden)
        return logits, lengths, reconstruction

    def compute_loss(self, images, labels, class_weights=None):
        """Dice + cross-entropy + weighted margin and reconstruction losses; returns
        (loss, parts).
        """
        logits, lengths, reconstruction = self(images, auxiliary=True)
        return ucaps_loss(
            logits,
            lengths,
            reconstruction,
            images,
            labels,
            class_weights,
            margin_weight=self.config["margin_loss_weight"],
            reconstruction_weight=self.config["reconstruction_loss_weight"],
        )


class UCaps3DFast(UCaps3D):
    """``ucaps-fast``: 3D-UCaps with one routing iteration in every capsule layer.

    The paper's network and losses with each capsule the squashed mean of its
    votes (coupling 1/O, no agreement step), which a layer computes from one
    convolution of the summed input capsules without forming the votes: about
    3x faster forward and 2x faster training than ``ucaps`` on CPU
    (benchmarks/RESULTS.md). A named variant beside the paper's model, not a
    substitute; its accuracy is measured next to ``ucaps`` in
    benchmarks/vs_deepfinder.py.
    """

    name = "ucaps-fast"

    def __init__(self, n_classes: int, routing_iterations: int = 1, **options):
        super().__init__(n_classes, routing_iterations=routing_iterations, **options)
