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
