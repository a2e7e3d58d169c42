"""End to end: DCMTK storescu plays the scanner, a real Orthanc is the PACS; two visits of
one subject go through the node (process pool workers); Orthanc must hold a valid SEG and
SR for each visit with the right values, and the second SR the change since the first.
Processing starts by the thigh protocol (the quiet time is set far longer than the test waits)."""

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from conftest import VISIT_T2, wait_until, write_datasets
from validators import dciodvfy_errors, dcmqi_seg_readback, tid1500_readback

from node import db, send
from node.config import Destination
from node.demo import THIGH_PROTOCOL
from quant.enums import Side

pytestmark = pytest.mark.skipif(not Path("/usr/bin/storescu").exists() or not Path("/usr/sbin/Orthanc").exists(),
                                reason="needs DCMTK and Orthanc (apt-get install dcmtk orthanc)")


def sr_numbers(ds) -> list[tuple[str, str, float, str, str, str]]:
    """(group tracking identifier, concept meaning, value, unit, derivation, method) of
    every NUM item."""
    out = []

    def modifier(item, meaning):
        for c in item.get("ContentSequence", []):
            if c.ValueType == "CODE" and c.ConceptNameCodeSequence[0].CodeMeaning == meaning:
                return c.ConceptCodeSequence[0].CodeMeaning
        return ""

    def walk(items, group):
        for it in items:
            name = it.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in it else ""
            if it.ValueType == "NUM" and "MeasuredValueSequence" in it and it.MeasuredValueSequence:
                mv = it.MeasuredValueSequence[0]
                out.append((group, name, float(mv.NumericValue), mv.MeasurementUnitsCodeSequence[0].CodeValue,
                            modifier(it, "Derivation"), modifier(it, "Measurement Method")))
            if "ContentSequence" in it:
                sub_group = group
                if it.ValueType == "CONTAINER":
                    sub_group = next((c.TextValue for c in it.ContentSequence if c.ValueType == "TEXT"
                                      and c.ConceptNameCodeSequence[0].CodeMeaning == "Tracking Identifier"), group)
                walk(it.ContentSequence, sub_group)
    walk(ds.ContentSequence, "")
    return out


def value(nums, group, name, derivation=None, method_word=None):
    found = [v for g, n, v, _, d, m in nums if g == group and n == name
             and (derivation is None or d == derivation) and (method_word is None or method_word in m)]
    assert len(found) == 1, (group, name, derivation, method_word, found)
    return found[0]


def test_two_visits_through_node_to_orthanc(make_node, orthanc, thigh_visits, tmp_path):
    dest = Destination("pacs", orthanc.aet, "127.0.0.1", orthanc.dicom_port)
    node = make_node(destinations=[dest], executor="process", complete_after=60.0, protocols=[THIGH_PROTOCOL])
    results = []
    for n, (phantom, datasets) in enumerate(thigh_visits, start=1):
        files = write_datasets(datasets, tmp_path / f"visit{n}")
        r = subprocess.run(["/usr/bin/storescu", "-aec", "MUSCLENODE", "-aet", "SCANNER", "127.0.0.1",
                            str(node.port), *map(str, files)], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        t_last = time.time()
        study_uid = str(datasets[0].StudyInstanceUID)

        def arrived(study_uid=study_uid):
            found = {}
            for inst in orthanc.instances_of_study(study_uid):
                tags = orthanc.get(f"/instances/{inst['ID']}/simplified-tags")
                found[tags["Modality"]] = inst["ID"]
            return found if {"SEG", "SR"} <= set(found) else None
        found = wait_until(arrived, timeout=240, interval=0.3, what=f"SEG and SR of visit {n} in Orthanc")
        latency = time.time() - t_last
        assert latency < 60.0   # started by the protocol, not by the quiet time
        paths = {}
        for mod, iid in found.items():
            paths[mod] = tmp_path / f"visit{n}-{mod}.dcm"
            paths[mod].write_bytes(orthanc.file(iid))
        results.append((phantom, paths, latency))

    # what the node sent is what deploy/CONFORMANCE.md lists (tests/test_conformance.py)
    with node.engine.begin() as conn:
        made = conn.execute(db.select(db.outputs.c.path)).scalars().all()
    assert made and {str(pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID) for p in made} \
        <= set(send.SENT_SOP_CLASSES)

    for n, (phantom, paths, latency) in enumerate(results, start=1):
        for mod in ("SEG", "SR"):
            assert dciodvfy_errors(paths[mod]) == [], f"visit {n} {mod}"
        assert dcmqi_seg_readback(paths["SEG"], tmp_path / f"dcmqi-seg-{n}")
        meta = tid1500_readback(paths["SR"], tmp_path / f"sr-{n}.json")
        ids = [g["TrackingIdentifier"] for g in meta["Measurements"]]
        # each leg, and each automatic compartment of each leg: volumetric, and planar on the key slice
        assert len([i for i in ids if not i.endswith("key slice")]) == 8 and len(ids) == 16
        sr = pydicom.dcmread(paths["SR"])
        assert (sr.ConceptNameCodeSequence[0].CodeValue, sr.ConceptNameCodeSequence[0].CodingSchemeDesignator) \
            == ("126000", "DCM")
        nums = sr_numbers(sr)
        for side in (Side.RIGHT, Side.LEFT):
            group = f"{side.value} thigh muscle"
            csa = value(nums, group, "Area")
            ff = value(nums, group, "Fat fraction", method_word="Dixon")
            assert csa == pytest.approx(phantom.truth[(side, "csa_mm2")], rel=0.03)
            assert abs(ff - phantom.truth[(side, "ff_percent")]) < 1.0
            # water T2 from the MESE series (visit 2's came as Enhanced MR, one instance per echo)
            t2 = value(nums, group, "T2", derivation="Median")
            assert abs(t2 - VISIT_T2[n - 1]) < 0.6
            ff_t2 = value(nums, group, "Fat fraction", method_word="extended phase graph")
            assert abs(ff_t2 - phantom.truth[(side, "ff_percent")]) < 1.0
            changes = [(name, v) for g, name, v, *_ in nums if g == group and "since baseline" in name.lower()]
            if n == 1:
                assert not changes
            else:
                truth_change = phantom.truth[(side, "csa_mm2")] - results[0][0].truth[(side, "csa_mm2")]
                area_change = value(nums, group, "Change in area since baseline")
                assert area_change == pytest.approx(truth_change, rel=0.1, abs=30)
                t2_change = value(nums, group, "Change in water T2 since baseline")
                assert t2_change == pytest.approx(VISIT_T2[1] - VISIT_T2[0], abs=0.8)
                assert value(nums, group, "Interval since baseline") == 182
        print(f"visit {n}: last instance -> SR in Orthanc {latency:.1f} s (protocol rule)")
