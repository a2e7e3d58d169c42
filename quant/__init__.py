"""Pure computation for musclenode: series recognition, volume assembly, kernels,
segmentation and metrics. Nothing in this package touches the network, the
database or the file system: numpy arrays and pydicom datasets in, numpy arrays
and frozen dataclasses out.
"""

__version__ = "0.1.0"
"""The one version of musclenode (pyproject.toml reads it from here)."""

ALGORITHM_VERSION = f"musclenode-quant {__version__}"
"""Recorded with every measurement and in every SEG and SR; part of the derived output UIDs."""
