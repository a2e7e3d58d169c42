"""Rates of change and time points in the SR (issue 12, item 3): each compared value carries
its annualised change since baseline, each group a Time Point Context (the Clinical Trial
Time Point ID, else a label from the days since baseline), and earlier values of another
algorithm version are flagged, not compared."""

from __future__ import annotations

import datetime as dt

import highdicom as hd
import pytest

from node.processing import build_outputs, prior_key
from quant import ALGORITHM_VERSION
from quant.enums import Region
from quant.synthetic.phantom import make_leg_phantom, phantom_datasets
from reports.longitudinal import PriorValue


@pytest.fixture(scope="module")
def visit():
    ph = make_leg_phantom(Region.THIGH, shape=(4, 96, 160), supersample=2, seed=5)
    return phantom_datasets(ph, study_date="20260701", uid_seed="timepoints")


def _priors(value: float, version: str) -> dict:
    return {prior_key("thigh", side, "csa_mm2"): [PriorValue("1.2.3", dt.date(2026, 1, 1), value, version)]
            for side in ("right", "left")}


def _groups(sr):
    read = hd.sr.Comprehensive3DSR.from_dataset(sr, copy=True)
    return {g.tracking_identifier: g for g in read.content.get_volumetric_roi_measurement_groups()}


def _text(ds) -> str:
    return str(ds)


def test_annualised_change_and_time_point(visit, tmp_path):
    from validators import dciodvfy_errors
    out = build_outputs(visit, _priors(9000.0, ALGORITHM_VERSION))
    g = _groups(out.sr)["right thigh muscle"]
    values = {m.name.meaning: m for m in g.get_measurements()}
    change, days = float(values["Change in area since baseline"].value), 181
    assert float(values["Interval since baseline"].value) == days   # once per group
    assert not [k for k in values if k.startswith("Interval since baseline (")]
    rate = values["Annualised change in area since baseline"]
    # both rounded to 1 mm2: the rate within half a unit, plus the change's rounding scaled to a year
    assert float(rate.value) == pytest.approx(change / (days / 365.25), abs=0.5 * (1 + 365.25 / days) + 1e-9)
    assert rate.unit.value == "mm2/a"
    text = _text(out.sr)
    assert "Time Point" in text and "day 181" in text
    path = tmp_path / "sr.dcm"
    out.sr.save_as(path, enforce_file_format=True)
    assert dciodvfy_errors(path) == []
    hd.sr.srread(path)


def test_trial_time_point_id_names_the_visit(visit):
    for ds in visit:
        ds.ClinicalTrialTimePointID = "M6"
    try:
        out = build_outputs(visit, _priors(9000.0, ALGORITHM_VERSION))
    finally:
        for ds in visit:
            del ds.ClinicalTrialTimePointID
    text = _text(out.sr)
    assert "M6" in text and "day 181" not in text


def test_values_of_another_algorithm_version_are_not_compared(visit):
    out = build_outputs(visit, _priors(9000.0, "musclenode-quant 0.0.1"))
    g = _groups(out.sr)["right thigh muscle"]
    names = {m.name.meaning for m in g.get_measurements()}
    assert not any("since baseline" in n for n in names)
    flags = [e.value.meaning for e in g.get_qualitative_evaluations()]
    assert "Not compared: measured by another algorithm version" in flags


def test_a_method_only_under_what_it_made(visit):
    out = build_outputs(visit)
    g = _groups(out.sr)["right thigh muscle"]
    by_name = {m.name.meaning: m for m in g.get_measurements()}
    assert by_name["Area"].method is None and by_name["Volume"].method is None
    assert "Dixon" in by_name["Fat fraction"].method.meaning
