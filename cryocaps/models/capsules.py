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

All votes come from one ``conv3d`` call (channels-last, so oneDNN's fast
path runs it). Three routing implementations give the same values:

- native (the default on CPUs, ``native_routing=True``): the fused layout
  below, routed by the C kernel of ``native`` voxel by voxel in cache; where the
  kernel is not built, the plain routing.
- fused (``routing.fused_routing``, opt-in with ``fused_routing=True``, for layers
  that route, i.e. more than one iteration; slower than plain on an idle 2-core
  CPU, see benchmarks/RESULTS.md): the votes stay where the convolution wrote them,
  with the kernels' output channels reordered to (atom, capsule) so that the
  capsule index is innermost; routing runs block by block of voxels in
  float32, in cache, and its backward pass saves only the final coupling and
  pre-squash sums. The vote convolution's weight gradient is one GEMM
  (``routing.vote_convolution``).
- plain (``route_voxel_major``; the default on GPUs and where there is no C
  compiler, and always for one iteration, ``full_gradient`` and transposed
  layers): one copy puts the votes voxel-major, (B, D, H, W, O, I, A), where
  every (voxel, output capsule) owns a small I x A matrix, and each iteration
  is two batched mat-vec products (``bmm``) over the whole vote tensor.

In PyTorch routing is bound by memory traffic and dispatch, not arithmetic;
``benchmarks/models.py`` measures the three side by side.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from cryocaps.models import native, routing
from cryocaps.models.routing import fused_routing, squash, vote_convolution

__all__ = [
    "ConvCapsule3d",
    "ConvTransposeCapsule3d",
    "capsule_lengths",
    "dynamic_routing",
    "route_voxel_major",
    "squash",
]


def capsule_lengths(capsules: torch.Tensor) -> torch.Tensor:
    """(B, N, A, *S) capsules -> (B, N, *S) vector lengths."""
    return torch.linalg.vector_norm(capsules.float(), dim=2)


def uniform_coupling(shape, n_out: int, like: torch.Tensor) -> torch.Tensor:
    """Routing's start: each input capsule split equally among ``n_out`` outputs.

    In ``like``'s dtype promoted to at least float32 (couplings are kept wide) and on its device.
    """
    wide = torch.promote_types(like.dtype, torch.float32)
    return torch.full(shape, 1.0 / n_out, dtype=wide, device=like.device)


def dynamic_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int = 3,
    return_coupling: bool = False,
    full_gradient: bool = False,
):
    """Routing by agreement over the votes of a convolutional capsule layer.

    Parameters
    ----------
    votes : (B, I, O, A, *S) votes of I input capsule types for O output capsule
        types of A atoms at every position of the spatial grid S (any strides)
    bias : (O, A) added to the weighted sum of votes, or None
    iterations : number of routing iterations (>= 1; 1 = plain average of the votes)
    return_coupling : also return the final coupling coefficients (B, I, O, *S),
        which sum to 1 over O
    full_gradient : back-propagate through the routing iterations too (see
        ``route_voxel_major``)

    Returns
    -------
    (B, O, A, *S) output capsules (squashed), and the coupling coefficients if asked.
    """
    # Voxel-major layout (B, *S, O, I, A): every (voxel, output capsule) owns a
    # small I x A matrix of votes, and routing is two batched mat-vec products.
    order = (0, *range(4, votes.dim()), 2, 1, 3)
    voxel_major = votes.permute(order).contiguous()
    capsules, coupling = route_voxel_major(voxel_major, bias, iterations, full_gradient)
    capsules = capsules.movedim(-2, 1).movedim(-1, 2)  # (B, *S, O, A) -> (B, O, A, *S)
    if not return_coupling:
        return capsules
    return capsules, coupling.movedim(-1, 1).movedim(-1, 2)  # (B, *S, O, I) -> (B, I, O, *S)


def route_voxel_major(
    votes: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int = 3,
    full_gradient: bool = False,
    vote_sum: torch.Tensor | None = None,
):
    """Dynamic routing on votes laid out (B, *S, O, I, A), contiguous.

    Returns the output capsules (B, *S, O, A) and the final coupling
    coefficients (B, *S, O, I) (softmax over O). All work is batched matrix
    products over the B·S·O small (I x A) vote matrices and elementwise
    operations on tensors I or A times smaller than the votes.

    With ``full_gradient=False`` the routing iterations that only refine the
    coupling coefficients run without autograd: gradients reach the votes
    through the final weighted sum, with the coupling held fixed (the
    stop-gradient routing of common CapsNet implementations). Training is then
    about as fast as a forward pass plus one vote-sized product; the forward
    values are the same either way.

    ``vote_sum`` (B, *S, O, A), if given, is the sum of the votes over the input
    capsules, used by the first iteration (uniform coupling) instead of a pass
    over the votes; a shared-weight layer gets it cheaply as one convolution of
    the summed input capsules.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least one iteration, got {iterations}")
    *grid, n_out, n_in, n_atoms = votes.shape
    matrices = votes.view(-1, n_in, n_atoms)  # (N, I, A) with N = B·S·O
    bias = None if bias is None else bias.to(votes.dtype)
    # Routing logits and coupling in at least float32, also under bf16 autocast.
    logit_dtype = torch.promote_types(votes.dtype, torch.float32)

    def capsules_from(coupling: torch.Tensor | None) -> torch.Tensor:
        """Squashed weighted sum of the votes, (B·S, O, A); uniform coupling 1/O if None."""
        if coupling is None:  # uniform coupling: a plain sum, no product needed
            if vote_sum is not None:
                s = vote_sum.reshape(-1, n_atoms) * (1.0 / n_out)
            elif n_in == 1:
                s = matrices.view(-1, n_atoms) * (1.0 / n_out)
            else:
                s = matrices.sum(dim=1) * (1.0 / n_out)
        else:
            s = torch.bmm(coupling.to(votes.dtype).view(-1, 1, n_in), matrices)
        s = s.view(-1, n_out, n_atoms)
        return squash(s if bias is None else s + bias, dim=-1)

    coupling = None
    logits = None
    with torch.set_grad_enabled(full_gradient and torch.is_grad_enabled()):
        for _ in range(iterations - 1):
            v = capsules_from(coupling)
            agreement = torch.bmm(matrices, v.reshape(-1, n_atoms, 1)).view(-1, n_out, n_in)
            logits = agreement.to(logit_dtype) if logits is None else logits + agreement
            coupling = torch.softmax(logits, dim=1)  # over the output capsules
    v = capsules_from(coupling)
    if coupling is None:
        coupling = uniform_coupling((matrices.shape[0] // n_out, n_out, n_in), n_out, votes)
    return v.view(*grid, n_out, n_atoms), coupling.view(*grid, n_out, n_in)


def _capsules_as_batch(capsules: torch.Tensor) -> torch.Tensor:
    """(B, I, A, D, H, W) -> (B·I, A, D, H, W) channels-last, with at most one copy.

    A layer's output is a view of (B, D, H, W, I, A) memory, where B and I
    cannot merge without a copy; ``reshape`` then ``contiguous(channels_last)``
    would copy twice (channels-first, then channels-last), and so would the
    backward pass.
    """
    batch, n_in, n_atoms, *spatial = capsules.shape
    atoms_last = capsules.permute(0, 1, 3, 4, 5, 2).reshape(batch * n_in, *spatial, n_atoms)
    return atoms_last.permute(0, 4, 1, 2, 3)


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
        full_gradient: bool = False,
        fused_routing: bool = False,
        native_routing: bool = True,
    ):
        super().__init__()
        self.full_gradient = bool(full_gradient)
        self.fused_routing = bool(fused_routing)
        self.native_routing = bool(native_routing)
        if routing_iterations < 1:
            raise ValueError(f"routing needs at least one iteration, got {routing_iterations}")
        self.in_capsules = int(in_capsules)
        self.in_atoms = int(in_atoms)
        self.out_capsules = int(out_capsules)
        self.out_atoms = int(out_atoms)
        self.routing_iterations = int(routing_iterations)
        self.share_weights = bool(share_weights)
        if padding is None:
            padding = 0 if self.transposed else (kernel_size - 1) // 2
        groups = 1 if share_weights else in_capsules
        in_channels = in_atoms * groups
        out_channels = out_capsules * out_atoms * groups
        conv = nn.ConvTranspose3d if self.transposed else nn.Conv3d
        self.conv = conv(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            groups=groups,
            bias=False,
        )
        # Scale the kernels so that at the first routing pass (coupling 1/O,
        # independent votes) the summed vote s is about as long as an input
        # capsule: |s|^2 ~ I/O^2 * A_out * k^3 * std^2 * |x|^2.
        taps = kernel_size**3 if not self.transposed else (kernel_size // stride) ** 3
        std = out_capsules / math.sqrt(in_capsules * out_atoms * max(taps, 1))
        nn.init.normal_(self.conv.weight, std=std)
        # A small positive bias, as in SegCaps / 3D-UCaps.
        self.bias = nn.Parameter(torch.full((out_capsules, out_atoms), 0.1))

    def _check_capsules(self, capsules: torch.Tensor) -> None:
        if capsules.dim() != 6 or tuple(capsules.shape[1:3]) != (self.in_capsules, self.in_atoms):
            raise ValueError(
                f"expected capsules (B, {self.in_capsules}, {self.in_atoms}, D, H, W), "
                f"got {tuple(capsules.shape)}"
            )

    def vote_map(self, capsules: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
        """(B, I, A_in, D, H, W) -> votes (B, I, P, O, A_out) and the grid (D', H', W').

        P = D'·H'·W' voxels.

        One (grouped) convolution over channels-last input; the result is a
        view of its output, whose memory is (B, I, P, O, A) for shared weights
        and (B, P, I, O, A) for one kernel per input type: no copy.
        """
        self._check_capsules(capsules)
        batch, spatial = capsules.shape[0], capsules.shape[3:]
        if self.share_weights:
            flat = _capsules_as_batch(capsules)
        else:
            flat = capsules.reshape(batch, self.in_capsules * self.in_atoms, *spatial)
        out = self._convolve(flat.contiguous(memory_format=torch.channels_last_3d))
        grid = tuple(out.shape[2:])
        out = out.permute(0, 2, 3, 4, 1)  # channels-last memory: a free view
        n_in, n_out, n_atoms = self.in_capsules, self.out_capsules, self.out_atoms
        if self.share_weights:
            return out.reshape(batch, n_in, -1, n_out, n_atoms), grid
        return out.reshape(batch, -1, n_in, n_out, n_atoms).transpose(1, 2), grid

    def voxel_major_votes(self, capsules: torch.Tensor) -> torch.Tensor:
        """(B, I, A_in, D, H, W) -> votes (B, D', H', W', O, I, A_out), contiguous.

        The layout of the plain routing (``route_voxel_major``): the vote map
        and one permuting copy.
        """
        votes, grid = self.vote_map(capsules)  # (B, I, P, O, A)
        batch, n_in, _, n_out, n_atoms = votes.shape
        voxel_major = votes.permute(0, 2, 3, 1, 4).contiguous()
        return voxel_major.view(batch, *grid, n_out, n_in, n_atoms)

    def votes(self, capsules: torch.Tensor) -> torch.Tensor:
        """(B, I, A_in, D, H, W) -> votes (B, I, O, A_out, D', H', W') (a strided view)."""
        return self.voxel_major_votes(capsules).permute(0, 5, 4, 6, 1, 2, 3)

    def _convolve(self, x: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
        """The vote convolution of ``x`` with ``weight`` (default: the layer's kernels).

        Its weight gradient is one GEMM (``routing.vote_convolution``) where
        ``routing.use_gemm_weight_gradient()``, the input has at most
        ``routing.GEMM_MAX_IN_CHANNELS`` channels and the convolution is a plain
        one (one group, not transposed, the same stride and padding on all axes).
        """
        conv = self.conv
        if self.transposed:
            return conv(x)
        weight = conv.weight if weight is None else weight
        cubic = len(set(conv.stride)) == 1 and len(set(conv.padding)) == 1
        few_inputs = weight.shape[1] <= routing.GEMM_MAX_IN_CHANNELS
        if conv.groups == 1 and cubic and few_inputs and routing.use_gemm_weight_gradient():
            return vote_convolution(x, weight, conv.stride[0], conv.padding[0])
        return conv._conv_forward(x, weight, None)

    def _vote_sum(self, capsules: torch.Tensor, weight: torch.Tensor) -> torch.Tensor | None:
        """(B, D', H', W', C) sum over the input capsules of their votes, or None for one input.

        ``sum_i W_i * x_i`` is one convolution I times smaller than the votes':
        of the summed input capsules with the shared kernel (``W * sum_i x_i``),
        or of all input atoms with the per-type kernels laid side by side.
        ``C`` = O·A channels in the order of ``weight``.
        """
        if self.in_capsules == 1 or self.transposed:
            return None
        if self.share_weights:
            summed = capsules.sum(dim=1)
        else:
            n_in, taps = self.in_capsules, weight.shape[2:]
            weight = weight.view(n_in, -1, self.in_atoms, *taps).transpose(0, 1)
            weight = weight.reshape(-1, n_in * self.in_atoms, *taps)
            summed = capsules.flatten(1, 2)
        summed = summed.contiguous(memory_format=torch.channels_last_3d)
        conv = self.conv
        out = nn.functional.conv3d(summed, weight, None, conv.stride, conv.padding)
        return out.permute(0, 2, 3, 4, 1)  # channels-last memory: a free view

    def _mean_vote_forward(self, capsules: torch.Tensor):
        """One routing iteration without the votes: ``squash(sum_i u[i, o] / O + b[o])``.

        The same values as ``route_voxel_major`` with one iteration, from the
        vote sum alone (``_vote_sum``); returns (B, *S, O, A) capsules and the
        uniform (B, *S, O, I) coupling.
        """
        self._check_capsules(capsules)
        vote_sum = self._vote_sum(capsules, self.conv.weight)
        batch, n_out, n_atoms = capsules.shape[0], self.out_capsules, self.out_atoms
        grid = vote_sum.shape[1:4]
        s = vote_sum.view(batch, *grid, n_out, n_atoms) * (1.0 / n_out)
        outputs = squash(s + self.bias.to(s.dtype), dim=-1)
        coupling = uniform_coupling((batch, *grid, n_out, self.in_capsules), n_out, outputs)
        return outputs, coupling

    def _atom_major_weight(self) -> torch.Tensor:
        """The vote kernels with output channels reordered from (O, A) to (A, O) per group."""
        weight = self.conv.weight
        groups = self.conv.groups
        reordered = weight.view(groups, self.out_capsules, self.out_atoms, *weight.shape[1:])
        reordered = reordered.transpose(1, 2).reshape(weight.shape)
        return reordered.contiguous(memory_format=torch.channels_last_3d)

    def _fused_forward(self, capsules: torch.Tensor):
        """Fused routing on votes laid out (B, I, P, A, O); see ``routing.fused_routing``.

        Returns (B, *S, O, A) capsules and the (B, I, *S, O) coupling (None
        after one iteration).
        """
        self._check_capsules(capsules)
        batch, spatial = capsules.shape[0], capsules.shape[3:]
        n_in, n_out, n_atoms = self.in_capsules, self.out_capsules, self.out_atoms
        weight = self._atom_major_weight()
        if self.share_weights:
            flat = _capsules_as_batch(capsules)
        else:
            flat = capsules.reshape(batch, n_in * self.in_atoms, *spatial)
        out = self._convolve(flat.contiguous(memory_format=torch.channels_last_3d), weight)
        grid = tuple(out.shape[2:])
        out = out.permute(0, 2, 3, 4, 1)  # channels-last memory: a free view
        if self.share_weights:
            votes = out.reshape(batch, n_in, -1, n_atoms, n_out)
        else:
            votes = out.reshape(batch, -1, n_in, n_atoms, n_out).transpose(1, 2)
        vote_sum = None
        natively = self.native_routing and native.supports(votes)
        if not natively:  # the C kernel sums the votes in cache
            with torch.no_grad():  # the fused backward reaches the votes without it
                vote_sum = self._vote_sum(capsules, weight.detach())
        if vote_sum is not None:
            vote_sum = vote_sum.view(batch, -1, n_atoms, n_out)
        outputs, coupling = fused_routing(
            votes, self.bias.t(), self.routing_iterations, vote_sum, native_kernel=natively
        )
        if coupling is not None:
            coupling = coupling.view(batch, n_in, *grid, n_out)
        return outputs.view(batch, *grid, n_out, n_atoms), coupling

    def _plain_forward(self, capsules: torch.Tensor):
        """Plain routing (``route_voxel_major``); returns (B, *S, O, A) and (B, *S, O, I)."""
        if self.routing_iterations == 1 and self.in_capsules > 1 and not self.transposed:
            return self._mean_vote_forward(capsules)
        votes = self.voxel_major_votes(capsules)
        batch, grid = capsules.shape[0], tuple(votes.shape[1:4])
        with torch.set_grad_enabled(
            torch.is_grad_enabled() and (self.full_gradient or self.routing_iterations == 1)
        ):
            vote_sum = self._vote_sum(capsules, self.conv.weight)
        if vote_sum is not None:
            vote_sum = vote_sum.view(batch, *grid, self.out_capsules * self.out_atoms)
        return route_voxel_major(
            votes, self.bias, self.routing_iterations, self.full_gradient, vote_sum
        )

    @property
    def uses_fused_routing(self) -> bool:
        """Whether ``forward`` routes with ``routing.fused_routing``.

        Not for one iteration (a squashed mean vote: the plain path is as
        cheap), fewer than ``routing.FUSED_MIN_CAPSULES`` output capsules
        (measured slower), back-propagation through all iterations, or
        transposed layers.
        """
        return (
            self.fused_routing
            and self.routing_iterations > 1
            and self.out_capsules >= routing.FUSED_MIN_CAPSULES
            and not (self.full_gradient or self.transposed)
        )

    def routes_natively(self, capsules: torch.Tensor) -> bool:
        """Whether ``forward(capsules)`` routes with the C kernel (``native``): where
        ``native_routing`` is set, the layer routes (more than one iteration, stop-gradient,
        not transposed), the input is float32 or bf16 on the CPU and the kernel built."""
        if not self.native_routing or self.routing_iterations == 1:
            return False
        if self.full_gradient or self.transposed or capsules.device.type != "cpu":
            return False
        dtype = capsules.dtype
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
        return dtype in native.DTYPES and native.available()

    def forward(self, capsules: torch.Tensor, return_coupling: bool = False):
        """(B, I, A_in, D, H, W) -> (B, O, A_out, D', H', W') squashed capsules.

        The output is a strided view of a (B, D', H', W', O, A_out) tensor, so
        that ``flatten(1, 2)`` of it is a channels-last feature map. With
        ``return_coupling`` also the coupling coefficients (B, I, O, D', H', W').
        Routing is the C kernel where ``routes_natively``, the fused PyTorch
        implementation where ``uses_fused_routing``, else the plain one; all
        give the same values and, without ``full_gradient``, the same gradients.
        """
        if self.uses_fused_routing or self.routes_natively(capsules):
            outputs, coupling = self._fused_forward(capsules)
            if return_coupling and coupling is None:  # one iteration: uniform
                shape = (outputs.shape[0], self.in_capsules, *outputs.shape[1:5])
                coupling = uniform_coupling(shape, self.out_capsules, outputs)
            if return_coupling:
                coupling = coupling.permute(0, 1, 5, 2, 3, 4)  # (B, I, O, *S)
        else:
            outputs, coupling = self._plain_forward(capsules)
            coupling = coupling.permute(0, 5, 4, 1, 2, 3)  # (B, *S, O, I) -> (B, I, O, *S)
        capsules = outputs.permute(0, 4, 5, 1, 2, 3)
        if return_coupling:
            return capsules, coupling
        return capsules

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
    full_gradient : back-propagate through all routing iterations (False: only
        through the final weighted sum, coupling held fixed; same forward)
    fused_routing : route with ``routing.fused_routing`` in PyTorch where it applies
        (True) or with the plain ``route_voxel_major``; same values and
        gradients, not saved with the model (an implementation choice)
    native_routing : route with the C kernel (``native``) on the CPU where it is
        built (True, the default); takes precedence over ``fused_routing``
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
