"""Atomic models: atom positions and atomic numbers from PDB and mmCIF files.

Reads the first model, skips waters, and for PDB files applies the operators of
biological assembly 1 (REMARK 350 BIOMT). Files may be gzipped. Unknown
elements count as carbon.
"""

from __future__ import annotations

import gzip
import os
import re
from pathlib import Path

import numpy as np

from cryocaps.errors import CryocapsError

__all__ = ["ATOMIC_NUMBERS", "read_atoms"]

ATOMIC_NUMBERS = {
    "H": 1, "D": 1, "C": 6, "N": 7, "O": 8, "F": 9, "NA": 11, "MG": 12, "AL": 13, "SI": 14,
    "P": 15, "S": 16, "CL": 17, "K": 19, "CA": 20, "MN": 25, "FE": 26, "CO": 27, "NI": 28,
    "CU": 29, "ZN": 30, "SE": 34, "BR": 35, "RB": 37, "SR": 38, "CD": 48, "I": 53, "CS": 55,
    "BA": 56, "W": 74, "PT": 78, "AU": 79, "HG": 80, "PB": 82, "U": 92,
}  # fmt: skip


def _open_text(path: Path):
    if path.name.lower().endswith(".gz"):
        return gzip.open(path, "rt", errors="replace")
    return open(path, errors="replace")  # noqa: SIM115 - closed by the caller's with


def read_atoms(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Atom positions and atomic numbers from a PDB or mmCIF file (optionally .gz).

    Returns
    -------
    coords : (N, 3) float64, x, y, z in Å
    atomic_numbers : (N,) float64 (unknown elements count as carbon)
    """
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    try:
        with _open_text(path) as handle:
            text = handle.read()
    except OSError as error:
        raise CryocapsError(f"{path}: cannot read ({error})") from error
    is_cif = name.endswith((".cif", ".mmcif")) or (
        text.lstrip().startswith("data_") and "_atom_site." in text
    )
    coords, elements = _read_cif_atoms(text) if is_cif else _read_pdb_atoms(text)
    if not len(coords):
        raise CryocapsError(
            f"{path}: no atoms found (expected ATOM/HETATM records or an _atom_site loop)"
        )
    numbers = np.array([ATOMIC_NUMBERS.get(e, 6) for e in elements], dtype=np.float64)
    return np.asarray(coords, dtype=np.float64), numbers


WATER_NAMES = {"HOH", "WAT", "DOD", "H2O", "TIP", "TIP3", "SOL"}


def _read_pdb_atoms(text: str) -> tuple[np.ndarray, list]:
    coords, elements, chains = [], [], []
    for line in text.splitlines():
        if line.startswith("ENDMDL"):
            break  # first model only
        if not line.startswith(("ATOM", "HETATM")) or line[17:21].strip() in WATER_NAMES:
            continue
        try:
            coords.append((float(line[30:38]), float(line[38:46]), float(line[46:54])))
        except ValueError:
            continue
        element = line[76:78].strip().upper()
        if not element or not element.isalpha():
            element = "".join(c for c in line[12:14] if c.isalpha()).upper() or "C"
        elements.append(element)
        chains.append(line[21:22])
    coords = np.asarray(coords, dtype=np.float64).reshape(-1, 3)
    operators = _pdb_assembly(text)
    if not operators:
        return coords, elements
    chains = np.array(chains)
    out_coords, out_elements = [], []
    for chain_ids, matrix, shift in operators:
        keep = np.isin(chains, list(chain_ids)) if chain_ids else np.ones(len(chains), bool)
        out_coords.append(coords[keep] @ matrix.T + shift)
        out_elements.extend(e for e, k in zip(elements, keep, strict=True) if k)
    return np.concatenate(out_coords), out_elements


def _pdb_assembly(text: str) -> list[tuple[set, np.ndarray, np.ndarray]]:
    """Operators of biological assembly 1 (REMARK 350 BIOMT): (chains, 3x3 matrix, shift)."""
    operators: list = []
    chain_ids: set = set()
    rows: dict[int, list] = {}
    in_first = False
    for line in text.splitlines():
        if not line.startswith("REMARK 350"):
            continue
        body = line[10:].strip()
        if body.startswith("BIOMOLECULE:"):
            if in_first:
                break
            in_first = body.split(":")[1].strip() == "1"
        elif not in_first:
            continue
        elif body.startswith(("APPLY THE FOLLOWING TO CHAINS:", "AND CHAINS:")):
            if body.startswith("APPLY"):
                chain_ids = set()
            chain_ids |= {c.strip() for c in body.split(":", 1)[1].split(",") if c.strip()}
        elif body.startswith("BIOMT"):
            parts = body.split()
            try:
                row = int(parts[0][5]) - 1
                values = [float(v) for v in parts[2:6]]
            except (ValueError, IndexError):
                return []
            rows.setdefault(len(operators), [None, None, None])[row] = values
            if row == 2:
                matrix = np.array(rows.pop(len(operators)))
                operators.append((set(chain_ids), matrix[:, :3], matrix[:, 3]))
    return operators


_CIF_TOKEN = re.compile(r"'[^']*'|\"[^\"]*\"|\S+")


def _read_cif_atoms(text: str) -> tuple[list, list]:
    lines = text.splitlines()
    coords, elements = [], []
    i = 0
    while i < len(lines):
        if (
            lines[i].strip() == "loop_"
            and i + 1 < len(lines)
            and lines[i + 1].strip().startswith("_atom_site.")
        ):
            i += 1
            columns = []
            while i < len(lines) and lines[i].strip().startswith("_atom_site."):
                columns.append(lines[i].strip().split()[0][len("_atom_site.") :])
                i += 1
            index = {c: k for k, c in enumerate(columns)}
            if not {"Cartn_x", "Cartn_y", "Cartn_z"} <= index.keys():
                return coords, elements
            model_column = index.get("pdbx_PDB_model_num")
            first_model = None
            while i < len(lines):
                line = lines[i].strip()
                if not line or line.startswith(("loop_", "_", "#", "data_")):
                    break
                tokens = _CIF_TOKEN.findall(line)
                i += 1
                if len(tokens) < len(columns):
                    continue
                if model_column is not None:
                    first_model = first_model or tokens[model_column]
                    if tokens[model_column] != first_model:
                        continue
                try:
                    coords.append(
                        tuple(float(tokens[index[c]]) for c in ("Cartn_x", "Cartn_y", "Cartn_z"))
                    )
                except ValueError:
                    continue
                element = (
                    tokens[index["type_symbol"]].strip("'\"").upper()
                    if "type_symbol" in index
                    else "C"
                )
                elements.append(element)
            return coords, elements
        i += 1
    return coords, elements  # (the assembly of an mmCIF file is not generated)
