"""Euler angles: RELION ZYZ (rot, tilt, psi) <-> STOPGAP and Dynamo ZXZ.

One rotation per particle, the *orientation* O that takes particle (reference)
coordinates to tomogram coordinates. In scipy terms (capital letters intrinsic,
small letters extrinsic axes):

- RELION:  O = Rotation.from_euler("ZYZ", [rot, tilt, psi]).inv()
  (RELION's ``Euler_angles2matrix`` is O's matrix; RELION 5 composes
  O = O_subtomogram * O_particle when ``rlnTomoSubtomogram*`` angles are present).
- STOPGAP (AV3/TOM convention, columns phi, psi, the):
  O = Rotation.from_euler("zxz", [phi, the, psi]).
- Dynamo (columns 7-9 tdrot, tilt, narot):
  O = Rotation.from_euler("zxz", [tdrot, tilt, narot]).inv().

These are the conventions cryoCAT and teamtomo's readers use (cryoCAT's motl
``theta`` is STOPGAP's ``the``).
"""

from __future__ import annotations

import warnings

import numpy as np
from scipy.spatial.transform import Rotation


def _as_euler(rotation: Rotation, seq: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gimbal lock: any valid angle triple will do
        return rotation.as_euler(seq, degrees=True)


def relion_orientation(angles: np.ndarray) -> Rotation:
    """O from RELION (rot, tilt, psi) degrees, shape (N, 3)."""
    return Rotation.from_euler("ZYZ", np.asarray(angles, dtype=float), degrees=True).inv()


def relion_angles(orientation: Rotation) -> np.ndarray:
    """RELION (rot, tilt, psi) degrees of O."""
    return _as_euler(orientation.inv(), "ZYZ")


def stopgap_to_relion(phi_psi_the: np.ndarray) -> np.ndarray:
    """STOPGAP (phi, psi, the) -> RELION (rot, tilt, psi), degrees, (N, 3)."""
    phi, psi, the = np.asarray(phi_psi_the, dtype=float).T
    orientation = Rotation.from_euler("zxz", np.stack([phi, the, psi], axis=1), degrees=True)
    return relion_angles(orientation)


def relion_to_stopgap(angles: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) -> STOPGAP (phi, psi, the), degrees, (N, 3)."""
    phi, the, psi = _as_euler(relion_orientation(angles), "zxz").T
    return np.stack([phi, psi, the], axis=1)


def dynamo_to_relion(tdrot_tilt_narot: np.ndarray) -> np.ndarray:
    """Dynamo (tdrot, tilt, narot) -> RELION (rot, tilt, psi), degrees, (N, 3)."""
    orientation = Rotation.from_euler(
        "zxz", np.asarray(tdrot_tilt_narot, dtype=float), degrees=True
    ).inv()
    return relion_angles(orientation)


def relion_to_dynamo(angles: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) -> Dynamo (tdrot, tilt, narot), degrees, (N, 3)."""
    return _as_euler(relion_orientation(angles).inv(), "zxz")


def wrap_degrees(angles: np.ndarray) -> np.ndarray:
    """Angles to (-180, 180] (the same rotation; Warp writes angles far outside ±360°)."""
    wrapped = np.mod(np.asarray(angles, dtype=float) + 180.0, 360.0) - 180.0
    return np.where(wrapped == -180.0, 180.0, wrapped)
