"""deploy/CONFORMANCE.md says what the code does: its SOP class and transfer syntax tables
are those the SCP accepts (node/scp.py), the SCU sends (node/send.py) and queries with
(node/history.py)."""

import re
from pathlib import Path

import pytest
from pydicom.uid import UID
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import history, send
from node.instances import ENHANCED_MR_IMAGE, KEPT_SOP_CLASSES, MR_IMAGE, SEGMENTATION
from node.scp import TRANSFER_SYNTAXES, Receiver

CONFORMANCE = Path(__file__).resolve().parents[1] / "deploy" / "CONFORMANCE.md"
_UID = re.compile(r"`([0-9]+(?:\.[0-9]+)+)`")


def table(name: str) -> list[list[str]]:
    """The rows (cells) of the table marked ``<!-- table: name -->``, header and rule left out."""
    text = CONFORMANCE.read_text()
    marker = f"<!-- table: {name} -->"
    assert text.count(marker) == 1, f"{marker} missing or repeated"
    lines = text[text.index(marker) + len(marker):].lstrip("\n").splitlines()
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip().strip("|").split("|")])
    assert len(rows) > 2, f"table {name} is empty"
    return rows[2:]


def uids(rows: list[list[str]], column: int = 1) -> list[str]:
    out = []
    for row in rows:
        m = _UID.fullmatch(row[column])
        assert m, f"not a UID in backticks: {row[column]!r}"
        out.append(m.group(1))
    return out


@pytest.fixture(scope="module")
def receiver(tmp_path_factory):
    """The SCP as the node builds it (no socket opened)."""
    class NoStore:
        pass
    return Receiver(NoStore(), "MUSCLENODE")  # type: ignore[arg-type]


def test_scp_storage_sop_classes_are_those_accepted(receiver):
    rows = table("scp-storage")
    listed = uids(rows)
    assert len(listed) == len(set(listed))
    accepted = {cx.abstract_syntax for cx in receiver.ae.supported_contexts} - {Verification}
    assert set(listed) == accepted
    for row, uid in zip(rows, listed, strict=True):
        assert row[0] == UID(uid).name, f"{uid} is {UID(uid).name}, not {row[0]}"


def test_scp_handling_column_matches_what_is_kept(receiver):
    for row, uid in zip(table("scp-storage"), uids(table("scp-storage")), strict=True):
        what = row[2]
        if uid in (MR_IMAGE, ENHANCED_MR_IMAGE):
            assert what == "stored; quantified"
        elif uid == SEGMENTATION:
            assert what.startswith("stored;") and "reader" in what
        elif uid in KEPT_SOP_CLASSES:
            assert what == "stored"
        else:
            assert what == "quarantined", uid


def test_scp_transfer_syntaxes_are_those_accepted(receiver):
    listed = uids(table("scp-transfer-syntaxes"))
    assert listed == [str(ts) for ts in TRANSFER_SYNTAXES]
    for cx in receiver.ae.supported_contexts:
        if cx.abstract_syntax != Verification:
            assert list(cx.transfer_syntax) == listed, cx.abstract_syntax
    for row, uid in zip(table("scp-transfer-syntaxes"), listed, strict=True):
        assert row[0] == UID(uid).name


def test_verification_is_accepted(receiver):
    assert uids(table("scp-verification")) == [Verification]
    assert Verification in {cx.abstract_syntax for cx in receiver.ae.supported_contexts}


def test_scu_storage_sop_classes_are_those_sent():
    listed = uids(table("scu-storage"))
    assert set(listed) == set(send.SENT_SOP_CLASSES) and len(listed) == len(set(listed))
    for row, uid in zip(table("scu-storage"), listed, strict=True):
        assert row[0] == UID(uid).name
    assert uids(table("scu-transfer-syntaxes")) == [str(ts) for ts in send.SENT_TRANSFER_SYNTAXES]


def test_scu_query_models_are_those_proposed():
    rows = table("scu-query")
    scu = [uid for row, uid in zip(rows, uids(rows), strict=True) if row[2] == "SCU"]
    scp = [uid for row, uid in zip(rows, uids(rows), strict=True) if row[2].startswith("SCP")]
    assert scu == [*history.FIND_MODELS, *history.GET_MODELS]
    assert scp == list(history.GET_SR_CLASSES)
    for row, uid in zip(rows, uids(rows), strict=True):
        assert row[0] == UID(uid).name
