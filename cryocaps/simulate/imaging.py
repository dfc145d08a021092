"""Imaging: tilt series, CTF, noise and weighted back-projection.

1. **Tilt series.** Line integrals through the volume for every tilt angle,
   tilt axis along Y; tilt θ sees the point (x, z) (from the centre) at
   detector position ``u = x cos θ + z sin θ``. Computed by shearing in
   Fourier space (exact sub-voxel shifts) and summing: no loop over voxels.
2. **CTF** per tilt image (voltage, Cs, amplitude contrast, defocus), with
   the defocus gradient of a tilted specimen across the tilt axis; with
   underfocus the protein comes out dark, as in real data. An optional
   Gaussian envelope blurs the images (``blur_angstrom``).
3. **Noise**: white Gaussian noise added to each tilt image. The SNR is the
   variance of the CTF-modulated projections of the particles alone (all tilt
   images, whole detector) divided by the variance of the added noise.
4. **Reconstruction** by weighted back-projection (ramp filter with a soft
   cut-off at 0.35 cycles/pixel) along the rays of step 1. The missing
   wedge, its streaks and the CTF fringes all come from the physics.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from cryocaps.simulate.parameters import SimulationParameters

__all__ = [
    "apply_ctf",
    "ctf_2d",
    "electron_wavelength_angstrom",
    "noisy_tilt_series",
    "project_tilt_series",
    "reconstruct",
    "tilt_angles",
    "weighted_backprojection",
]

RAMP_CUTOFF = 0.35  # cycles/pixel where the reconstruction filter starts to fall off
RAMP_FALLOFF = 0.05
_TAPER = 8  # samples of cosine taper at the ends of padded shear axes


def tilt_angles(tilt_range_deg: float, tilt_step_deg: float) -> np.ndarray:
    """Tilt angles from -range to +range in steps (0 included), degrees."""
    n = int(math.floor(tilt_range_deg / tilt_step_deg + 1e-6))
    return np.arange(-n, n + 1) * float(tilt_step_deg)


def _fft_size(n: int) -> int:
    """Smallest size >= n with prime factors 2, 3, 5 only (fast FFTs)."""
    size = max(int(n), 2)
    while True:
        m = size
        for p in (2, 3, 5):
            while m % p == 0:
                m //= p
        if m == 1:
            return size
        size += 1


def _tilt_groups(tilts_deg: np.ndarray):
    """Split tilts into near-0 (shear along X, |θ| <= 45°) and near-90 (shear along Z) groups.

    For each group: (indices, stretch, shear) with detector u = stretch^-1 * sheared coordinate.
    """
    theta = np.deg2rad(np.asarray(tilts_deg, dtype=np.float64))
    low = np.abs(theta) <= np.pi / 4 + 1e-9
    groups = []
    if low.any():
        t = theta[low]
        groups.append(("x", np.flatnonzero(low), 1 / np.cos(t), np.tan(t)))
    if (~low).any():
        t = theta[~low]
        groups.append(("z", np.flatnonzero(~low), 1 / np.sin(t), 1 / np.tan(t)))
    return groups


def _interpolate_last(data, positions, valid):
    """Linear interpolation of ``data`` (T, R, L) along L at ``positions`` (T, M); 0 where not
    valid."""
    import torch

    length = data.shape[-1]
    base = torch.clamp(torch.floor(positions), 0, length - 2)
    weight = (positions - base).clamp(0, 1)[:, None, :]
    index = base.long()[:, None, :].expand(-1, data.shape[1], -1)
    left = torch.gather(data, 2, index)
    right = torch.gather(data, 2, index + 1)
    return (left + weight * (right - left)) * valid[:, None, :]


class _Shear:
    """Geometry shared by the projector and back-projector of one tilt group.

    The volume is seen as (S, Y, H): S summed along the beam, H sheared. Tilt t
    sees S(s) = sum_n V_n(s - n_rel * shear_t) at s = centre + stretch_t * u_rel,
    times |stretch_t| (path length per voxel).
    """

    def __init__(
        self, n_sum: int, n_shear: int, n_detector: int, stretch: np.ndarray, shear: np.ndarray
    ):
        import torch

        self.n_sum, self.n_shear, self.n_detector = n_sum, n_shear, n_detector
        reach = n_shear + n_sum * float(np.abs(shear).max())
        self.length = _fft_size(int(math.ceil(reach)) + 2 * _TAPER + 4)
        self.offset = (self.length - n_shear) // 2
        self.centre = self.offset + (n_shear - 1) / 2
        self.support = reach / 2 + 1  # |s - centre| beyond this is empty
        self.stretch = torch.from_numpy(stretch).double()
        frequency = torch.arange(self.length // 2 + 1, dtype=torch.float64)
        n_rel = torch.arange(n_sum, dtype=torch.float64) - (n_sum - 1) / 2
        turns = (
            frequency[:, None, None] * n_rel[None, :, None] * torch.from_numpy(shear)[None, None, :]
        )
        self.phase = torch.polar(torch.ones_like(turns), -2 * math.pi * turns / self.length).to(
            torch.complex64
        )
        self.u_rel = torch.arange(n_detector, dtype=torch.float64) - (n_detector - 1) / 2

    def rows_per_chunk(self, budget_bytes: int = 96 * 2**20) -> int:
        per_row = 8 * (self.length // 2 + 1) * (2 * self.n_sum + 2 * len(self.stretch))
        return max(1, budget_bytes // per_row)

    def project(self, volume) -> object:
        """(S, Y, H) float32 tensor -> (T, Y, U) line integrals."""
        import torch
        import torch.nn.functional as F

        s_rel = self.stretch[:, None] * self.u_rel[None, :]
        positions = (self.centre + s_rel).float()
        valid = (s_rel.abs() <= self.support).float()
        scale = self.stretch.abs().float()[:, None, None]
        out = torch.empty(len(self.stretch), volume.shape[1], self.n_detector)
        step = self.rows_per_chunk()
        for y0 in range(0, volume.shape[1], step):
            block = F.pad(
                volume[:, y0 : y0 + step], (self.offset, self.length - self.n_shear - self.offset)
            )
            # bmm is ~50x faster on contiguous operands than on permuted views
            spectrum = torch.fft.rfft(block, dim=-1).permute(2, 1, 0).contiguous()  # (K, y, S)
            summed = torch.bmm(spectrum, self.phase).permute(2, 1, 0)  # (T, y, K)
            sheared = torch.fft.irfft(summed, n=self.length, dim=-1)
            out[:, y0 : y0 + step] = _interpolate_last(sheared, positions, valid) * scale
        return out

    def backproject(self, projections) -> object:
        """(T, Y, U) filtered projections -> (S, Y, H) back-projection (adjoint geometry)."""
        import torch

        s_rel = torch.arange(self.length, dtype=torch.float64) - self.centre
        u = s_rel[None, :] / self.stretch[:, None] + (self.n_detector - 1) / 2
        valid = ((u >= 0) & (u <= self.n_detector - 1)).float()
        valid *= _taper(self.length)[None, :]
        positions = u.float()
        phase = self.phase.conj().permute(0, 2, 1).contiguous()  # (K, T, S)
        out = torch.empty(self.n_sum, projections.shape[1], self.n_shear)
        step = self.rows_per_chunk()
        for y0 in range(0, projections.shape[1], step):
            spread = _interpolate_last(projections[:, y0 : y0 + step], positions, valid)
            spectrum = torch.fft.rfft(spread, dim=-1).permute(2, 1, 0).contiguous()  # (K, y, T)
            summed = torch.bmm(spectrum, phase).permute(2, 1, 0)  # (S, y, K)
            full = torch.fft.irfft(summed, n=self.length, dim=-1)
            out[:, y0 : y0 + step] = full[..., self.offset : self.offset + self.n_shear]
        return out


def _taper(length: int):
    import torch

    weight = torch.ones(length)
    ramp = 0.5 - 0.5 * torch.cos(torch.linspace(0, math.pi, _TAPER + 2)[1:-1])
    weight[:_TAPER] = ramp
    weight[-_TAPER:] = ramp.flip(0)
    return weight


def project_tilt_series(volume: np.ndarray, tilts_deg: Sequence[float]) -> np.ndarray:
    """Line integrals of a (Z, Y, X) volume for each tilt about the Y axis.

    Returns
    -------
    (T, Y, X) float32: projection t at detector column u (from the centre)
    integrates the points with x cos θ + z sin θ = u, in voxel units.
    """
    import torch

    data = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))
    nz, ny, nx = data.shape
    out = torch.empty(len(tilts_deg), ny, nx)
    for axis, index, stretch, shear in _tilt_groups(np.asarray(tilts_deg)):
        if axis == "x":
            out[index] = _Shear(nz, nx, nx, stretch, shear).project(data)
        else:
            out[index] = _Shear(nx, nz, nx, stretch, shear).project(
                data.permute(2, 1, 0).contiguous()
            )
    return out.numpy()


def weighted_backprojection(
    projections: np.ndarray, tilts_deg: Sequence[float], n_z: int
) -> np.ndarray:
    """Weighted back-projection of a (T, Y, X) tilt series (tilt axis Y) into (n_z, Y, X).

    Each image is ramp-filtered across the tilt axis (with a soft cut-off at
    ``RAMP_CUTOFF`` cycles/pixel) and smeared back along its rays.
    """
    import torch

    data = torch.from_numpy(np.ascontiguousarray(projections, dtype=np.float32))
    n_tilts, ny, nx = data.shape
    padded = _fft_size(2 * nx)
    frequency = torch.fft.rfftfreq(padded)
    weight = frequency.abs().clamp(min=0.25 / padded)
    weight *= torch.exp(-((frequency - RAMP_CUTOFF).clamp(min=0) ** 2) / (2 * RAMP_FALLOFF**2))
    filtered = torch.fft.irfft(torch.fft.rfft(data, n=padded, dim=-1) * weight, n=padded, dim=-1)[
        ..., :nx
    ]
    filtered = filtered.contiguous()
    volume = torch.zeros(n_z, ny, nx)
    for axis, index, stretch, shear in _tilt_groups(np.asarray(tilts_deg)):
        subset = filtered[torch.from_numpy(index)]
        if axis == "x":
            volume += _Shear(n_z, nx, nx, stretch, shear).backproject(subset)
        else:
            volume += _Shear(nx, n_z, nx, stretch, shear).backproject(subset).permute(2, 1, 0)
    return volume.numpy()


def electron_wavelength_angstrom(voltage_kv: float) -> float:
    """Relativistic electron wavelength in Å."""
    volts = voltage_kv * 1e3
    return 12.2643 / math.sqrt(volts * (1 + 0.978466e-6 * volts))


def ctf_2d(
    shape: tuple[int, int],
    voxel_size_angstrom: float,
    params: SimulationParameters,
    defocus_angstrom: float | None = None,
) -> np.ndarray:
    """CTF on the rfft2 grid of a (Y, X) image; negative at low frequency (dark protein).

    CTF(k) = -(sqrt(1 - A^2) sin chi + A cos chi),
    chi = pi lambda df k^2 - pi/2 Cs lambda^3 k^4, df > 0 underfocus
    (``defocus_angstrom``, default ``params.defocus_um``). With ``params.blur_angstrom``
    = s > 0 it is multiplied by exp(-2 pi^2 s^2 k^2), a Gaussian blur of standard
    deviation s (drift, beam damage and alignment errors; a B-factor of 8 pi^2 s^2).
    """
    wavelength = electron_wavelength_angstrom(params.voltage_kv)
    ky = np.fft.fftfreq(shape[0], d=voxel_size_angstrom)[:, None]
    kx = np.fft.rfftfreq(shape[1], d=voxel_size_angstrom)[None, :]
    k2 = kx**2 + ky**2
    defocus = params.defocus_um * 1e4 if defocus_angstrom is None else defocus_angstrom
    cs = params.cs_mm * 1e7
    chi = np.pi * wavelength * defocus * k2 - 0.5 * np.pi * cs * wavelength**3 * k2**2
    amplitude = params.amplitude_contrast
    ctf = -(np.sqrt(1 - amplitude**2) * np.sin(chi) + amplitude * np.cos(chi))
    if params.blur_angstrom > 0:
        ctf *= np.exp(-2 * np.pi**2 * params.blur_angstrom**2 * k2)
    return ctf.astype(np.float32)


def apply_ctf(
    images: np.ndarray, tilts_deg: Sequence[float], params: SimulationParameters
) -> np.ndarray:
    """The CTF of each tilt image of a (T, Y, X) stack, defocus varying across the tilt axis.

    A specimen tilted by θ is nearer to focus on one side of the tilt axis:
    column u (Å from the axis) has defocus ``df + u tan θ`` (but no farther from
    ``df`` than the deepest point of the box, so that it stays finite near 90°). Each image is
    filtered at a few defocus values (phase steps of at most 0.25 rad at
    Nyquist) and the columns blended linearly between them.
    """
    voxel = params.voxel_size_angstrom
    n_tilts, ny, nx = images.shape
    nyquist = 0.5 / voxel
    step = 0.25 / (np.pi * electron_wavelength_angstrom(params.voltage_kv) * nyquist**2)
    u_angstrom = (np.arange(nx) - (nx - 1) / 2) * voxel
    columns = np.arange(nx)
    out = np.empty_like(images, dtype=np.float32)
    for t, tilt in enumerate(tilts_deg):
        spectrum = np.fft.rfft2(images[t])
        # bounded by the deepest point of the box at this tilt (finite near 90°)
        theta = np.deg2rad(tilt)
        reach = (abs(np.sin(theta)) * nx + abs(np.cos(theta)) * params.shape[0]) * voxel / 2
        offset = np.clip(u_angstrom * np.tan(np.deg2rad(tilt)), -reach, reach)
        defocus = params.defocus_um * 1e4 + offset
        low, high = float(defocus.min()), float(defocus.max())
        n_levels = int(np.ceil((high - low) / step)) + 1 if high - low > 1e-3 else 1
        levels = np.linspace(low, high, n_levels)
        filtered = np.stack(
            [
                np.fft.irfft2(spectrum * ctf_2d((ny, nx), voxel, params, d), s=(ny, nx))
                for d in levels
            ]
        )
        if n_levels == 1:
            out[t] = filtered[0]
            continue
        position = (defocus - low) / (high - low) * (n_levels - 1)
        base = np.clip(np.floor(position).astype(int), 0, n_levels - 2)
        weight = (position - base)[None, :]
        out[t] = (1 - weight) * filtered[base, :, columns].T + weight * filtered[
            base + 1, :, columns
        ].T
    return out


def noisy_tilt_series(
    particles: np.ndarray,
    clutter: np.ndarray | None,
    tilts_deg: np.ndarray,
    params: SimulationParameters,
    rng: np.random.Generator,
) -> tuple[np.ndarray, float, float]:
    """The recorded tilt series of a sample: projected, CTF-filtered, with noise at ``params.snr``.

    Parameters
    ----------
    particles : (Z, Y, X) density of the particles alone (sets the signal level)
    clutter : (Z, Y, X) density of the distractors, or None
    tilts_deg : (T,) tilt angles

    Returns
    -------
    signal : (T, Y, X) float32 noisy tilt images
    noise_sigma : standard deviation of the added noise
    signal_variance : variance of the particles' CTF-modulated projections
    """
    signal = apply_ctf(project_tilt_series(particles, tilts_deg), tilts_deg, params)
    signal_variance = float(signal.var())
    if clutter is not None:
        signal += apply_ctf(project_tilt_series(clutter, tilts_deg), tilts_deg, params)
        del clutter  # (the caller keeps no reference: free it before the noise is drawn)
    if not signal_variance > 0:  # no particles: scale the noise to the clutter, or to 1
        signal_variance = float(signal.var()) or 1.0
    noise_sigma = math.sqrt(signal_variance / params.snr)
    signal += rng.standard_normal(signal.shape, dtype=np.float32) * np.float32(noise_sigma)
    return signal, noise_sigma, signal_variance


def reconstruct(signal: np.ndarray, tilts_deg: np.ndarray, n_z: int) -> np.ndarray:
    """Weighted back-projection of a (T, Y, X) tilt series, standardised: (n_z, Y, X), mean 0,
    std 1."""
    tomogram = weighted_backprojection(signal, tilts_deg, n_z)
    tomogram -= tomogram.mean()
    tomogram /= tomogram.std() or 1.0
    return tomogram
