"""A disk cache of computed arrays (e.g. EPG dictionaries) shared by the node's workers.

Entries are ``.npz`` files named by a key (a hash of what made them), written
atomically, so concurrent workers either find a whole entry or build their own.
"""

from __future__ import annotations

import io
import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

from .store import durable_write

log = logging.getLogger(__name__)
_KEY = re.compile(r"^[A-Za-z0-9_.-]{1,200}$")


class ArrayCache:
    """Arrays stored in ``folder`` as ``<key>.npz``, one entry per key."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)

    def path(self, key: str) -> Path:
        """The file of entry ``key``; ValueError if the key is not a safe file name."""
        if not _KEY.match(key):
            raise ValueError(f"cache key {key!r} has characters other than letters, digits, '_', '.', '-'")
        return self.folder / f"{key}.npz"

    def get_or_build(self, key: str, build: Callable[[], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """The arrays stored under ``key``, building and storing them on a miss."""
        path = self.path(key)
        if path.exists():
            try:
                with np.load(path, allow_pickle=False) as data:
                    return {k: data[k] for k in data.files}
            except (OSError, ValueError) as exc:  # a damaged entry is rebuilt
                log.warning("cache entry %s unreadable (%s): rebuilding", path.name, exc)
        arrays = build()
        buf = io.BytesIO()
        np.savez(buf, allow_pickle=True, **arrays)
        durable_write(path, buf.getvalue(), self.folder / ".tmp")
        return arrays
