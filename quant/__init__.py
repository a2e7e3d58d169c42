"""Pure computation for musclenode: series recognition, volume assembly, kernels,
segmentation and metrics. Nothing in this package touches the network, the
database or the file system: numpy arrays and pydicom datasets in, numpy arrays
and frozen dataclasses out."""

ALGORITHM_VERSION = "musclenode-quant 0.1.0"
