"""The saved-model format: a folder with ``config.json`` and ``model.pt``.

``config.json`` holds the architecture name and options, the class table, the
voxel size and patch size it was trained at and the input normalisation;
``model.pt`` is a plain ``state_dict`` loaded with ``weights_only=True`` — a
model file can never run code when opened.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

from cryocaps.errors import CryocapsError
from cryocaps.io.files import atomic_path, write_text_atomic

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.pt"
FORMAT = "cryocaps-model/1"


def save_model(
    folder: str | os.PathLike, model, metadata: dict, weights_name: str = WEIGHTS_NAME
) -> Path:
    """Write ``folder/config.json`` and ``folder/<weights_name>`` atomically.

    ``metadata`` should hold ``classes`` (records), ``voxel_size_angstrom``,
    ``patch_size`` and ``normalization``; the architecture comes from the model.
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = {"format": FORMAT, "model": model.name, "options": model.config, **metadata}
    state = model.module.state_dict() if hasattr(model, "module") else model.state_dict()
    with atomic_path(folder / weights_name, overwrite=True) as tmp:
        torch.save(state, tmp)
    write_text_atomic(folder / CONFIG_NAME, json.dumps(config, indent=2, default=str) + "\n")
    return folder


def read_config(path: str | os.PathLike) -> tuple[dict, Path]:
    """Config and weights path of a model folder (or of its model.pt)."""
    path = Path(path)
    if not path.exists():
        raise CryocapsError(f"--model {path}: no such model folder or file")
    folder = path if path.is_dir() else path.parent
    weights = path if path.is_file() else folder / WEIGHTS_NAME
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise CryocapsError(f"--model {path}: not a cryocaps model (no {CONFIG_NAME} in {folder})")
    try:
        config = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CryocapsError(f"--model {config_path}: corrupt model config ({error})") from error
    if not isinstance(config, dict) or config.get("format") != FORMAT or "model" not in config:
        raise CryocapsError(f"--model {config_path}: not a cryocaps model config")
    if not weights.is_file():
        raise CryocapsError(f"--model {path}: weights file {weights.name} is missing")
    return config, weights


def load_model(path: str | os.PathLike, device: str = "cpu"):
    """Rebuild the network from a model folder; returns (model in eval mode, config)."""
    import pickle

    import torch

    from cryocaps.models import create_model

    config, weights = read_config(path)
    options = config.get("options", {})
    if not isinstance(options, dict):
        raise CryocapsError(f"--model {path}: config.json's options must be a mapping")
    options = dict(options)
    n_classes = options.pop("n_classes", None)
    if not isinstance(n_classes, int):
        raise CryocapsError(f"--model {path}: config has no n_classes")
    try:
        model = create_model(config["model"], n_classes, **options)
    except (TypeError, ValueError, CryocapsError) as error:
        raise CryocapsError(
            f"--model {path}: config.json does not describe a network this cryocaps builds "
            f"({error})"
        ) from error
    try:
        data = weights.read_bytes()
        state = torch.load(io.BytesIO(data), map_location=device, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise CryocapsError(
            f"--model {weights}: not a valid cryocaps weights file ({message})"
        ) from error
    if not isinstance(state, dict):
        raise CryocapsError(f"--model {weights}: not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        raise CryocapsError(
            f"--model {weights}: weights do not fit a {config['model']} network with these options"
        ) from error
    model.to(device).eval()
    return model, config
