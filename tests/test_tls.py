"""DICOM TLS in both directions, with DCMTK's own TLS tools and certificates made here by the
openssl command: a CA; the node's certificate and a DCMTK storescp's, both for 127.0.0.1 and
localhost; a client certificate signed by the CA; and a rogue client (and server) signed by
another CA. Every DCMTK process runs under a timeout.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pydicom
import pytest
from conftest import free_port, node_config, small_phantom, wait_until, write_datasets
from sqlalchemy import func, select

from node import db
from node.config import ConfigError, Destination, TLSSettings, config_from_dict
from node.send import store_files
from node.service import Node
from quant.synthetic.phantom import phantom_datasets

TOOLS = ("openssl", "echoscu", "storescu", "storescp")
pytestmark = [pytest.mark.peers,
              pytest.mark.skipif(any(shutil.which(t) is None for t in TOOLS),
                                 reason="needs openssl and DCMTK built with TLS (apt-get install dcmtk openssl)")]

TIMEOUT = 30   # seconds, each DCMTK or openssl process


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=TIMEOUT)


def _ca(folder: Path, name: str) -> None:
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.crt",
             "-days", "2", "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=folder)


def _leaf(folder: Path, name: str, ca: str, *, san: str = "", serial: int) -> None:
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", f"/CN={name}", cwd=folder)
    ext = ["basicConstraints=CA:FALSE", "extendedKeyUsage=serverAuth,clientAuth"]
    if san:
        ext.append(f"subjectAltName={san}")
    (folder / f"{name}.ext").write_text("\n".join(ext) + "\n")
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-set_serial",
             str(serial), "-out", f"{name}.crt", "-days", "2", "-extfile", f"{name}.ext", cwd=folder)


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    """ca; node and server (SAN IP:127.0.0.1, DNS:localhost) and client, signed by ca;
    rogue-ca with rogue (a client) and rogue-server (SAN as the server's) signed by it.
    """
    folder = tmp_path_factory.mktemp("pki")
    _ca(folder, "ca")
    _ca(folder, "rogue-ca")
    san = "IP:127.0.0.1,DNS:localhost"
    _leaf(folder, "node", "ca", san=san, serial=1)
    _leaf(folder, "server", "ca", san=san, serial=2)
    _leaf(folder, "client", "ca", serial=3)
    _leaf(folder, "rogue", "rogue-ca", serial=1)
    _leaf(folder, "rogue-server", "rogue-ca", san=san, serial=2)
    return folder


def tls_settings(pki: Path, *, port: int | None = None, require: bool = True) -> TLSSettings:
    return TLSSettings(certificate=pki / "node.crt", private_key=pki / "node.key", ca_certificates=pki / "ca.crt",
                       port=port or free_port(), require_client_certificate=require)


def tls_node_config(tmp_path: Path, pki: Path, *, plain: bool = True, require: bool = True, **kw):
    config = node_config(tmp_path, **kw)
    node = config.node
    return replace(config, node=replace(node, port=node.port if plain else 0,
                                        tls=tls_settings(pki, require=require)))


def _dcmtk_tls(pki: Path, who: str | None) -> list[str]:
    """DCMTK's TLS options for a peer presenting ``who``'s certificate (None: anonymous TLS)."""
    mine = ["+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "-pw"] if who else ["+tla"]
    return [*mine, "+cf", str(pki / "ca.crt")]


def echo(port: int, *tls: str) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-to", "10", "-ta", "10", "-td", "10", *tls, "-aec", "MUSCLENODE",
                           "127.0.0.1", str(port)], capture_output=True, text=True, timeout=TIMEOUT)


def n_instances(node: Node) -> int:
    with node.engine.begin() as conn:
        return conn.execute(select(func.count()).select_from(db.instances)).scalar_one()


class StoreSCP:
    """DCMTK's storescp over TLS (``--require-peer-cert``: the node must present a certificate
    the CA signed), writing what it receives into ``folder``.
    """

    def __init__(self, pki: Path, folder: Path, *, who: str = "server"):
        self.port = free_port()
        self.folder = folder
        folder.mkdir(parents=True)
        self.pki = pki
        self.proc = subprocess.Popen(["storescp", "+tls", str(pki / f"{who}.key"), str(pki / f"{who}.crt"), "-pw",
                                      "+cf", str(pki / "ca.crt"), "--require-peer-cert", "-aet", "TLSPACS",
                                      "-od", str(folder), "-ta", "10", "-td", "10", str(self.port)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait_listening(self) -> None:
        def listening():
            with socket.socket() as s:
                return s.connect_ex(("127.0.0.1", self.port)) == 0
        wait_until(listening, timeout=20, interval=0.1, what="storescp listening")

    def received(self) -> list[pydicom.Dataset]:
        return [pydicom.dcmread(p, stop_before_pixels=True) for p in sorted(self.folder.iterdir())]

    def stop(self) -> str:
        self.proc.terminate()
        try:
            out, _ = self.proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, _ = self.proc.communicate(timeout=10)
        return out or ""


# --------------------------------------------------------------------------- #
# Configuration                                                                 #
# --------------------------------------------------------------------------- #


def _tls_table(pki: Path, **extra) -> dict:
    return {"certificate": str(pki / "node.crt"), "private_key": str(pki / "node.key"),
            "ca_certificates": str(pki / "ca.crt"), **extra}


def test_config_node_tls_table(pki):
    config = config_from_dict({"node": {"port": 0, "tls": _tls_table(pki, port=2762)},
                               "destinations": [{"name": "pacs", "ae_title": "PACS", "host": "pacs.example",
                                                 "port": 2762, "tls": True}]})
    assert config.node.port == 0
    assert config.node.tls == TLSSettings(pki / "node.crt", pki / "node.key", pki / "ca.crt", 2762, True)
    assert config.destinations[0].tls and config.destinations[0].tls_server_name == ""
    assert config_from_dict({}).node.tls is None


@pytest.mark.parametrize(("data", "key"), [
    ({"node": {"port": 0}}, "node.port"),                                      # would listen nowhere
    ({"destinations": [{"name": "p", "ae_title": "P", "host": "h", "port": 1, "tls": True}]}, "destinations[0].tls"),
    ({"node": {"tls": {"certificate": "/x.crt", "private_key": "/x.key"}}}, "node.tls.ca_certificates"),
    ({"node": {"tls": {"certificate": "/x.crt", "private_key": "/x.key", "ca_certificates": "/ca.crt",
                       "port": 70000}}}, "node.tls.port"),
    ({"node": {"port": 2762, "tls": {"certificate": "/x.crt", "private_key": "/x.key",
                                     "ca_certificates": "/ca.crt"}}}, "node.tls.port"),   # same as node.port
    ({"node": {"tls": {"certificate": "/x.crt", "private_key": "/x.key", "ca_certificates": "/ca.crt",
                       "require_client_certificate": "yes"}}}, "node.tls.require_client_certificate"),
    ({"node": {"tls": {"certificate": "/x.crt", "private_key": "/x.key", "ca_certificates": "/ca.crt",
                       "verify": True}}}, "node.tls.verify"),
])
def test_config_tls_errors_name_the_key(data, key):
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    assert info.value.key == key, str(info.value)


@pytest.mark.parametrize(("field", "bad", "words"), [
    ("certificate", "missing.crt", "no such file"),
    ("private_key", "missing.key", "no such file"),
    ("ca_certificates", "client.key", "not PEM certificates"),
    ("certificate", "ca.key", "not PEM certificates"),
    ("private_key", "client.key", "not the key of"),          # a key that is not the certificate's
])
def test_node_does_not_start_with_tls_files_that_do_not_load(pki, tmp_path, field, bad, words):
    config = tls_node_config(tmp_path, pki)
    config = replace(config, node=replace(config.node, tls=replace(config.node.tls, **{field: pki / bad})))
    with pytest.raises(ConfigError) as info:
        Node(config)
    assert info.value.key == f"node.tls.{field}" and words in str(info.value), str(info.value)


# --------------------------------------------------------------------------- #
# The node as TLS server                                                       #
# --------------------------------------------------------------------------- #


def test_echoscu_and_storescu_over_tls_to_the_node(make_node, pki, tmp_path):
    node = make_node(tls_node_config(tmp_path, pki, complete_after=30.0))
    assert node.listening() == f"127.0.0.1:{node.port} and 127.0.0.1:{node.tls_port} (DICOM TLS)"
    r = echo(node.tls_port, *_dcmtk_tls(pki, "client"))
    assert r.returncode == 0, r.stdout + r.stderr
    datasets = phantom_datasets(small_phantom(shape=(4, 64, 96)), patient_id="TLS-1", uid_seed="tls-store")
    files = write_datasets(datasets, tmp_path / "study")
    r = subprocess.run(["storescu", "-to", "10", "-ta", "10", "-td", "30", *_dcmtk_tls(pki, "client"),
                        "-aec", "MUSCLENODE", "127.0.0.1", str(node.tls_port), *map(str, files)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert n_instances(node) == len(files)          # acknowledged after a durable write: all there
    stored = list((Path(node.config.node.data_dir) / "store").rglob("*.dcm"))
    assert len(stored) == len(files)


def test_clients_without_a_valid_certificate_are_refused(make_node, pki, tmp_path):
    node = make_node(tls_node_config(tmp_path, pki))
    stalled = socket.create_connection(("127.0.0.1", node.tls_port), timeout=5)   # connects, never says hello
    try:
        for who, label in ((None, "anonymous TLS"), ("rogue", "certificate of another CA")):
            r = echo(node.tls_port, *_dcmtk_tls(pki, who))
            assert r.returncode != 0, f"{label} was accepted: {r.stdout}{r.stderr}"
        r = echo(node.tls_port)                                  # no TLS at all on the TLS port
        assert r.returncode != 0, r.stdout + r.stderr
        # the node goes on: a valid client is served on the TLS port while the stalled one waits,
        # and the plain port still answers
        started = time.monotonic()
        r = echo(node.tls_port, *_dcmtk_tls(pki, "client"))
        assert r.returncode == 0, r.stdout + r.stderr
        assert time.monotonic() - started < 5
        r = echo(node.port)
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        stalled.close()


def test_client_certificate_optional_and_tls_only(make_node, pki, tmp_path):
    node = make_node(tls_node_config(tmp_path, pki, plain=False, require=False))
    assert node.receiver.server is None
    with pytest.raises(RuntimeError):
        _ = node.port
    assert node.listening() == f"127.0.0.1:{node.tls_port} (DICOM TLS)"
    for who in (None, "client"):                                  # anonymous TLS is allowed now
        r = echo(node.tls_port, *_dcmtk_tls(pki, who))
        assert r.returncode == 0, r.stdout + r.stderr
    r = echo(node.tls_port, *_dcmtk_tls(pki, "rogue"))           # a certificate sent is still verified
    assert r.returncode != 0, r.stdout + r.stderr


# --------------------------------------------------------------------------- #
# The node as TLS client                                                       #
# --------------------------------------------------------------------------- #


def test_store_files_verifies_the_destination(pki, tmp_path):
    tls = tls_settings(pki)
    files = [str(p) for p in write_datasets(phantom_datasets(small_phantom(shape=(2, 32, 48)), patient_id="TLS-2",
                                                             uid_seed="tls-send")[:2], tmp_path / "out")]
    good = StoreSCP(pki, tmp_path / "good")
    rogue = StoreSCP(pki, tmp_path / "rogue", who="rogue-server")
    try:
        good.wait_listening()
        rogue.wait_listening()
        dest = Destination("pacs", "TLSPACS", "127.0.0.1", good.port, tls=True)
        assert store_files(dest, files, calling_ae="MUSCLENODE", timeout=10, tls=tls) == dict.fromkeys(files, "")
        assert len(good.received()) == 2
        # by DNS name: the certificate names localhost too
        localhost = replace(dest, host="localhost")
        assert set(store_files(localhost, files, calling_ae="MUSCLENODE", timeout=10, tls=tls).values()) == {""}
        # a name the certificate does not carry, a certificate of another CA, no TLS on a TLS port
        for bad in (replace(dest, tls_server_name="pacs.example"), replace(dest, port=rogue.port),
                    replace(dest, tls=False)):
            errors = store_files(bad, files, calling_ae="MUSCLENODE", timeout=10, tls=tls)
            assert all(errors.values()), (bad, errors)
        assert rogue.received() == []
    finally:
        good.stop()
        rogue.stop()


def test_study_over_tls_in_and_results_over_tls_out(make_node, pki, tmp_path):
    """storescu sends a Dixon study to the node's TLS port; the node's SEG and SR reach a
    storescp that requires a client certificate, over TLS.
    """
    pacs = StoreSCP(pki, tmp_path / "pacs")
    try:
        pacs.wait_listening()
        dest = Destination("pacs", "TLSPACS", "127.0.0.1", pacs.port, tls=True)
        node = make_node(tls_node_config(tmp_path, pki, plain=False, destinations=[dest], complete_after=1.0))
        datasets = phantom_datasets(small_phantom(seed=31), patient_id="TLS-3", uid_seed="tls-e2e")
        files = write_datasets(datasets, tmp_path / "study")
        r = subprocess.run(["storescu", "-to", "10", "-ta", "10", "-td", "30", *_dcmtk_tls(pki, "client"),
                            "-aec", "MUSCLENODE", "127.0.0.1", str(node.tls_port), *map(str, files)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr

        def outbox():
            with node.engine.begin() as conn:
                return conn.execute(select(db.outbox.c.state, db.outbox.c.last_error)).all()
        rows = wait_until(lambda: (lambda rs: rs if rs and all(s == "sent" for s, _ in rs) else None)(outbox()),
                          timeout=180, what="results sent over TLS")
        modalities = sorted(str(ds.Modality) for ds in pacs.received())
        assert "SEG" in modalities and "SR" in modalities, modalities
        assert len(modalities) == len(rows)
        study_uid = str(datasets[0].StudyInstanceUID)
        assert all(str(ds.StudyInstanceUID) == study_uid for ds in pacs.received())
    finally:
        pacs.stop()


def test_history_queries_associate_over_tls(pki):
    """The C-FIND of node.history goes over TLS to a destination with ``tls``: a Query/Retrieve
    SCP on TLS (pynetdicom, requiring a client certificate of the CA) answers the node, and
    does not associate with a node presenting the rogue certificate.
    """
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from node.history import ask_destination
    from node.tls import server_context

    queries = []

    def on_find(event):
        queries.append(str(event.identifier.PatientID))
        yield from ()   # no studies: Success

    scp = AE(ae_title="TLSQR")
    scp.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server_tls = TLSSettings(pki / "server.crt", pki / "server.key", pki / "ca.crt")
    server = scp.start_server(("127.0.0.1", 0), block=False, ssl_context=server_context(server_tls),
                              evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        dest = Destination("qr", "TLSQR", "127.0.0.1", server.server_address[1], tls=True, query=True)
        tls = tls_settings(pki)
        answer = ask_destination(dest, "TLS-4", calling_ae="MUSCLENODE", timeout=10, tls=tls)
        assert answer.answered and answer.studies == 0, answer.error
        assert queries == ["TLS-4"]
        rogue = replace(tls, certificate=pki / "rogue.crt", private_key=pki / "rogue.key")
        answer = ask_destination(dest, "TLS-4", calling_ae="MUSCLENODE", timeout=10, tls=rogue)
        assert not answer.answered and "no association" in answer.error, answer.error
        answer = ask_destination(replace(dest, tls=False), "TLS-4", calling_ae="MUSCLENODE", timeout=10, tls=tls)
        assert not answer.answered
        assert queries == ["TLS-4"]
    finally:
        server.shutdown()
