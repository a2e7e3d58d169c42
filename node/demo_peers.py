"""Small DICOM clients used by the demo and tests: push datasets, and a tiny storage SCP
that plays PACS for the demo.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from .store import durable_write


def push(datasets: Iterable[Dataset], host: str, port: int, *, called_ae: str,
         calling_ae: str = "SCANNER") -> list[int]:
    """C-STORE ``datasets`` over one association; return the status of each."""
    datasets = list(datasets)
    ae = AE(ae_title=calling_ae)
    for cls in sorted({str(d.SOPClassUID) for d in datasets}):
        ae.add_requested_context(cls, ExplicitVRLittleEndian)
    assoc = ae.associate(host, port, ae_title=called_ae)
    if not assoc.is_established:
        raise ConnectionError(f"no association with {called_ae}@{host}:{port}")
    try:
        return [int(getattr(assoc.send_c_store(ds), "Status", 0xFFFF)) for ds in datasets]
    finally:
        assoc.release()


class MiniPACS:
    """A storage SCP that keeps what it receives in a folder (the demo's PACS)."""

    def __init__(self, folder: Path, ae_title: str = "DEMOPACS"):
        self.folder = Path(folder)
        self.ae = AE(ae_title=ae_title)
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:   # always set in pynetdicom's storage contexts
                self.ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.received: list[tuple[float, str, str, Path]] = []  # (time, modality, study uid, path)
        self._lock = threading.Lock()
        self.server: ThreadedAssociationServer | None = None

    def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port`` (0: any free port) in a background thread; returns the port."""
        server = self.ae.start_server(("127.0.0.1", port), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])
        if server is None:   # start_server returns None only when it blocks
            raise RuntimeError("pynetdicom did not start a background server")
        self.server = server
        return server.server_address[1]

    def stop(self) -> None:
        """Stop listening."""
        if self.server is not None:
            self.server.shutdown()

    def _store(self, event: evt.Event) -> int:
        ds = event.dataset
        path = self.folder / f"{ds.Modality}-{ds.SOPInstanceUID}.dcm"
        durable_write(path, event.encoded_dataset(include_meta=True), self.folder / ".tmp")
        with self._lock:
            self.received.append((time.time(), str(ds.Modality), str(ds.StudyInstanceUID), path))
        return 0x0000

    def received_of(self, modality: str, study_uid: str) -> list[Path]:
        """The files of every ``modality`` instance of ``study_uid`` received so far."""
        with self._lock:
            return [p for _, mod, st, p in self.received if mod == modality and st == study_uid]

    def wait_for(self, modality: str, study_uid: str, timeout: float, *,
                 after: float = 0.0) -> tuple[float, Path] | None:
        """The (arrival time, file) of the first ``modality`` instance of ``study_uid`` received
        (at or after the time ``after``), waiting up to ``timeout`` seconds for it; None if none came.
        """
        end = time.time() + timeout
        while time.time() < end:
            with self._lock:
                for t, mod, st, p in self.received:
                    if mod == modality and st == study_uid and t >= after:
                        return t, p
            time.sleep(0.1)
        return None


def reader_seg(sources: Sequence[Dataset], labels: np.ndarray, names: Mapping[int, str]) -> Dataset:
    """A reader's ROIs as a viewer sends them: a binary DICOM SEG (highdicom) of the label map
    ``labels`` on the series ``sources`` (in slice order), one MANUAL segment per label, with
    the generic property type "Skeletal muscle structure of lower limb" and ``names`` as labels.
    """
    import highdicom as hd
    from highdicom.sr import CodedConcept

    numbers = sorted(names)
    masks = np.stack([labels == n for n in numbers], axis=-1).astype(np.uint8)
    descs = [hd.seg.SegmentDescription(
        segment_number=i + 1, segment_label=names[n].replace("_", " "),
        segmented_property_category=CodedConcept("91723000", "SCT", "Anatomical Structure"),
        segmented_property_type=CodedConcept("102292000", "SCT", "Skeletal muscle structure of lower limb"),
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL, tracking_uid=hd.UID(),
        tracking_id=names[n].replace("_", " ")) for i, n in enumerate(numbers)]
    return hd.seg.Segmentation(
        source_images=list(sources), pixel_array=masks, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descs, series_instance_uid=hd.UID(), series_number=300, sop_instance_uid=hd.UID(),
        instance_number=1, manufacturer="Reader viewer", manufacturer_model_name="viewer", software_versions="1",
        device_serial_number="1", series_description="Reader ROIs")
