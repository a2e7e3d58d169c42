"""Shared fixtures: small realistic studies from the project's phantom, free ports, a
real Orthanc PACS, and a running node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from quant.enums import Region
from quant.synthetic.exam import exam_datasets
from quant.synthetic.phantom import make_leg_phantom

os.environ.setdefault("TCP_NODELAY", "1")  # Debian's DCMTK and Orthanc stall ~40 ms per instance without it

SMALL = dict(shape=(8, 96, 160), pixel_mm=2.5, slice_mm=6.0)
#: partial volume (3x3 sub-voxels), a +-30 % receive bias field, a 1 mm dark fascia
REALISTIC = dict(supersample=3, bias_field=0.3, fascia_mm=1.0)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def small_phantom(region=Region.THIGH, **kw):
    args = dict(SMALL)
    args.update(kw)
    return make_leg_phantom(region, **args)


def write_datasets(datasets, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for ds in datasets:
        p = folder / f"{ds.SeriesNumber:03d}-{ds.InstanceNumber:05d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


@pytest.fixture(scope="session")
def thigh_visits():
    """Two visits of one subject: (phantom, datasets) each; FF rises and CSA falls."""
    v1 = small_phantom(muscle_ff=0.06, muscle_scale=1.0, snr=40, seed=11, **REALISTIC)
    v2 = small_phantom(muscle_ff=0.11, muscle_scale=0.92, snr=40, seed=12, **REALISTIC)
    # visit 1: MESE as classic single-frame MR; visit 2: as Enhanced MR, one instance per echo
    d1 = exam_datasets(v1, t2w_muscle_ms=VISIT_T2[0], patient_id="T-0001", study_date="20260110", uid_seed="tests")
    d2 = exam_datasets(v2, t2w_muscle_ms=VISIT_T2[1], enhanced_mese=True, patient_id="T-0001",
                       study_date="20260711", uid_seed="tests")
    return (v1, d1), (v2, d2)


VISIT_T2 = (32.0, 36.0)   # muscle water T2 (ms) of the two visits: denervation raises it


@pytest.fixture
def port():
    return free_port()


DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")   # Debian's orthanc-dicomweb


class Orthanc:
    """A throwaway Orthanc with its own storage, ports and PID (never the system service);
    ``dicomweb=True`` loads Debian's DICOMweb plugin (QIDO-RS, WADO-RS, STOW-RS under
    ``/dicom-web/``, WADO-URI under ``/wado``) and nothing else."""

    def __init__(self, workdir: Path, aet: str = "ORTHANC", dicomweb: bool = False):
        self.workdir = workdir
        self.aet = aet
        self.dicomweb = dicomweb
        self.dicom_port = free_port()
        self.http_port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def start(self, modalities: dict | None = None) -> Orthanc:
        cfg = {
            "Name": "musclenode-test", "StorageDirectory": str(self.workdir / "storage"),
            "IndexDirectory": str(self.workdir / "index"), "DicomAet": self.aet, "DicomPort": self.dicom_port,
            "HttpPort": self.http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
            "DicomModalities": modalities or {}, "DicomCheckCalledAet": False, "Plugins": [],
            "HttpServerEnabled": True, "StableAge": 2, "LogExportedResources": False,
        }
        if self.dicomweb:
            # no "Host": WADO-RS bulk data URIs then name the Host the request came with (a proxy's)
            cfg["Plugins"] = [str(DICOMWEB_PLUGIN)]
            cfg["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "WadoRoot": "/wado",
                               "Ssl": False}
        path = self.workdir / "orthanc.json"
        self.workdir.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cfg))
        env = dict(os.environ, TCP_NODELAY="1")
        self.log = open(self.workdir / "orthanc.log", "wb")
        self.proc = subprocess.Popen([shutil.which("Orthanc") or "/usr/sbin/Orthanc", str(path)],
                                     stdout=self.log, stderr=subprocess.STDOUT, env=env)
        end = time.time() + 30
        while time.time() < end:
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"Orthanc did not start: {(self.workdir / 'orthanc.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.proc = None

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def post(self, path: str, body):
        req = urllib.request.Request(self.url + path, data=body if isinstance(body, bytes) else body.encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            data = r.read()
        return json.loads(data) if data[:1] in (b"{", b"[") else data

    def instances_of_study(self, study_uid: str) -> list[dict]:
        found = self.post("/tools/lookup", study_uid)
        out = []
        for f in found:
            if f["Type"] == "Study":
                out.extend(self.get(f"/studies/{f['ID']}/instances"))
        return out

    def file(self, instance_id: str) -> bytes:
        return self.get(f"/instances/{instance_id}/file")


def _have(*tools) -> bool:
    return all(shutil.which(t) or Path(t).exists() for t in tools)


@pytest.fixture
def orthanc(tmp_path):
    if not _have("/usr/sbin/Orthanc"):
        pytest.skip("Orthanc is not installed (apt-get install orthanc)")
    o = Orthanc(tmp_path / "orthanc").start()
    yield o
    o.stop()


def node_config(tmp_path: Path, *, destinations=(), executor="inline", complete_after=1.0, database_url="",
                retry_initial=0.5, retry_max=2.0, protocols=()):
    from node.config import (
        Config,
        DatabaseSettings,
        JobSettings,
        NodeSettings,
        SendSettings,
    )
    return Config(node=NodeSettings(ae_title="MUSCLENODE", bind_address="127.0.0.1", port=free_port(),
                                    data_dir=tmp_path / "node-data", complete_after_seconds=complete_after,
                                    journal_mb=4),
                  database=DatabaseSettings(url=database_url),
                  jobs=JobSettings(workers=1, executor=executor),
                  send=SendSettings(retry_initial_seconds=retry_initial, retry_max_seconds=retry_max,
                                    timeout_seconds=10.0),
                  destinations=tuple(destinations), protocols=tuple(protocols))


@pytest.fixture
def make_node(tmp_path):
    """Start nodes on free ports; all are stopped at the end of the test."""
    from node.service import Node
    started = []

    def make(config=None, **kw):
        node = Node(config or node_config(tmp_path, **kw), poll_seconds=0.2).start()
        started.append(node)
        return node

    yield make
    for n in started:
        try:
            n.stop()
        except Exception:
            pass


def wait_until(predicate, timeout=60.0, interval=0.2, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


#: The web tests' subjects: (patient ID, name, accession prefix); two visits each, 182 days apart.
WEB_SUBJECTS = (("WEB-001", "Alpha^Anna", "ACC1001"), ("WEB-002", "Beta^Bert", "ACC2002"))
WEB_DATES = ("20260105", "20260706")


@pytest.fixture(scope="session")
def web_node(tmp_path_factory):
    """A node with the web service, two subjects of two visits each processed (shared by
    ``test_web.py`` and ``test_dashboard.py``): (node, truths, PHI strings, folder)."""
    from dataclasses import replace

    from sqlalchemy import select

    from node import db
    from node.config import WebSettings
    from node.demo_peers import push
    from node.service import Node
    from quant.synthetic.phantom import phantom_datasets

    def all_done(n):
        with node.engine.begin() as conn:
            jobs = conn.execute(select(db.jobs)).all()
        return len(jobs) >= n and all(j.state == "done" for j in jobs)

    from node.config import Destination

    tmp = tmp_path_factory.mktemp("web")
    pacs = Orthanc(tmp / "orthanc").start() if _have("/usr/sbin/Orthanc") else None   # the SRs go to a real PACS
    dests = [Destination("pacs", pacs.aet, "127.0.0.1", pacs.dicom_port)] if pacs is not None else []
    config = node_config(tmp, destinations=dests, complete_after=3.0)
    config = replace(config, web=WebSettings(enabled=True, bind_address="127.0.0.1", port=0))
    node = Node(config, poll_seconds=0.2).start()
    node.pacs = pacs   # type: ignore[attr-defined]
    truths, phi, everything = {}, [], []
    try:
        for k, (pid, name, acc) in enumerate(WEB_SUBJECTS):
            for n, date in enumerate(WEB_DATES):
                ph = make_leg_phantom(Region.THIGH, shape=(6, 96, 160), supersample=2, seed=10 * k + n,
                                      muscle_scale=1.0 - 0.08 * n, muscle_ff=0.06 + 0.05 * n)
                dss = phantom_datasets(ph, patient_id=pid, patient_name=name, accession=f"{acc}{n}",
                                       study_date=date, uid_seed=f"web-{k}-{n}")
                everything += dss
                truths[(pid, n)] = ph.truth
                phi += [pid, name.replace("^", " "), name, f"{acc}{n}", date, "19600101"]
        assert set(push(everything, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}   # one association
        wait_until(lambda: all_done(4), timeout=300, what="four visits")
        yield node, truths, sorted(set(phi)), tmp
    finally:
        node.stop()
        if pacs is not None:
            pacs.stop()


#: The PostgreSQL server of the test machine (trust auth), for throwaway databases.
PG_ADMIN = os.environ.get("MUSCLENODE_TEST_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres")


@pytest.fixture
def pg_url():
    """A throwaway PostgreSQL database on the test machine's server (dropped at the end); the
    test is skipped where none answers.
    """
    psycopg = pytest.importorskip("psycopg")
    name = f"musclenode_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(PG_ADMIN, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable: {exc}")
    admin.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    admin.close()
