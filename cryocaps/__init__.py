"""cryocaps: macromolecule identification in cryo-electron tomograms.

Capsule-network (3D-UCaps) and U-Net (DeepFinder baseline) segmentation,
sliding-window inference, clustering into particle coordinates and
particle-level evaluation, reading and writing RELION / STOPGAP / Dynamo files.
"""

__version__ = "0.1.0"

from cryocaps.errors import CryocapsError  # noqa: E402

__all__ = ["CryocapsError", "__version__"]
