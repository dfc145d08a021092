"""No update from gradients that are not finite, on devices without a gradient scaler.

CUDA float16 training has ``torch.amp.GradScaler``, which skips a step whose
gradients overflowed. Nothing does that for float32 or CPU bfloat16, yet torch
2.13's oneDNN bfloat16 convolution weight gradient returns NaN now and then from
finite inputs (seen on 2x2x2 maps, not reproducible with the same tensors), and
one such step would turn every weight into NaN. :class:`GradientGuard` skips it.
"""

from __future__ import annotations

import logging

from cryocaps.errors import CryocapsError

log = logging.getLogger(__name__)

# Consecutive steps with non-finite gradients after which training stops as diverged
MAX_SKIPPED_IN_A_ROW = 10


def finite_gradients(model) -> bool:
    """Whether every gradient of ``model`` is finite (after DDP's all-reduce: the same on
    every rank, so all ranks skip together)."""
    import torch

    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return True
    return bool(torch.isfinite(torch.stack([g.abs().amax().float() for g in grads])).all())


class GradientGuard:
    """Counts the steps it refused (``state.skipped_steps``, kept in checkpoints) and stops
    training after ``limit`` refusals in a row."""

    def __init__(self, limit: int = MAX_SKIPPED_IN_A_ROW):
        self.limit, self.in_a_row = limit, 0

    def allows_update(self, state) -> bool:
        """True when ``state.model``'s gradients may update it; else counts and warns."""
        if finite_gradients(state.model):
            self.in_a_row = 0
            return True
        state.skipped_steps = (state.skipped_steps or 0) + 1
        self.in_a_row += 1
        step = state.total_steps + 1
        log.warning("step %d: gradients not finite, no update (%d skipped so far)", step,
                    state.skipped_steps)  # fmt: skip
        if self.in_a_row >= self.limit:
            raise CryocapsError(
                f"training diverged ({self.in_a_row} steps in a row with gradients that are "
                f"not finite) at epoch {state.epoch + 1}; try a lower --lr or --no-bf16"
            )
        return False
