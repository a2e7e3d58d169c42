"""Helpers that check DICOM files with external tools (dicom3tools, dcmqi).

Each helper skips the calling test (``pytest.skip``) when its tool is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DCIODVFY = "/usr/bin/dciodvfy"


def _tool(name: str, *candidates: str) -> str:
    """Path of an executable: the candidates, the Python environment's bin, then PATH."""
    here = Path(sys.executable).parent
    for c in (*candidates, str(here / name)):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"{name} is not installed")
    return found


def dciodvfy_lines(path) -> list[str]:
    """All output lines of dciodvfy for one file (it always exits 0)."""
    exe = _tool("dciodvfy", DCIODVFY)
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=300)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]


def dciodvfy_errors(path) -> list[str]:
    """The ``Error`` lines dciodvfy reports for one file (empty: valid)."""
    return [line for line in dciodvfy_lines(path) if line.startswith("Error")]


def dciodvfy_warnings(path) -> list[str]:
    """The ``Warning`` lines dciodvfy reports for one file."""
    return [line for line in dciodvfy_lines(path) if line.startswith("Warning")]


def dcmqi_seg_readback(seg_path, out_dir) -> list[Path]:
    """Convert a DICOM SEG to images with dcmqi's ``segimage2itkimage``.

    Returns
    -------
    list of Path
        The files written (one image per segment, ``*.nrrd``, and the ``meta.json``),
        sorted.

    Raises
    ------
    RuntimeError
        The tool failed (its exit status and stderr are in the message).
    """
    exe = _tool("segimage2itkimage")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([exe, "--inputDICOM", str(seg_path), "--outputDirectory", str(out_dir)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise RuntimeError(f"segimage2itkimage failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return sorted(p for p in out_dir.iterdir() if p.is_file())


def tid1500_readback(sr_path, out_json) -> dict:
    """Read a TID 1500 SR with dcmqi's ``tid1500reader`` and load its JSON.

    Raises
    ------
    RuntimeError
        The tool failed or wrote no JSON.
    """
    exe = _tool("tid1500reader")
    out_json = Path(out_json)
    proc = subprocess.run([exe, "--inputDICOM", str(sr_path), "--outputMetadata", str(out_json)],
                          capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 or not out_json.is_file():
        raise RuntimeError(f"tid1500reader failed (exit {proc.returncode}): "
                           f"{proc.stderr.strip() or proc.stdout.strip()}")
    return json.loads(out_json.read_text())


def at_precision(value: float, metric: str, kind: str = ""):
    """``value`` as the SR writes it: rounded to the metric's precision (reports.precision),
    compared within half a unit of the last decimal (a change computed from unrounded
    values may round the other way).
    """
    from reports import precision
    return pytest.approx(precision.rounded(value, metric, kind), abs=0.5 * 10.0 ** -precision.decimals(metric, kind)
                         + 1e-9)
