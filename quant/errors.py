"""Exceptions raised by :mod:`quant`. Each names the attribute or input at fault."""


class QuantError(Exception):
    """Base class of every error raised by :mod:`quant`."""


class SeriesError(QuantError):
    """A series cannot be used as it is (missing attribute, mixed geometry...)."""


class GeometryError(SeriesError):
    """Slices of one series do not form a regular volume."""


class SegmentationError(QuantError):
    """The automatic segmentation found no usable anatomy."""


class RoiSetError(QuantError):
    """A reader's ROI set (a DICOM SEG) cannot be used: the reason is the message (the node
    quarantines the object with it).
    """
