"""Deterministic DICOM UIDs for the objects musclenode writes.

Re-running the node on the same inputs must give the same SEG and SR instances (so a
PACS sees a repeat, not a new object), hence every UID is derived from what the object
is made of rather than drawn at random.

Note: ``pydicom.uid.generate_uid(prefix=None, entropy_srcs=...)`` is *not* usable for
this: with ``prefix=None`` pydicom ignores ``entropy_srcs`` and returns a random UUID
(pydicom 3.0). We therefore build the ``2.25.<integer>`` form (ISO/IEC 9834-8, DICOM
PS3.5 B.2) from a name-based (version 5) UUID ourselves.
"""

from __future__ import annotations

import uuid

from pydicom.dataset import Dataset
from pydicom.uid import UID

from quant import __version__ as quant_version

#: Namespace of every musclenode name-based UUID.
MUSCLENODE_UUID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "urn:musclenode:dicom-uid")


def derive_uid(*parts: str) -> str:
    """A UID that depends only on ``parts``.

    The parts name a version-5 (SHA-1, name-based) UUID in the musclenode namespace,
    written as a UUID-derived UID ``2.25.<integer>``. Each part is length-prefixed,
    so ``("ab", "c")`` and ``("a", "bc")`` give different UIDs.

    Parameters
    ----------
    *parts : str
        What identifies the object, e.g. ``(study_uid, "seg", algorithm_version,
        *source_sop_uids)``. At least one part; every part must be a ``str``.

    Returns
    -------
    str
        A valid UID of at most 64 characters.

    Raises
    ------
    ValueError
        No parts were given, or a part is not a string.

    Examples
    --------
    >>> derive_uid("1.2.3", "seg") == derive_uid("1.2.3", "seg")
    True
    >>> derive_uid("1.2.3", "seg").startswith("2.25.")
    True
    """
    if not parts:
        raise ValueError("derive_uid needs at least one part")
    for i, part in enumerate(parts):
        if not isinstance(part, str):
            raise ValueError(f"derive_uid part {i} must be a str, got {type(part).__name__}: {part!r}")
    name = "".join(f"{len(p)}:{p};" for p in parts)
    return f"2.25.{uuid.uuid5(MUSCLENODE_UUID_NAMESPACE, name).int}"


#: The node's Implementation Class UID (PS3.7 D.3.3.2): in its A-ASSOCIATE-AC and -RQ and in
#: the file meta of every file it writes. Fixed for the implementation; the version name changes.
IMPLEMENTATION_CLASS_UID = UID(derive_uid("musclenode", "implementation-class"))
#: Its Implementation Version Name (at most 16 characters).
IMPLEMENTATION_VERSION_NAME = f"MUSCLENODE_{quant_version}"[:16]


def subject_key(ds: Dataset) -> str:
    """Who a study belongs to, across visits: the one subject key of musclenode.

    The node files measurements under it, and the SR's tracking UIDs are derived from it,
    so a tracking UID stays the same across visits whoever builds the SR.

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
        Any instance of the study (only patient and clinical-trial attributes are read).

    Returns
    -------
    str
        ``trial:<Clinical Trial Sponsor Name>:<Clinical Trial Subject ID>`` when the
        study is part of a trial, else ``patient:<Issuer of Patient ID>:<Patient ID>``
        (``patient::`` when both are empty: the node still stores such instances).

    Examples
    --------
    >>> from pydicom.dataset import Dataset
    from pydicom.uid import UID
    >>> ds = Dataset(); ds.PatientID = "MN-0001"
    >>> subject_key(ds)
    'patient::MN-0001'
    """
    trial_subject = str(ds.get("ClinicalTrialSubjectID", "") or "").strip()
    if trial_subject:
        sponsor = str(ds.get("ClinicalTrialSponsorName", "") or "").strip()
        return f"trial:{sponsor}:{trial_subject}"
    patient = str(ds.get("PatientID", "") or "").strip()
    return f"patient:{str(ds.get('IssuerOfPatientID', '') or '').strip()}:{patient}"
