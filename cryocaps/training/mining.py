"""Hard negatives from the network's own mistakes, mined between epochs.

At the end of every epoch :class:`MineFalsePositives` segments a few random
windows of the training volumes with the weights being trained, takes voxels
predicted as a particle class where the label map says background (label 0:
never an unknown voxel of a partly annotated map), and hands a few of them per
window to the sampler as patch centres for its ``--mined-negatives`` share of
the background patches. Patches centred on particles never show the network
the places where it calls noise a faint class; these do, at a bounded cost
(``MINING_WINDOWS`` forward passes of one patch each per epoch, about
``MINING_WINDOWS / 3`` training steps).
"""

from __future__ import annotations

import logging

import numpy as np

from cryocaps.training.hooks import Hook
from cryocaps.training.sampling import PatchSampler, extract_patch

log = logging.getLogger(__name__)

MINING_WINDOWS = 16  # random training windows (patch-sized) segmented per epoch
MINED_PER_WINDOW = 4  # false-positive voxels kept per window, drawn at random among them
MINED_POOL = 256  # places the sampler draws from: the newest kept


def mine_false_positives(
    model,
    sampler: PatchSampler,
    *,
    n_windows: int,
    per_window: int,
    batch_size: int,
    device: str,
    autocast,
) -> tuple[np.ndarray, float]:
    """False-positive places in ``n_windows`` random windows the sampler could draw.

    Returns the places (N, 4) volume index, z, y, x (at most ``per_window`` per window,
    in its central half) and the share of those background voxels predicted as a class. Windows
    and choices come from the sampler's generator, so a resumed run mines the same.
    """
    import torch

    windows = [w for w in (_window(sampler) for _ in range(n_windows)) if w is not None]
    size = sampler.patch_size
    # only a window's central half counts: near its faces the network lacks the context the
    # sliding window of `segment` gives every voxel, so mistakes there are not its own
    margin = size // 4
    centre = np.zeros((size,) * 3, bool)
    centre[margin : size - margin, margin : size - margin, margin : size - margin] = True
    places, false_positive, background = [], 0, 0
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start : start + batch_size]
                patches = [extract_patch(sampler.volumes[i], corner, size) for i, corner in batch]
                images = torch.from_numpy(np.stack([image for image, _ in patches])[:, None])
                with autocast():
                    output = model(images.to(device))
                logits = output[0] if isinstance(output, (tuple, list)) else output
                predicted = logits.argmax(1).cpu().numpy()
                for (index, corner), (_, labels), guess in zip(
                    batch, patches, predicted, strict=True
                ):
                    wrong = np.argwhere(centre & (guess != 0) & (labels == 0))
                    false_positive += len(wrong)
                    background += int((centre & (labels == 0)).sum())
                    chosen = sampler.rng.permutation(len(wrong))[:per_window]
                    for zyx in wrong[chosen] + np.asarray(corner):
                        places.append((index, *zyx.tolist()))
    finally:
        model.train()
    share = false_positive / background if background else 0.0
    return np.array(places, np.int64).reshape(-1, 4), share


def _window(sampler: PatchSampler, tries: int = 100) -> tuple[int, tuple[int, int, int]] | None:
    """A random patch-sized window of a background volume clear of the excluded boxes (None
    when ``tries`` draws found none)."""
    for _ in range(tries):
        index, corner = sampler.random_corner()
        corner = sampler.clear(index, corner)
        if corner is not None:
            return index, corner
    return None


class MineFalsePositives(Hook):
    """Between epochs, give the sampler the network's newest false positives (see module)."""

    def __init__(
        self,
        n_windows: int = MINING_WINDOWS,
        per_window: int = MINED_PER_WINDOW,
        pool: int = MINED_POOL,
    ):
        self.n_windows, self.per_window, self.pool = n_windows, per_window, pool

    def on_epoch_end(self, trainer, row: dict, improved: bool) -> None:
        sampler = trainer.sampler
        places, share = mine_false_positives(
            trainer.state.model,
            sampler,
            n_windows=self.n_windows,
            per_window=self.per_window,
            batch_size=trainer.config.batch_size,
            device=trainer.device,
            autocast=trainer.autocast,
        )
        sampler.set_mined_places(np.concatenate([sampler.mined, places])[-self.pool :])
        log.info(
            "mined %d false-positive places (%.2f%% of the background voxels of %d windows "
            "predicted as a class); %d in the pool",
            len(places),
            100 * share,
            self.n_windows,
            len(sampler.mined),
        )
