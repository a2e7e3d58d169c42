"""Pure computation for musclenode: series recognition, volume assembly, kernels,
segmentation and metrics. Nothing in this package touches the network, the
database or the file system: numpy arrays and pydicom datasets in, numpy arrays
and frozen dataclasses out.
"""

import os

# numba's parallel kernels (OpenMP layer) start a parallel region per step of some fits (the
# region fat fraction: one per profile evaluation, about 200 per study). OpenMP's default
# lets idle threads spin between regions; on a machine whose cores are busy with anything
# else (the node's own ingest, another tenant) the spinning threads take the cores the
# working ones need, and that fit took 4-10 s instead of 1 s. Waiting threads sleep instead
# (passive); on an idle machine it costs nothing measurable. A deployment may set it otherwise.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# OpenBLAS (numpy's LAPACK) splits even the small SVD of the T2 dictionary (4392 x 17) across
# threads: beside numba's kernels, or on a busy machine, that took 0.15-0.47 s a call against
# 1-3 ms on one thread (the same result, bit for bit). Read when numpy loads: ``node`` imports
# this package first for that reason.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

__version__ = "0.1.0"
"""The one version of musclenode (pyproject.toml reads it from here)."""

ALGORITHM_VERSION = f"musclenode-quant {__version__}"
"""Recorded with every measurement and in every SEG and SR; part of the derived output UIDs."""
