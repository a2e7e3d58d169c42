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


class NeedsRoisError(QuantError):
    """A study of a region measured in a reader's ROIs only (hand, head-neck) came without a
    usable ROI set: the node waits for a reader's SEG. ``refusals`` lists (SOP Instance UID,
    reason) of the reader SEGs that were sent but cannot be used.
    """

    def __init__(self, message: str, refusals: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.refusals = tuple(refusals)
