"""The ``musclenode`` command as a user runs it (subprocesses)."""

import csv
import os
import subprocess
import sys
from pathlib import Path

from conftest import VISIT_T2, write_datasets

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, timeout=300):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "node.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def test_process_writes_seg_sr_and_csv(thigh_visits, tmp_path):
    (phantom, datasets), _ = thigh_visits
    src = tmp_path / "in"
    write_datasets(datasets, src)
    (src / "notes.txt").write_text("not DICOM")                     # skipped with a reason
    r = run("process", str(src), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "notes.txt: not a readable DICOM file" in r.stderr
    out = tmp_path / "out"
    assert len(list(out.glob("seg-*.dcm"))) == 1 and len(list(out.glob("sr-*.dcm"))) == 1
    with open(out / "measurements.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0]) == ["study_uid", "region", "roi", "source", "side", "metric", "value", "unit", "model",
                             "flags"]
    assert {(r["roi"], r["source"]) for r in rows} == {("", "automatic")}   # whole-region values
    assert len(rows) == 18    # 4 Dixon and 5 water-T2 metrics per leg
    truth = {(s.value, m): v for (s, m), v in phantom.truth.items()}
    for row in rows:
        assert row["study_uid"] == datasets[0].StudyInstanceUID and row["region"] == "thigh"
        metric, value = row["metric"], float(row["value"])
        if metric in ("csa_mm2", "vol_ml", "frma_mm2"):
            assert abs(value - truth[(row["side"], metric)]) < 0.03 * truth[(row["side"], metric)]
        elif metric in ("ff_percent", "ff_t2_percent"):
            assert abs(value - truth[(row["side"], "ff_percent")]) < 1.0
        elif metric == "t2w_ms":
            assert abs(value - VISIT_T2[0]) < 0.6
        assert row["model"] == ("dixon-rician-ml" if metric in ("csa_mm2", "vol_ml", "ff_percent", "frma_mm2")
                                else "epg-bicomponent")
    assert {r["unit"] for r in rows} == {"mm2", "ml", "%", "ms", "1"}
    assert {r["flags"] for r in rows} == {""}


def test_swapped_dixon_is_corrected_and_flagged(tmp_path):
    """A scanner that labelled fat as water: corrected, the values right, the CSV and SR say so."""
    import pydicom
    from conftest import small_phantom

    from quant.synthetic.phantom import phantom_datasets
    ph = small_phantom(seed=31)
    datasets = phantom_datasets(ph, patient_id="SWAP", uid_seed="swap")
    for ds in datasets:
        if ds.SeriesDescription.endswith("_W"):
            ds.ImageType, ds.SeriesDescription = ["DERIVED", "PRIMARY", "DIXON", "FAT"], "t1_vibe_dixon_tra_F"
        elif ds.SeriesDescription.endswith("_F"):
            ds.ImageType, ds.SeriesDescription = ["DERIVED", "PRIMARY", "DIXON", "WATER"], "t1_vibe_dixon_tra_W"
    write_datasets(datasets, tmp_path / "in")
    r = run("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"))
    assert r.returncode == 0, r.stderr
    assert "fat-water swap corrected" in r.stdout
    with open(tmp_path / "out" / "measurements.csv") as fh:
        rows = list(csv.DictReader(fh))
    ff = {row["side"]: float(row["value"]) for row in rows if row["metric"] == "ff_percent"}
    for side, code in (("right", "right"), ("left", "left")):
        assert abs(ff[side] - {(s.value, m): v for (s, m), v in ph.truth.items()}[(code, "ff_percent")]) < 1.0
    assert {row["flags"] for row in rows} == {"fat-water-swap-corrected-whole-series"}
    sr = pydicom.dcmread(next((tmp_path / "out").glob("sr-*.dcm")))
    assert "Whole-series fat-water swap corrected" in str(sr.ContentSequence)


def test_config_typo_stops_with_the_key_named(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[node]\nae_title = "MUSCLENODE"\nprot = 11112\n')
    r = run("serve", "--config", str(cfg), timeout=60)
    assert r.returncode == 2
    assert "node.prot: unknown key (did you mean 'port'?)" in r.stderr
    cfg.write_text('[node]\nport = "11112"\n')
    r = run("serve", "--config", str(cfg), timeout=60)
    assert r.returncode == 2 and "node.port" in r.stderr


def test_status_shows_nothing_received_yet(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    r = run("status", "--config", str(cfg), timeout=60)
    assert r.returncode == 1 and "nothing received yet" in r.stderr


def test_serve_receives_and_status_reports(thigh_visits, tmp_path):
    """A real `musclenode serve` process: push a study, then `musclenode status` shows it."""
    import socket
    import time

    from node.demo_peers import push
    (_, datasets), _ = thigh_visits
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\nbind_address = "127.0.0.1"\nport = {port}\ndata_dir = "{tmp_path / "data"}"\n'
                   'complete_after_seconds = 1.0\n[jobs]\nexecutor = "inline"\n')
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "node.cli", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert "listening on 127.0.0.1" in proc.stdout.readline()
        assert set(push(datasets, "127.0.0.1", port, called_ae="MUSCLENODE")) == {0}
        end = time.time() + 240
        while time.time() < end:
            r = run("status", "--config", str(cfg), timeout=60)
            if "measurements, region" in r.stdout:
                break
            time.sleep(0.5)
        assert r.returncode == 0
        assert f"instances stored: {len(datasets)}" in r.stdout
        # 18 per leg and 9 per compartment and side (automatic compartments by default: [rois])
        assert "done" in r.stdout and "72 measurements, region thigh" in r.stdout, r.stdout
        assert "ROIs: 3 automatic" in r.stdout
    finally:
        proc.terminate()
        assert proc.wait(30) == 0


def test_warmup_runs_every_kind_of_exam_and_fills_the_epg_cache(tmp_path, caplog):
    """`musclenode warmup` (and each worker before the node listens) runs the pipeline on a
    small exam of every series kind: nothing fails, and the EPG tables of its protocol are
    cached where the node keeps them."""
    import logging

    from node.cli import main

    with caplog.at_level(logging.WARNING, logger="node.warmup"):
        from node.warmup import warm_up
        seconds = warm_up(tmp_path / "cache")
    assert seconds > 0 and not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert list((tmp_path / "cache").glob("epg-atoms-*.npz"))   # the protocol's water and fat tables
    assert main(["-q", "warmup"]) == 0


def test_process_with_compartments_adds_automatic_compartment_rows(tmp_path):
    from quant.enums import Region
    from quant.synthetic.phantom import make_leg_phantom, phantom_datasets

    phantom = make_leg_phantom(Region.THIGH, shape=(6, 160, 256), snr=40, seed=5, supersample=3, compartments=True)
    write_datasets(phantom_datasets(phantom), tmp_path / "in")
    r = run("process", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--compartments")
    assert r.returncode == 0, r.stderr
    with open(tmp_path / "out" / "measurements.csv") as fh:
        rows = list(csv.DictReader(fh))
    rois = [r for r in rows if r["roi"]]
    assert {r["roi"] for r in rois} == {"anterior_compartment", "medial_compartment", "posterior_compartment"}
    assert {r["source"] for r in rois} == {"automatic"}
    for side in ("right", "left"):
        leg = next(float(r["value"]) for r in rows if not r["roi"] and r["side"] == side and r["metric"] == "csa_mm2")
        parts = [float(r["value"]) for r in rois if r["side"] == side and r["metric"] == "csa_mm2"]
        assert abs(sum(parts) - leg) < 0.02 * leg       # the compartments tile the muscle
        for r in rois:
            if r["side"] == side and r["metric"] == "csa_mm2":
                truth = phantom.compartment_truth[(side, r["roi"], "csa_mm2")]
                assert abs(float(r["value"]) / truth - 1) < 0.02, r
