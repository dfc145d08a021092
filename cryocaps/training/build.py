"""What a run is built from: the network by name, the module DDP wraps, the rate schedule."""

from __future__ import annotations

from cryocaps import runtime
from cryocaps.errors import CryocapsError
from cryocaps.training.config import TrainConfig
from cryocaps.training.ranks import Ranks


def create_model(config: TrainConfig, n_labels: int):
    """The network by name, its options checked (CryocapsError names the flag)."""
    from cryocaps.models import create_model as create_network
    from cryocaps.models import model_class

    model_class(config.model)  # an unknown --model is not an option's fault
    try:
        model = create_network(config.model, n_labels, **config.model_options)
    except (TypeError, ValueError, CryocapsError) as error:
        raise CryocapsError(f"--model-option: {error}") from None
    if config.patch_size % model.size_multiple:
        raise CryocapsError(
            f"--patch-size {config.patch_size}: must be a multiple of {model.size_multiple} "
            f"for {config.model}"
        )
    return model


def loss_module(model, device: str, ranks: Ranks):
    """``model.compute_loss`` as a module's forward, so DistributedDataParallel syncs gradients."""
    import torch

    class LossModule(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, images, labels, class_weights):
            return self.inner.compute_loss(images, labels, class_weights)

    module = LossModule(model)
    if not ranks.active:
        return module
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [torch.device(device).index] if runtime.device_type(device) == "cuda" else None
    return DistributedDataParallel(module, device_ids=device_ids)


def schedule_used(asked: str, state) -> str:
    """The schedule that ran: ``--lr-schedule`` with auto resolved (auto: none or cosine)."""
    if asked != "auto":
        return asked
    return "cosine" if state.annealing else "none"


def make_scheduler(optimizer, config: TrainConfig):
    import torch

    if config.lr_schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, factor=0.5, patience=max(1, config.patience // 3)
        )
    return None
