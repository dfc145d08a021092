"""3D convolutional capsule layers with dynamic routing by agreement.

A capsule map is a tensor (B, N, A, D, H, W): N capsules of A atoms (the
capsule's pose vector) at every voxel; the length of a capsule vector, in
[0, 1), is the probability that its entity is present (Sabour et al. 2017).

A convolutional capsule layer (LaLonde & Bagci 2018; 3D-UCaps, Nguyen et al.
2021) lets every input capsule type i vote for every output capsule type o
through a 3D convolution of its atoms, ``u[i, o] = W[o] * x[i]`` (the same
kernel for all input types: ``share_weights=True``, as in SegCaps; or one
kernel per input type: a grouped convolution). Routing then mixes the votes
voxel by voxel: coupling coefficients ``c[i, o]`` (a softmax over the output
capsules o) weight the votes, ``s[o] = sum_i c[i, o] u[i, o] + b[o]``,
``v[o] = squash(s[o])``, and the logits of ``c`` grow by the agreement
``<u[i, o], v[o]>`` for the next iteration.

All votes come from one ``conv3d`` call; routing is elementwise products and
reductions over small axes of that tensor. The routing iterations are the
only Python loop.
"""

from __future__ import annotations

import math

import torch
from torch import nn

__all__ = [
    "ConvCapsule3d",
    "ConvTransposeCapsule3d",
    "capsule_lengths",
    "dynamic_routing",
    "squash",
]


def squash(s: torch.Tensor, dim: int = 2, eps: float = 1e-7) -> torch.Tensor:
    """Squash non-linearity: ``v = |s|² / (1 + |s|²) · s / |s|`` along ``dim``.

    Keeps the direction of ``s`` and maps its length into [0, 1): short
    vectors shrink towards 0, long ones approach length 1.
    """
    squared_norm = (s * s).sum(dim=dim, keepdim=True)
    scale = squared_norm / (1 + squared_norm) * torch.rsqrt(squared_norm + eps)
    return s * scale


def capsule_lengths(capsules: torch.Tensor) -> torch.Tensor:
    """(B, N, A, *S) capsules -> (B, N, *S) vector lengths."""
    return torch.linalg.vector_norm(capsules.float(), dim=2)


def dynamic_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int = 3,
    return_coupling: bool = False,
):
    """Routing by agreement over the votes of a convolutional capsule layer.

    Parameters
    ----------
    votes : (B, I, O, A, *S) votes of I input capsule types for O output capsule
        types of A atoms at every position of the spatial grid S
    bias : (O, A) added to the weighted sum of votes, or None
    iterations : number of routing iterations (>= 1; 1 = plain average of the votes)
    return_coupling : also return the final coupling coefficients (B, I, O, 1, *S),
        which sum to 1 over O

    Returns
    -------
    (B, O, A, *S) output capsules (squashed), and the coupling coefficients if asked.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least one iteration, got {iterations}")
    n_out = votes.shape[2]
    spatial = votes.dim() - 4
    bias_view = None if bias is None else bias.view(*bias.shape, *([1] * spatial)).to(votes.dtype)
    # Iteration 1 has uniform coupling 1/O: a sum, no multiplication by c needed.
    coupling = None
    logits = None
    s = votes.sum(dim=1) * (1.0 / n_out)
    for iteration in range(iterations):
        if iteration > 0:
            coupling = torch.softmax(logits, dim=2).to(votes.dtype)
            s = (coupling * votes).sum(dim=1)
        if bias_view is not None:
            s = s + bias_view
        v = squash(s, dim=2)
        if iteration + 1 < iterations:
            agreement = (votes * v.unsqueeze(1)).sum(dim=3, keepdim=True).float()
            logits = agreement if logits is None else logits + agreement
    if return_coupling:
        if coupling is None:
            coupling = torch.full_like(votes[:, :, :, :1], 1.0 / n_out)
        return v, coupling
    return v


class _CapsuleLayer(nn.Module):
    """Shared parts of the convolutional and transposed capsule layers."""

    transposed = False

    def __init__(
        self,
        in_capsules: int,
        in_atoms: int,
        out_capsules: int,
        out_atoms: int,
        kernel_size: int = 3,
        stride: int = 1,
        padding: int | None = None,
        routing_iterations: int = 3,
        share_weights: bool = True,
    ):
        super().__init__()
        self.in_capsules = int(in_capsules)
        self.in_atoms = int(in_atoms)
        self.out_capsules = int(out_capsules)
        self.out_atoms = int(out_atoms)
        self.routing_iterations = int(routing_iterations)
        self.share_weights = bool(share_weights)
        if padding is None:
            padding = (kernel_size - 1) // 2 if not self.transposed else 0
        groups = 1 if share_weights else in_capsules
        in_channels = in_atoms if share_weights else in_capsules * in_atoms
        out_channels = out_capsules * out_atoms * (1 if share_weights else in_capsules)
        conv = nn.ConvTranspose3d if self.transposed else nn.Conv3d
        self.conv = conv(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False
        )
        # Scale the kernels so that at the first routing pass (coupling 1/O,
        # independent votes) the summed vote s is about as long as an input
        # capsule: |s|^2 ~ I/O^2 * A_out * k^3 * std^2 * |x|^2.
        std = out_capsules / math.sqrt(in_capsules * out_atoms * kernel_size**3)
        nn.init.normal_(self.conv.weight, std=std)
        # A small positive bias, as in SegCaps / 3D-UCaps.
        self.bias = nn.Parameter(torch.full((out_capsules, out_atoms), 0.1))

    def votes(self, capsules: torch.Tensor) -> torch.Tensor:
        """(B, I, A_in, D, H, W) -> (B, I, O, A_out, D', H', W') from one convolution."""
        if capsules.dim() != 6 or capsules.shape[1:3] != (self.in_capsules, self.in_atoms):
            raise ValueError(
                f"expected capsules (B, {self.in_capsules}, {self.in_atoms}, D, H, W), got {tuple(capsules.shape)}"
            )
        batch, spatial = capsules.shape[0], capsules.shape[3:]
        if self.share_weights:
            flat = capsules.reshape(batch * self.in_capsules, self.in_atoms, *spatial)
        else:
            flat = capsules.reshape(batch, self.in_capsules * self.in_atoms, *spatial)
        out = self.conv(flat)
        return out.reshape(batch, self.in_capsules, self.out_capsules, self.out_atoms, *out.shape[2:])

    def forward(self, capsules: torch.Tensor, return_coupling: bool = False):
        """(B, I, A_in, D, H, W) -> (B, O, A_out, D', H', W') squashed capsules."""
        return dynamic_routing(
            self.votes(capsules), self.bias, self.routing_iterations, return_coupling=return_coupling
        )

    def extra_repr(self) -> str:
        return (
            f"{self.in_capsules}x{self.in_atoms} -> {self.out_capsules}x{self.out_atoms}, "
            f"kernel={self.conv.kernel_size[0]}, stride={self.conv.stride[0]}, "
            f"routing={self.routing_iterations}, share_weights={self.share_weights}"
        )


class ConvCapsule3d(_CapsuleLayer):
    """3D convolutional capsule layer with dynamic routing.

    (B, I, A_in, D, H, W) -> (B, O, A_out, D/stride, H/stride, W/stride) with the
    default "same" padding ``(kernel_size - 1) // 2``.

    Parameters
    ----------
    in_capsules, in_atoms : input capsule types I and their atoms A_in
    out_capsules, out_atoms : output capsule types O and their atoms A_out
    kernel_size, stride, padding : of the vote convolution
    routing_iterations : dynamic-routing iterations (1 = average of the votes)
    share_weights : one transform for all input capsule types (True) or one
        per input type (a grouped convolution, I times the parameters)
    """


class ConvTransposeCapsule3d(_CapsuleLayer):
    """Transposed (up-sampling) 3D capsule layer, as in SegCaps' decoder.

    (B, I, A_in, D, H, W) -> (B, O, A_out, D·stride, H·stride, W·stride) with
    ``kernel_size == stride`` and the default padding 0. 3D-UCaps decodes with
    ordinary convolutions; this layer is here for capsule decoders.
    """

    transposed = True

    def __init__(self, *args, kernel_size: int = 2, stride: int = 2, **kwargs):
        super().__init__(*args, kernel_size=kernel_size, stride=stride, **kwargs)
