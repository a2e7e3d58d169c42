"""Protocols: a series is complete when what arrived matches what its headers declare, and a
study whose protocol's series are all complete is processed at once, not after a quiet time.

The node tests push over real associations; the quiet time is set long (60 s) wherever the
protocol rule is what must start the job.
"""

import copy
import io
import time

import pydicom
import pytest
from conftest import node_config, small_phantom, wait_until
from sqlalchemy import select

from node import db
from node.config import PROTOCOL_SERIES_KINDS, ConfigError, Protocol, config_from_dict
from node.demo_peers import push
from node.instances import instance_facts
from node.protocols import readiness, study_progress
from quant.enums import SeriesKind
from quant.pipeline import group_by_series
from quant.series import classify_series
from quant.synthetic.exam import exam_datasets, megre_datasets
from quant.synthetic.hand_phantom import hand_exam_datasets, make_hand_phantom
from quant.synthetic.mese_exam import mese_only_datasets
from quant.synthetic.phantom import phantom_datasets

THIGH = Protocol("thigh", "THIGH", ("dixon_water", "dixon_fat", "dixon_in_phase", "dixon_opposed_phase", "mese"))
DIXON_ONLY = Protocol("thigh-dixon", "THIGH", ("dixon_water", "dixon_fat", "dixon_in_phase", "dixon_opposed_phase"))


def as_received(ds):
    """``ds`` written and read back, as the SCP has it (string-typed values, no pixel decode)."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return pydicom.dcmread(io.BytesIO(buf.getvalue()))


def fact_rows(datasets):
    """The ``instances`` rows the node records for ``datasets``."""
    out = []
    for ds in datasets:
        ds = as_received(ds)
        row = instance_facts(ds)
        row.update(series_uid=str(ds.SeriesInstanceUID), sop_class_uid=str(ds.SOPClassUID))
        out.append(row)
    return out


def by_kind(progress):
    return {p.kind: p for p in progress}


def is_mese(ds):
    return str(ds.get("SeriesDescription", "")).startswith("se_mc")


# --------------------------------------------------------------------------- #
# Series recognition from recorded headers agrees with quant's                  #
# --------------------------------------------------------------------------- #

def _exams():
    ph = small_phantom(seed=41)
    dixon = phantom_datasets(ph, patient_id="KINDS", uid_seed="kinds")
    return {
        "dixon+classic MESE": exam_datasets(ph, patient_id="KINDS", uid_seed="kinds"),
        "dixon+Enhanced MESE": exam_datasets(ph, enhanced_mese=True, patient_id="KINDS", uid_seed="kinds"),
        "MEGRE magnitude+phase": megre_datasets(ph, dixon[0]),
        "MESE only (Siemens XA Enhanced)": mese_only_datasets(small_phantom(seed=42), enhanced=True, siemens=True),
        "hand with MESE": hand_exam_datasets(make_hand_phantom(shape=(4, 96, 144)), mese=True),
    }


@pytest.mark.parametrize("name", list(_exams()))
def test_recorded_headers_give_quants_series_kinds(name):
    datasets = _exams()[name]
    expected = {uid: classify_series(series).kind for uid, series in group_by_series(datasets).items()}
    got = {p.series_uid: p.kind for p in study_progress(fact_rows(datasets))}
    assert got == expected
    assert any(k is not SeriesKind.UNKNOWN for k in got.values())


# --------------------------------------------------------------------------- #
# Series completeness by declared counts                                       #
# --------------------------------------------------------------------------- #

def test_dixon_is_complete_at_images_in_acquisition():
    ph = small_phantom(seed=43)
    datasets = phantom_datasets(ph, uid_seed="iia")
    n = ph.water.shape[0]
    assert all(int(d.ImagesInAcquisition) == n for d in datasets)
    full = by_kind(study_progress(fact_rows(datasets)))
    assert full[SeriesKind.WATER].complete and full[SeriesKind.WATER].rule == f"Images in Acquisition {n}"
    partial = by_kind(study_progress(fact_rows([d for d in datasets if d.InstanceNumber != 3])))
    assert partial[SeriesKind.FAT].short and not partial[SeriesKind.FAT].complete
    assert (partial[SeriesKind.FAT].received, partial[SeriesKind.FAT].expected) == (n - 1, n)


def test_series_that_declares_nothing_is_never_complete_by_count():
    datasets = phantom_datasets(small_phantom(seed=44), uid_seed="undeclared")
    for d in datasets:
        del d.ImagesInAcquisition
    progress = study_progress(fact_rows(datasets))
    assert {p.expected for p in progress} == {None}
    assert not any(p.complete or p.short for p in progress)


def test_classic_mese_is_complete_with_every_echo_of_every_slice():
    ph = small_phantom(seed=45)
    mese = [d for d in exam_datasets(ph, uid_seed="mese") if is_mese(d)]
    n_echoes = int(mese[0].EchoTrainLength)
    n_slices = len({tuple(d.ImagePositionPatient) for d in mese})
    p = study_progress(fact_rows(mese))[0]
    assert p.kind is SeriesKind.MESE and p.complete
    assert p.expected == n_echoes * n_slices == len(mese)
    # echo by echo, the last echo half sent: short of the declared echoes x slices
    short = study_progress(fact_rows(mese[:-n_slices // 2]))[0]
    assert short.kind is SeriesKind.MESE and short.short
    # without Echo Train Length the distinct Echo Numbers count
    for d in mese:
        del d.EchoTrainLength
    assert study_progress(fact_rows(mese))[0].rule.startswith(f"{n_echoes} echoes (distinct Echo Numbers)")


def test_enhanced_mese_is_complete_with_its_declared_echoes():
    ph = small_phantom(seed=46)
    mese = [d for d in exam_datasets(ph, enhanced_mese=True, uid_seed="enh") if is_mese(d)]
    assert len(mese) == 17 and all(int(d.NumberOfFrames) > 1 for d in mese)   # one instance per echo
    p = study_progress(fact_rows(mese))[0]
    assert p.kind is SeriesKind.MESE and p.complete and p.expected == 17
    assert study_progress(fact_rows(mese[:16]))[0].short


def test_single_enhanced_instance_is_complete_with_its_frames():
    mese = mese_only_datasets(small_phantom(seed=47), enhanced=True, siemens=True)
    mese.sort(key=lambda d: int(d.InstanceNumber))
    p = study_progress(fact_rows(mese[:1]))[0]
    assert p.complete and p.expected == int(mese[0].NumberOfFrames)
    # from the third echo on it is a multi-echo spin echo: short until every declared echo is in
    p = study_progress(fact_rows(mese[:3]))[0]
    assert p.kind is SeriesKind.MESE and p.short and (p.received, p.expected) == (3, len(mese))


def test_readiness_by_protocol():
    ph = small_phantom(seed=48)
    datasets = exam_datasets(ph, uid_seed="ready")
    assert readiness([THIGH], fact_rows(datasets)).ready
    no_mese = [d for d in datasets if not is_mese(d)]
    verdict = readiness([THIGH], fact_rows(no_mese))
    assert not verdict.ready and "waiting for mese" in verdict.reason
    assert readiness([DIXON_ONLY], fact_rows(no_mese)).ready
    # all expected kinds complete, but another series still short of its declared count
    extra = [d for d in datasets if is_mese(d)][:-1]
    verdict = readiness([DIXON_ONLY], fact_rows(no_mese + extra))
    assert not verdict.ready and "still arriving" in verdict.reason
    calf = Protocol("calf", "CALF|LOWER LEG", THIGH.expects)
    verdict = readiness([calf], fact_rows(datasets))
    assert verdict.protocol is None and not verdict.ready
    # the first matching protocol decides; the match is searched, case-insensitive, in
    # Study Description, Series Description and Body Part Examined
    assert readiness([calf, Protocol("any", "muscle quant", ("mese",))], fact_rows(datasets)).protocol.name == "any"
    assert readiness([Protocol("se", r"^se_mc", ("mese",))], fact_rows(datasets)).ready


def test_reopened_study_waits_for_its_late_series_to_complete():
    datasets = exam_datasets(small_phantom(seed=49), uid_seed="reopened")
    rows = fact_rows(datasets)
    for row, ds in zip(rows, datasets, strict=True):
        row["received_at"] = 300.0 if is_mese(ds) else 100.0      # the MESE came after the first job (200)
    assert readiness([DIXON_ONLY], rows, reopened_at=200.0).ready
    first_echo = [r for r, ds in zip(rows, datasets, strict=True) if not is_mese(ds) or int(ds.EchoNumbers) == 1]
    verdict = readiness([DIXON_ONLY], first_echo, reopened_at=200.0)   # not yet multi-echo: declares nothing
    assert not verdict.ready and "still arriving (no count declared)" in verdict.reason
    assert readiness([DIXON_ONLY], first_echo).ready                  # on first arrival it would not block
    # a reader's SEG (one multi-frame instance) re-opens a processed study: ready at once
    dixon = [r for r, ds in zip(rows, datasets, strict=True) if not is_mese(ds)]
    seg = dict(dixon[0], series_uid="1.2.3.4", sop_class_uid="1.2.840.10008.5.1.4.1.1.66.4", header="",
               echo_times="", images_in_acquisition=0, n_frames=12, received_at=300.0)
    assert readiness([DIXON_ONLY], [*dixon, seg], reopened_at=200.0).ready


# --------------------------------------------------------------------------- #
# Configuration                                                                 #
# --------------------------------------------------------------------------- #

def test_protocols_config_is_read():
    config = config_from_dict({"protocols": [{"name": "thigh", "match": "THIGH", "expects": list(THIGH.expects)}]})
    assert config.protocols == (THIGH,)
    assert THIGH.kinds == {SeriesKind.WATER, SeriesKind.FAT, SeriesKind.IN_PHASE, SeriesKind.OPPOSED_PHASE,
                           SeriesKind.MESE}
    assert set(PROTOCOL_SERIES_KINDS.values()) == set(SeriesKind) - {SeriesKind.UNKNOWN}


@pytest.mark.parametrize("entry,key,words", [
    ({"name": "t", "match": "THIGH", "expects": ["dixon_watr"]}, "protocols[0].expects[0]",
     ["unknown series kind 'dixon_watr'", "did you mean 'dixon_water'", "known kinds: dixon_water"]),
    ({"name": "t", "match": "THIGH(", "expects": ["mese"]}, "protocols[0].match", ["not a valid regular expression"]),
    ({"name": "t", "match": "", "expects": ["mese"]}, "protocols[0].match", ["must not be empty"]),
    ({"name": "t", "match": "THIGH", "expects": []}, "protocols[0].expects", ["non-empty array"]),
    ({"name": "t", "match": "THIGH", "expects": "mese"}, "protocols[0].expects", ["non-empty array"]),
    ({"name": "t", "match": "THIGH", "expects": ["mese", "mese"]}, "protocols[0].expects[1]", ["listed twice"]),
    ({"name": "t", "match": "THIGH", "expects": ["mese"], "wait": 3}, "protocols[0].wait", ["unknown key"]),
    ({"name": "t", "expects": ["mese"]}, "protocols[0].match", ["required key missing"]),
    ({"name": 3, "match": "THIGH", "expects": ["mese"]}, "protocols[0].name", ["expected a string"]),
])
def test_bad_protocols_are_refused_naming_the_key(entry, key, words):
    with pytest.raises(ConfigError) as err:
        config_from_dict({"protocols": [entry]})
    assert err.value.key == key
    for word in words:
        assert word in err.value.problem


def test_protocol_names_are_unique():
    entry = {"name": "thigh", "match": "THIGH", "expects": ["mese"]}
    with pytest.raises(ConfigError, match="duplicate protocol name 'thigh'"):
        config_from_dict({"protocols": [entry, entry]})
    with pytest.raises(ConfigError, match="array of tables"):
        config_from_dict({"protocols": entry})


# --------------------------------------------------------------------------- #
# The node: start at once by protocol, quiet time as fallback                  #
# --------------------------------------------------------------------------- #

def jobs(node):
    with node.engine.begin() as conn:
        return conn.execute(select(db.jobs).order_by(db.jobs.c.id)).all()


def study(node):
    with node.engine.begin() as conn:
        return conn.execute(select(db.studies)).one()


def test_matching_study_starts_at_once_and_an_incomplete_series_does_not(make_node, tmp_path):
    ph = small_phantom(seed=51)
    datasets = exam_datasets(ph, patient_id="PROTO", uid_seed="proto")
    node = make_node(node_config(tmp_path, complete_after=60.0, protocols=[THIGH]))
    held = [d for d in datasets if is_mese(d)][-3:]               # three instances of the last echo
    first = [d for d in datasets if d not in held]
    assert set(push(first, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    time.sleep(3.0)
    assert jobs(node) == [] and study(node).state == "receiving"   # MESE short: no start
    assert set(push(held, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}
    t_last = time.time()
    job = wait_until(lambda: (jobs(node) or [None])[0], timeout=20, what="the job")
    assert job.created_at - t_last < 3.0                             # not the 60 s quiet time
    with node.engine.begin() as conn:
        audit = conn.execute(select(db.audit.c.detail).where(db.audit.c.event == "study-complete")).scalars().all()
    assert audit and "by=protocol thigh" in audit[0]


def test_study_matching_no_protocol_falls_back_to_the_quiet_time(make_node, tmp_path):
    ph = small_phantom(seed=52)
    datasets = phantom_datasets(ph, patient_id="NOPROTO", uid_seed="noproto")
    calf = Protocol("calf", "CALF", DIXON_ONLY.expects)
    node = make_node(node_config(tmp_path, complete_after=3.0, protocols=[calf]))
    push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    t_last = time.time()
    job = wait_until(lambda: (jobs(node) or [None])[0], timeout=20, what="the job")
    assert job.created_at - t_last >= 2.9                              # after the quiet time, not before


def test_late_series_reopens_the_study_and_starts_it_again_when_complete(make_node, tmp_path):
    ph = small_phantom(seed=53)
    datasets = exam_datasets(ph, patient_id="LATESERIES", uid_seed="lateseries")
    dixon = [d for d in datasets if not is_mese(d)]
    mese = [d for d in datasets if is_mese(d)]
    node = make_node(node_config(tmp_path, complete_after=60.0, protocols=[DIXON_ONLY]))
    push(dixon, "127.0.0.1", node.port, called_ae="MUSCLENODE")
    wait_until(lambda: [j for j in jobs(node) if j.state in ("done", "skipped")], timeout=90, what="first job")
    # a T2 series five minutes later: the study re-opens, and waits while the series is short
    push(mese[: len(mese) // 2], "127.0.0.1", node.port, called_ae="MUSCLENODE")
    s = study(node)
    assert s.state == "receiving" and "re-opened" in s.message
    time.sleep(2.0)
    assert len(jobs(node)) == 1
    push(mese[len(mese) // 2:], "127.0.0.1", node.port, called_ae="MUSCLENODE")
    t_last = time.time()
    second = wait_until(lambda: (jobs(node) + [None, None])[1], timeout=20, what="the second job")
    assert second.revision == 2 and second.created_at - t_last < 3.0


def test_instances_record_what_their_headers_declare(make_node, tmp_path):
    ph = small_phantom(seed=54)
    datasets = exam_datasets(ph, patient_id="FACTS", uid_seed="facts", enhanced_mese=True)
    node = make_node(node_config(tmp_path, complete_after=60.0))
    push(copy.deepcopy(datasets), "127.0.0.1", node.port, called_ae="MUSCLENODE")
    with node.engine.begin() as conn:
        got = conn.execute(select(db.instances)).all()
    by_sop = {r.sop_uid: r for r in got}
    for ds in datasets:
        row = by_sop[str(ds.SOPInstanceUID)]
        if is_mese(ds):
            assert (row.n_frames, row.echo_train_length) == (int(ds.NumberOfFrames), 17)
            assert row.echo_times == f"{10.0 * int(ds.InstanceNumber):g}"
        else:
            assert (row.images_in_acquisition, row.n_frames) == (ph.water.shape[0], 1)
            assert row.slice_key.count("\\") == 2 and row.header.startswith("{")


def test_database_of_an_earlier_version_gets_the_new_instance_columns(tmp_path):
    import sqlite3

    from sqlalchemy import inspect
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as conn:   # the instances table as the version before protocols made it
        conn.execute("CREATE TABLE instances (id INTEGER PRIMARY KEY, sop_uid VARCHAR(64) NOT NULL UNIQUE, "
                     "study_uid VARCHAR(64) NOT NULL, series_uid VARCHAR(64) NOT NULL, "
                     "sop_class_uid VARCHAR(64) NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL, "
                     "received_at FLOAT NOT NULL, calling_ae VARCHAR(16) NOT NULL)")
        conn.execute("INSERT INTO instances VALUES (1, '1.2', '1.2.3', '1.2.3.4', '1.2.840.10008.5.1.4.1.1.4', "
                     "'x.dcm', 10, 1.0, 'SCANNER')")
    engine = db.make_engine(f"sqlite:///{path}")
    columns = {c["name"] for c in inspect(engine).get_columns("instances")}
    assert {"header", "echo_times", "images_in_acquisition", "echo_train_length", "temporal_positions",
            "echo_number", "temporal_position", "slice_key", "n_frames"} <= columns
    with engine.begin() as conn:
        old = dict(conn.execute(select(db.instances)).one()._mapping)
    progress = study_progress([old])[0]       # an old row declares nothing: the quiet time decides
    assert progress.kind is SeriesKind.UNKNOWN and progress.expected is None
    engine.dispose()
