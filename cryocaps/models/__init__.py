"""Networks by name: ``create_model("ucaps" | "ucaps-fast" | "unet", n_classes, **options)``.

Every model maps (B, 1, D, H, W) float input to (B, n_classes, D, H, W) logits
(``n_classes`` counts background as label 0), exposes ``size_multiple`` (input
sides must be multiples of it), ``config`` (the options that rebuild it) and
``compute_loss(images, labels, class_weights=None) -> (loss, {part: float})``
with the model's own training losses.
"""

from __future__ import annotations

import importlib

from cryocaps.errors import CryocapsError

# name -> "module:Class"; modules are imported on demand.
REGISTRY = {
    "unet": "cryocaps.models.unet:UNet3D",
    "ucaps": "cryocaps.models.ucaps:UCaps3D",
    "ucaps-fast": "cryocaps.models.ucaps:UCaps3DFast",
}


def available_models() -> list[str]:
    return sorted(REGISTRY)


def model_class(name: str):
    if name not in REGISTRY:
        raise CryocapsError(
            f"unknown model {name!r}; choose one of {', '.join(available_models())}"
        )
    module_name, class_name = REGISTRY[name].split(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise CryocapsError(f"model {name!r} is not available in this build ({error})") from error
    return getattr(module, class_name)


def create_model(name: str, n_classes: int, **options):
    """Build a network by name. ``n_classes`` includes background."""
    if n_classes < 2:
        raise CryocapsError(f"a model needs at least 2 classes (background + 1), got {n_classes}")
    return model_class(name)(n_classes=n_classes, **options)


__all__ = ["REGISTRY", "available_models", "create_model", "model_class"]
