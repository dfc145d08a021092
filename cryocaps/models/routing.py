"""Fused dynamic routing and the capsule layers' vote convolution, for CPUs.

The plain routing (``capsules.route_voxel_major``) copies the votes of a
capsule layer into a voxel-major layout and runs every iteration over the
whole vote tensor with batched matrix products of tiny (I x A) matrices:
each step writes a new vote-sized or coupling-sized tensor, and autograd
keeps the votes and their copy for the backward pass. On a CPU that is
memory traffic and per-matrix dispatch, not arithmetic.

Here (``fused_routing``, one ``torch.autograd.Function``) routing runs on the
votes where the convolution wrote them, with the kernels' output channels
reordered so that the layout is (B, I, P, A, O): the output-capsule index is
innermost, every product and sum runs over contiguous rows of O, and no
layout copy is made. Voxels are taken in blocks small enough that a block's
float32 copy and temporaries stay in cache while all iterations run on it;
squared norms, agreements, logits and coupling coefficients are float32
whatever the votes' precision (bf16 or fp16 votes, float32 accumulation).

The backward pass is the stop-gradient routing of the plain implementation
(the coupling coefficients of the last iteration held fixed): it needs only
the final coupling ``c`` (B, I, P, O) and the pre-squash sums ``s``
(B, P, A, O), both far smaller than the votes, and writes the vote gradient
``c ⊗ dL/ds`` block by block in the votes' own dtype and memory layout, so
the convolution's backward reads it without a copy. The votes are not saved.

On the CPU, with float32 or bfloat16 votes, the same autograd Function hands
the forward iterations and the vote gradient to the C kernel of ``native``
(one voxel at a time instead of blocks; the default where it is built) and the
blocks below run only where it is not.

``vote_convolution`` is the layers' conv3d with its weight gradient as one
GEMM of input patches, where oneDNN's half-precision weight gradient is slow.
"""

from __future__ import annotations

import contextlib

import torch

from cryocaps.models import native

__all__ = [
    "BLOCK_VOTES",
    "FUSED_MIN_CAPSULES",
    "GEMM_MAX_IN_CHANNELS",
    "GEMM_WEIGHT_GRADIENT",
    "fused_routing",
    "squash",
    "squash_backward",
    "use_gemm_weight_gradient",
    "vote_convolution",
]

# Votes per block (elements): ~2-4 MB of float32 temporaries per block, inside
# a core's share of the last-level cache, yet large enough that the Python loop
# over blocks costs little next to the arithmetic (measured in benchmarks/models.py).
BLOCK_VOTES = 1 << 19
# Fused routing pays where the output-capsule axis, innermost, fills a float32
# AVX-512 vector: measured 1.6-1.8x faster than the plain routing for 16 output
# capsules, 10-25% slower for 8 or 4 (benchmarks/models.py, 1 thread).
FUSED_MIN_CAPSULES = 16
# Weight gradient of the capsule layers' vote convolution as one GEMM
# (``vote_convolution``): False = never (the default: on an idle 2-core AMD EPYC it made a
# 3D-UCaps training step slower, 1.89 -> 1.93 s; the 1.2-9x gains were measured on a
# heavily shared machine); None = where torch runs more than one thread; True = always.
GEMM_WEIGHT_GRADIENT: bool | None = False
# ... and only for few input channels (the patches are k³ x C_in wide): the primary
# capsules' 64-channel convolution measured 1.4x slower with it, 4-32 channels faster.
GEMM_MAX_IN_CHANNELS = 32


def use_gemm_weight_gradient() -> bool:
    """Whether capsule layers compute their vote convolution's weight gradient as one GEMM."""
    if GEMM_WEIGHT_GRADIENT is None:
        return torch.get_num_threads() > 1
    return GEMM_WEIGHT_GRADIENT


def squash(s: torch.Tensor, dim: int = 2, eps: float = 1e-12) -> torch.Tensor:
    """Squash non-linearity: ``v = |s|² / (1 + |s|²) · s / |s|`` along ``dim``.

    Keeps the direction of ``s`` and maps its length into [0, 1): short
    vectors shrink towards 0, long ones approach length 1. Written as
    ``s · |s| / (1 + |s|²)`` (no division by |s|); ``eps`` only keeps the
    gradient of a zero vector finite. The squared norm and the scale are
    computed in at least float32 also for half-precision ``s`` (|s|²
    overflows float16 above |s| = 256); the result has ``s``'s dtype.
    """
    wide = s.to(torch.promote_types(s.dtype, torch.float32))
    squared_norm = (wide * wide).sum(dim=dim, keepdim=True)
    scale = torch.sqrt(squared_norm.clamp_min(eps)) / (1 + squared_norm)
    return (wide * scale).to(s.dtype)


def squash_backward(
    grad: torch.Tensor, s: torch.Tensor, dim: int = -1, eps: float = 1e-12
) -> torch.Tensor:
    """dL/ds of ``v = squash(s, dim)`` given dL/dv (same shape, float32 or wider).

    With n = |s|² and f(n) = sqrt(n) / (1 + n): v = f·s, so
    dL/ds = f·g + 2 f'(n) <g, s> s, f'(n) = (1 - n) / (2 sqrt(n) (1 + n)²).
    The clamp at ``eps`` matches ``squash`` (no gradient through it below eps).
    """
    squared_norm = (s * s).sum(dim=dim, keepdim=True)
    clamped = squared_norm.clamp_min(eps)
    root = torch.sqrt(clamped)
    denominator = 1 + squared_norm
    scale = root / denominator
    # d scale / d n: the sqrt term only above eps (clamp_min passes no gradient below)
    d_root = torch.where(squared_norm > eps, 0.5 / root, torch.zeros_like(root))
    d_scale = d_root / denominator - root / (denominator * denominator)
    return grad * scale + (2 * d_scale * (grad * s).sum(dim=dim, keepdim=True)) * s


def _without_autocast(device_type: str):
    """Autocast switched off on this device (where it exists: not on "meta")."""
    if torch.amp.is_autocast_available(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _route_block(
    votes: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int,
    vote_sum: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """All routing iterations on one block of votes (B, I, p, A, O).

    The output capsule index O is the innermost axis, so every product and
    sum below runs over contiguous rows of O (one or more SIMD vectors)
    instead of the 8-atom rows an (O, A) order would give; the block is cast
    once to at least float32 and stays in cache for all iterations. Returns
    the pre-squash sums ``s`` (B, p, A, O) of the last iteration and its
    coupling (B, I, p, O), or None after one iteration (uniform 1/O).
    """
    n_out = votes.shape[-1]
    wide = torch.promote_types(votes.dtype, torch.float32)
    work = votes.to(wide, memory_format=torch.contiguous_format)
    if vote_sum is not None:
        s = vote_sum.to(wide) * (1.0 / n_out)
    else:
        s = work.sum(dim=1) * (1.0 / n_out)
    if bias is not None:
        s = s + bias
    logits = coupling = None
    for _ in range(iterations - 1):
        v = squash(s, dim=-2)
        agreement = (work * v.unsqueeze(1)).sum(dim=-2)  # (B, I, p, O)
        logits = agreement if logits is None else logits.add_(agreement)
        coupling = torch.softmax(logits, dim=-1)  # over the output capsules
        s = (work * coupling.unsqueeze(-2)).sum(dim=1)
        if bias is not None:
            s = s + bias
    return s, coupling


def _vote_gradient(
    coupling: torch.Tensor | None,
    grad_s: torch.Tensor,
    vote_meta: tuple,
    n_out: int,
    block_voxels: int,
) -> torch.Tensor:
    """dL/du[b, i, p, :, o] = c[b, i, p, o] dL/ds[b, p, :, o], in the votes' dtype and layout.

    Block by block like the forward pass: each block's product is formed in
    float32 in cache and written once, cast, into the vote-sized gradient (one
    product over the whole tensor, broadcast along two axes into a
    half-precision output, measured ~3x slower).
    """
    dtype, shape, strides = vote_meta
    grad_votes = torch.empty_strided(shape, strides, dtype=dtype, device=grad_s.device)
    if coupling is None:  # one iteration: uniform coupling 1/O
        return grad_votes.copy_((grad_s * (1.0 / n_out)).unsqueeze(1).expand(shape))
    n_voxels = shape[2]
    for start in range(0, n_voxels, block_voxels):
        block = slice(start, min(start + block_voxels, n_voxels))
        product = coupling[:, :, block].unsqueeze(-2) * grad_s[:, block].unsqueeze(1)
        grad_votes[:, :, block] = product
    return grad_votes


def _route_blocks(votes, bias, iterations, vote_sum, block_voxels):
    """``_route_block`` over all blocks of voxels: pre-squash sums (B, P, A, O), coupling."""
    batch, n_in, n_voxels, n_atoms, n_out = votes.shape
    wide = torch.promote_types(votes.dtype, torch.float32)
    pre_squash = votes.new_empty((batch, n_voxels, n_atoms, n_out), dtype=wide)
    coupling = None
    if iterations > 1:
        coupling = votes.new_empty((batch, n_in, n_voxels, n_out), dtype=wide)
    # the block's products stay in float32 also under autocast
    with _without_autocast(votes.device.type):
        for start in range(0, n_voxels, block_voxels):
            block = slice(start, min(start + block_voxels, n_voxels))
            block_sum = None if vote_sum is None else vote_sum[:, block]
            s, c = _route_block(votes[:, :, block], bias, iterations, block_sum)
            pre_squash[:, block] = s
            if c is not None:
                coupling[:, :, block] = c
    return pre_squash, coupling


class _FusedRouting(torch.autograd.Function):
    """Routing by agreement on votes (B, I, P, A, O); stop-gradient backward."""

    @staticmethod
    def forward(ctx, votes, bias, vote_sum, iterations, block_voxels, use_native):
        n_out = votes.shape[-1]
        wide = torch.promote_types(votes.dtype, torch.float32)
        wide_bias = None if bias is None else bias.to(wide)
        ctx.native = use_native and native.supports(votes)
        if ctx.native:  # all voxels in C, each voxel's votes read once (the vote sum too)
            pre_squash, coupling = native.forward(votes, wide_bias, iterations)
        else:
            pre_squash, coupling = _route_blocks(
                votes, wide_bias, iterations, vote_sum, block_voxels
            )
        ctx.n_out = n_out
        ctx.block_voxels = block_voxels
        ctx.has_bias = bias is not None
        ctx.save_for_backward(pre_squash, coupling)
        # the votes are not saved: only their dtype and memory layout are kept
        ctx.vote_meta = (votes.dtype, votes.shape, votes.stride())
        # (B, P, A, O) -> (B, P, O, A): the (capsule, atom) channel order of the layers
        capsules = squash(pre_squash, dim=-2).transpose(-1, -2).contiguous().to(votes.dtype)
        if coupling is not None:
            ctx.mark_non_differentiable(coupling)
        return capsules, coupling

    @staticmethod
    def backward(ctx, grad_capsules, _grad_coupling):
        pre_squash, coupling = ctx.saved_tensors
        with _without_autocast(pre_squash.device.type):
            grad_v = grad_capsules.transpose(-1, -2).to(pre_squash.dtype)
            grad_s = squash_backward(grad_v, pre_squash, dim=-2)  # (B, P, A, O)
            grad_votes = grad_bias = None
            if ctx.needs_input_grad[0] and ctx.native:
                grad_votes = native.backward(coupling, grad_s, ctx.vote_meta)
            elif ctx.needs_input_grad[0]:
                grad_votes = _vote_gradient(
                    coupling, grad_s, ctx.vote_meta, ctx.n_out, ctx.block_voxels
                )
            if ctx.has_bias and ctx.needs_input_grad[1]:
                grad_bias = grad_s.sum(dim=(0, 1))
        return grad_votes, grad_bias, None, None, None, None


def fused_routing(
    votes: torch.Tensor,
    bias: torch.Tensor | None,
    iterations: int = 3,
    vote_sum: torch.Tensor | None = None,
    block_votes: int | None = None,
    native_kernel: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Dynamic routing on votes (B, I, P, A, O) in any memory layout.

    Parameters
    ----------
    votes : (B, I, P, A, O) votes of I input capsule types for O output capsule
        types of A atoms at P voxels (a view of the vote convolution's output;
        note the atom axis before the output-capsule axis)
    bias : (A, O) added to the weighted sum of votes, or None
    iterations : routing iterations (>= 1; 1 = squash of the mean vote)
    vote_sum : (B, P, A, O) sum of the votes over I, if known more cheaply
        than summing them (the first, uniform-coupling iteration uses it)
    block_votes : votes per block of voxels routed at once (default ``BLOCK_VOTES``)
    native_kernel : route with the C kernel (``native``) where it takes the votes
        (CPU, float32 or bfloat16; ``vote_sum`` and ``block_votes`` are then not
        needed) and built; else block by block in PyTorch

    Returns
    -------
    capsules : (B, P, O, A) squashed outputs, in the votes' dtype (contiguous,
        so that it is a channels-last map of O·A channels)
    coupling : (B, I, P, O) coupling coefficients (at least float32) of the
        last iteration (softmax over O), or None after one iteration (uniform 1/O)

    Gradients reach ``votes`` and ``bias`` through the last weighted sum with
    the coupling held fixed, as ``route_voxel_major(..., full_gradient=False)``.
    """
    if iterations < 1:
        raise ValueError(f"routing needs at least one iteration, got {iterations}")
    batch, n_in, _, n_atoms, n_out = votes.shape
    block_votes = BLOCK_VOTES if block_votes is None else block_votes
    block_voxels = max(1, block_votes // (batch * n_in * n_out * n_atoms))
    return _FusedRouting.apply(
        votes, bias, vote_sum, int(iterations), block_voxels, bool(native_kernel)
    )


def _patches(x: torch.Tensor, kernel: int, stride: int, padding: int) -> torch.Tensor:
    """(N, C, D, H, W) -> (N·D'·H'·W', k³·C) patches, columns ordered (kz, ky, kx, c)."""
    voxel_major = x.permute(0, 2, 3, 4, 1)  # a view for a channels-last map
    pad = (0, 0, padding, padding, padding, padding, padding, padding)
    padded = torch.nn.functional.pad(voxel_major, pad).contiguous()
    n, depth, height, width, channels = padded.shape
    out = [(side - kernel) // stride + 1 for side in (depth, height, width)]
    s_n, s_d, s_h, s_w, s_c = padded.stride()
    windows = padded.as_strided(
        (n, *out, kernel, kernel, kernel, channels),
        (s_n, s_d * stride, s_h * stride, s_w * stride, s_d, s_h, s_w, s_c),
    )
    return windows.reshape(-1, kernel**3 * channels)


class _VoteConvolution(torch.autograd.Function):
    """conv3d (no bias, one group) whose weight gradient is one matrix product.

    oneDNN's half-precision weight gradient for the capsule layers' shapes
    (few input channels, many output channels, or small maps) runs far below
    its forward speed (measured 3-30x slower than the same FLOPs forward); the
    patches of the input times the output gradient is one large GEMM instead.
    The input gradient stays oneDNN's.
    """

    @staticmethod
    def forward(ctx, x, weight, stride, padding):
        ctx.save_for_backward(x, weight)
        ctx.stride, ctx.padding = stride, padding
        return torch.nn.functional.conv3d(x, weight, None, stride, padding)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight = ctx.saved_tensors
        stride, padding = ctx.stride, ctx.padding
        grad_x = grad_weight = None
        if ctx.needs_input_grad[0]:
            (grad_x, _, _) = torch.ops.aten.convolution_backward(
                grad_out, x, weight, None, [stride] * 3, [padding] * 3, [1] * 3,
                False, [0] * 3, 1, [True, False, False],
            )  # fmt: skip
        if ctx.needs_input_grad[1]:
            out_channels, in_channels, kernel = weight.shape[:3]
            rows = grad_out.permute(0, 2, 3, 4, 1).reshape(-1, out_channels)
            columns = _patches(x, kernel, stride, padding)
            grad_weight = (rows.t() @ columns).view(out_channels, kernel, kernel, kernel, -1)
            grad_weight = grad_weight.permute(0, 4, 1, 2, 3)  # (O, C, k, k, k), channels-last
        return grad_x, grad_weight, None, None


def vote_convolution(x: torch.Tensor, weight: torch.Tensor, stride: int, padding: int):
    """``conv3d(x, weight)`` of a capsule layer, with the GEMM weight gradient.

    Under autocast both operands are cast to the autocast dtype first (as
    autocast would cast them for ``conv3d``), so the saved input and the
    matrix product are in that dtype.
    """
    device_type = x.device.type
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
    with _without_autocast(device_type):
        return _VoteConvolution.apply(x, weight, int(stride), int(padding))
