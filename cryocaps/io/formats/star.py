"""STAR files through the ``starfile`` library, with one-line errors."""

from __future__ import annotations

import pandas as pd
import starfile

from cryocaps.errors import CryocapsError


def read_star(path) -> dict:
    """All data blocks of a STAR file: name -> DataFrame (loops) or dict (simple blocks)."""
    try:
        blocks = starfile.read(path, always_dict=True)
    except Exception as error:  # noqa: BLE001 - any parse failure is a bad file
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CryocapsError(f"{path}: not a readable STAR file ({reason})") from error
    if not blocks:
        raise CryocapsError(f"{path}: empty STAR file (no data blocks)")
    return blocks


def loop_blocks(blocks: dict) -> dict[str, pd.DataFrame]:
    """The loop (table) blocks, with simple key-value blocks made into one-row tables."""
    out = {}
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            out[name] = block
        elif isinstance(block, dict):
            out[name] = pd.DataFrame({k: [v] for k, v in block.items()})
    return out


def write_star(blocks: dict[str, pd.DataFrame], path) -> None:
    starfile.write(blocks, path, overwrite=True)
