"""Particle readers against damaged copies of real files: a table or one CryocapsError, never
another exception.

The real files in ../shared/data/real_files (RELION 3/4/5, Warp, STOPGAP, Dynamo) are
read in place; the long ones are cut to their first lines, which keeps every header.
Hypothesis damages them three ways:

- **column shuffles** of every STAR loop (names and values moved together) and row
  shuffles of Dynamo tables (whose columns are positional): the same particles;
- **truncation** at any byte: a CryocapsError, or the rows before the cut exactly as in
  the whole file (only the last row may have lost digits);
- **byte edits** (replaced, inserted, deleted; often separators, signs, digits, the
  letters of nan and inf): a CryocapsError, or a table with the canonical columns and
  finite positions.

The suite runs a few examples per file with a fixed seed; ``CRYOCAPS_FUZZ_EXAMPLES=500``
searches further.
"""

from __future__ import annotations

import functools
import os
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from cryocaps.errors import CryocapsError
from cryocaps.io.particles import read_particles, tomogram_infos

REAL_FILES = Path(__file__).resolve().parents[2] / "shared" / "data" / "real_files"
LINES_KEPT = 60  # of each file: every header, and enough rows to damage
EXAMPLES = int(os.environ.get("CRYOCAPS_FUZZ_EXAMPLES", "8"))
SEARCHING = "CRYOCAPS_FUZZ_EXAMPLES" in os.environ
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,  # nothing written into the repository
    derandomize=not SEARCHING,  # the suite: the same examples every run
    # the suite reports a failing example as drawn (shrinking one costs minutes)
    phases=list(Phase) if SEARCHING else [Phase.explicit, Phase.generate],
    suppress_health_check=[HealthCheck.too_slow],
)
PARTICLE_FILES = [
    "relion5/cylindra_picks_particles.star",
    "relion5/cylindra_refine3d_run_it050_data.star",
    "relion5/cylindra_class3d_run_it025_data.star",
    "relion34/cryocat_relion4_pseudosubtomo.star",
    "relion34/cryocat_relion30_warp.star",
    "relion34/cryocat_warp2_tm_particles.star",
    "relion34/czportal_relion3_origin_px.star",
    "stopgap/czportal_stopgap_motl.star",
    "dynamo/dynamotable_t_double.tbl",
    "dynamo/dynamotable_t_complex.tbl",
    "dynamo/cryocat_b4_26col.tbl",
    "dynamo/dynamo2m_example.tbl",
]
COORDINATES = ["x", "y", "z"]
# bytes that keep a file parseable but change what it says: separators, signs, exponents,
# the letters of nan and inf, comment and label marks
TELLING_BYTES = list(b" \t\n.-+eE0123456789naifNI#_'\"")


@functools.cache
def original(name: str) -> bytes:
    if not REAL_FILES.is_dir():
        pytest.skip("../shared/data/real_files not present")
    lines = (REAL_FILES / name).read_bytes().splitlines(keepends=True)
    return b"".join(lines[:LINES_KEPT])


@functools.cache
def cylindra_tomograms() -> tuple:
    return tuple(tomogram_infos([REAL_FILES / "relion5" / "cylindra_tomograms.star"]))


@functools.cache
def expected(name: str) -> pd.DataFrame:
    """The kept lines of ``name``, read undamaged."""
    return read(name, original(name))


def read(name: str, content: bytes) -> pd.DataFrame:
    """``content`` read as the file ``name`` is (RELION 5 with its tomograms.star)."""
    tomograms = list(cylindra_tomograms()) if name.startswith("relion5/") else None
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / Path(name).name
        path.write_bytes(content)
        return read_particles(path, tomograms=tomograms)


def read_or_refuse(name: str, content: bytes) -> pd.DataFrame | None:
    """The table, or None for a CryocapsError; any other exception fails the test."""
    try:
        table = read(name, content)
    except CryocapsError as error:
        assert "\n" not in str(error).strip(), str(error)
        return None
    assert {"tomo", "class_name", *COORDINATES, "score"} <= set(table.columns)
    assert np.isfinite(table[COORDINATES].to_numpy(dtype=float)).all(), table
    return table


def assert_same_rows(table: pd.DataFrame, expected: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(
        table.reset_index(drop=True),
        expected.reset_index(drop=True)[table.columns],
        check_dtype=False,
        check_exact=False,
        rtol=1e-9,
    )


@pytest.mark.parametrize("name", PARTICLE_FILES)
def test_the_kept_lines_are_read(name):
    assert len(expected(name)) > 0


@pytest.mark.parametrize("name", PARTICLE_FILES)
@FUZZ
@given(data=st.data())
def test_shuffled_columns_or_rows_give_the_same_particles(name, data):
    content = original(name)
    whole = expected(name)
    if name.endswith(".tbl"):
        lines = content.splitlines(keepends=True)
        order = data.draw(st.permutations(range(len(lines))), label="rows")
        shuffled = b"".join(lines[k].rstrip(b"\n") + b"\n" for k in order)
        table = read(name, shuffled)
        key = ["tomo", *COORDINATES]
        assert_same_rows(
            table.sort_values(key, ignore_index=True), whole.sort_values(key, ignore_index=True)
        )
    else:
        table = read(name, shuffle_star_columns(content, data))
        assert_same_rows(table, whole)


@pytest.mark.parametrize("name", PARTICLE_FILES)
@FUZZ
@given(data=st.data())
def test_a_truncated_file_keeps_its_first_rows_or_is_refused(name, data):
    content = original(name)
    cut = data.draw(st.integers(0, len(content) - 1), label="cut")
    table = read_or_refuse(name, content[:cut])
    if table is not None and len(table) > 1:
        whole = expected(name)
        assert len(table) <= len(whole)
        assert_same_rows(table.iloc[:-1], whole.iloc[: len(table) - 1])


@pytest.mark.parametrize("name", PARTICLE_FILES)
@FUZZ
@given(data=st.data())
def test_edited_bytes_give_a_table_or_one_error(name, data):
    content = bytearray(original(name))
    for _ in range(data.draw(st.integers(1, 4), label="edits")):
        position = data.draw(st.integers(0, len(content) - 1), label="at")
        byte = data.draw(st.one_of(st.sampled_from(TELLING_BYTES), st.integers(0, 255)))
        edit = data.draw(st.sampled_from(["replace", "insert", "delete"]), label="edit")
        if edit == "replace":
            content[position] = byte
        elif edit == "insert":
            content.insert(position, byte)
        else:
            del content[position]
    read_or_refuse(name, bytes(content))


def shuffle_star_columns(content: bytes, data) -> bytes:
    """Every ``loop_`` of a STAR file with its columns in an order drawn from ``data``: the
    names (renumbered ``#k``) and each row's values move together."""
    lines = content.decode().splitlines()
    out, k = [], 0
    while k < len(lines):
        out.append(lines[k])
        if lines[k].strip() != "loop_":
            k += 1
            continue
        k += 1
        names = []
        while k < len(lines) and lines[k].strip().startswith("_"):
            names.append(lines[k].split()[0])
            k += 1
        while k < len(lines) and not lines[k].strip():  # blank lines before the rows
            k += 1
        rows = []
        while (
            k < len(lines)
            and lines[k].strip()
            and not lines[k].lstrip().startswith(("data_", "loop_", "_", "#"))
        ):
            rows.append(lines[k].split())
            k += 1
        order = data.draw(st.permutations(range(len(names))), label="columns")
        out += [f"{names[i]} #{n + 1}" for n, i in enumerate(order)]
        out += [" ".join(row[i] for i in order) for row in rows]
    return ("\n".join(out) + "\n").encode()
