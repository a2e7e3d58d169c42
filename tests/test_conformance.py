"""deploy/CONFORMANCE.md says what the code does: its SOP class and transfer syntax tables
are those the SCP accepts (node/scp.py), the SCU sends (node/send.py) and queries with
(node/history.py)."""

import io
import re
from pathlib import Path

import pytest
from conftest import free_port, small_phantom
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


def test_the_node_names_its_own_implementation_everywhere(make_node, tmp_path):
    """Section 3.2.1.2: the node's Implementation Class UID and Version Name, not pynetdicom's,
    in its A-ASSOCIATE-AC (SCP), its A-ASSOCIATE-RQ (SCU) and the file meta of the files it
    writes: a received instance in the store and an object it made.
    """
    import pydicom
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import MRImageStorage  # type: ignore[attr-defined]
    from sqlalchemy import select

    from node import db
    from node.config import Destination
    from node.demo_peers import push
    from node.processing import encode
    from quant.synthetic.phantom import phantom_datasets
    from reports.uids import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

    text = CONFORMANCE.read_text()
    assert f"`{IMPLEMENTATION_CLASS_UID}`" in text and f"`{IMPLEMENTATION_VERSION_NAME}`" in text
    assert len(IMPLEMENTATION_VERSION_NAME) <= 16

    node = make_node(complete_after=3600)
    ae = AE(ae_title="CHECKER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="MUSCLENODE")
    assert assoc.is_established
    assert assoc.acceptor.implementation_class_uid == IMPLEMENTATION_CLASS_UID
    assert assoc.acceptor.implementation_version_name == IMPLEMENTATION_VERSION_NAME
    assoc.release()

    port = free_port()
    datasets = phantom_datasets(small_phantom(shape=(2, 32, 48)), uid_seed="implementation")[:2]
    assert push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE") == [0, 0]
    with node.engine.connect() as conn:
        stored = conn.execute(select(db.instances.c.path)).scalars().all()
    meta = pydicom.dcmread(stored[0]).file_meta
    assert (meta.ImplementationClassUID, meta.ImplementationVersionName) == (IMPLEMENTATION_CLASS_UID,
                                                                           IMPLEMENTATION_VERSION_NAME)
    assert meta.SourceApplicationEntityTitle.strip()   # the sender's AE title

    made = pydicom.dcmread(io.BytesIO(encode(datasets[0]))).file_meta
    assert made.ImplementationClassUID == IMPLEMENTATION_CLASS_UID

    seen = []
    pacs = AE(ae_title="PACS")
    pacs.add_supported_context(MRImageStorage)
    server = pacs.start_server(("127.0.0.1", port), block=False, evt_handlers=[
        (evt.EVT_C_STORE, lambda event: (seen.append((event.assoc.requestor.implementation_class_uid,
                                                      event.assoc.requestor.implementation_version_name)), 0)[1])])
    try:
        errors = send.store_files(Destination(name="pacs", ae_title="PACS", host="127.0.0.1", port=port),
                                  [stored[0]], calling_ae="MUSCLENODE", timeout=10)
    finally:
        server.shutdown()
    assert errors == {stored[0]: ""} and seen == [(IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME)]
