"""Fetch OHIF Viewer 3's prebuilt ``dist/`` (npm package ``@ohif/app``, pinned) into
``.cache/ohif/<version>/dist`` of the repository, once.

Only the package's tarball is downloaded (no npm, no dependencies: ``dist/`` is a finished
web build), its sha512 checked against the registry's pinned integrity, and ``package/dist``
extracted into a temporary folder that is renamed into place at the end; a second run finds
the folder and returns at once. ``quickstart.sh test`` (CI) runs it; ``tests/test_ohif.py``
skips where the folder is missing.

    python tests/ohif/fetch.py          # prints the dist folder
"""

from __future__ import annotations

import base64
import hashlib
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path

VERSION = "3.13.2"
#: ``npm view @ohif/app@3.13.2 dist.integrity``
INTEGRITY = "sha512-WZdxmpmG7rqFgW9ZJLcbgr3XCtLi1KDNPoMaeY5PPe6j4G4fjEjjkycZM6C6Zk2F87BKxFfpq+jd5xXZB9E8EA=="
REGISTRY = os.environ.get("NPM_CONFIG_REGISTRY", "https://registry.npmjs.org").rstrip("/")
ROOT = Path(__file__).resolve().parents[2]
CACHE = ROOT / ".cache" / "ohif"


def dist_dir(version: str = VERSION) -> Path:
    return CACHE / version / "dist"


def fetch(version: str = VERSION, integrity: str = INTEGRITY, attempts: int = 3) -> Path:
    target = dist_dir(version)
    if (target / "index.html").exists():
        return target
    url = f"{REGISTRY}/@ohif/app/-/app-{version}.tgz"
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".fetch-") as tmp:
        tgz = Path(tmp) / "app.tgz"
        for attempt in range(1, attempts + 1):
            try:
                with urllib.request.urlopen(url, timeout=60) as r, open(tgz, "wb") as f:
                    shutil.copyfileobj(r, f, 1 << 20)
                break
            except OSError as e:
                if attempt == attempts:
                    raise RuntimeError(f"could not download {url}: {e}") from e
                time.sleep(2 * attempt)
        algo, _, want = integrity.partition("-")
        got = base64.b64encode(hashlib.new(algo, tgz.read_bytes()).digest()).decode()
        if got != want:
            raise RuntimeError(f"{url}: {algo} {got} is not the pinned {want}")
        out = Path(tmp) / "out"
        with tarfile.open(tgz) as tar:
            members = [m for m in tar.getmembers() if m.name.startswith("package/dist/")
                       and (m.isfile() or m.isdir()) and ".." not in Path(m.name).parts]
            if hasattr(tarfile, "data_filter"):   # Python >= 3.11.4 (Debian 12 has 3.11.2)
                tar.extractall(out, members=members, filter="data")
            else:
                tar.extractall(out, members=members)
        shutil.rmtree(target, ignore_errors=True)   # a half-written one (no index.html) from an older run
        (out / "package" / "dist").rename(target)
    return target


if __name__ == "__main__":
    t0 = time.time()
    path = fetch()
    print(f"OHIF {VERSION}: {path} ({time.time() - t0:.1f} s)", file=sys.stderr)
    print(path)
