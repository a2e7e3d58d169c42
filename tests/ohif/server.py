"""Serve OHIF Viewer 3's prebuilt ``dist/`` and Orthanc's DICOMweb on one origin.

One small threaded HTTP server on loopback:

* ``/app-config.js``: the viewer's configuration, written here: one DICOMweb data source whose
  QIDO-RS, WADO-RS and WADO-URI roots are this origin's ``/dicom-web`` (so no CORS);
* ``/dicom-web/...``: reverse-proxied to Orthanc's DICOMweb plugin (with the request's Host,
  so the bulk data URIs Orthanc writes into the metadata point back here);
* anything else: a file of ``dist/``, or ``index.html`` (the viewer is a single-page app
  whose routes, ``/viewer?StudyInstanceUIDs=...``, are not files).

Every response is cross-origin isolated (COOP/COEP) so the viewer may use SharedArrayBuffer.

    python tests/ohif/server.py --orthanc http://127.0.0.1:8042 --port 3000
"""

from __future__ import annotations

import argparse
import http.client
import json
import mimetypes
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

#: Orthanc's DICOMweb root, and this server's (the same path, so URIs need no rewriting)
DICOMWEB_ROOT = "/dicom-web"

#: Request headers passed to Orthanc (the rest, cookies included, are not)
FORWARDED = ("accept", "accept-encoding", "content-type", "range", "if-none-match")

mimetypes.add_type("application/wasm", ".wasm")
mimetypes.add_type("text/javascript", ".js")
mimetypes.add_type("text/javascript", ".mjs")


def app_config(root: str = DICOMWEB_ROOT, name: str = "orthanc") -> str:
    """The viewer's ``app-config.js``: one DICOMweb data source at ``root`` of this origin."""
    source = {
        "namespace": "@ohif/extension-default.dataSourcesModule.dicomweb",
        "sourceName": name,
        "configuration": {
            "friendlyName": "Orthanc (DICOMweb plugin)",
            "name": name,
            "qidoRoot": root,
            "wadoRoot": root,
            "wadoUriRoot": root,
            "qidoSupportsIncludeField": True,
            "supportsReject": False,
            "supportsFuzzyMatching": False,
            "supportsWildcard": True,
            "imageRendering": "wadors",
            "thumbnailRendering": "wadors",
            "enableStudyLazyLoad": True,
            "staticWado": False,
            "omitQuotationForMultipartRequest": True,
            "bulkDataURI": {"enabled": True},
        },
    }
    config = {
        "routerBasename": "/",
        "extensions": [],
        "modes": [],
        "customizationService": {},
        "showStudyList": True,
        "maxNumberOfWebWorkers": 2,
        "showWarningMessageForCrossOrigin": False,
        "showCPUFallbackMessage": True,
        "showLoadingIndicator": True,
        "strictZSpacingForVolumeViewport": True,
        "investigationalUseDialog": {"option": "never"},
        "maxNumRequests": {"interaction": 100, "thumbnail": 5, "prefetch": 10},
        "defaultDataSourceName": name,
        "dataSources": [source],
    }
    return "/** musclenode: OHIF against Orthanc's DICOMweb on this origin */\nwindow.config = " \
        + json.dumps(config, indent=2) + ";\n" + SR_GROUPS_WITHOUT_SCOORD


#: OHIF 3.13.2 reads ``coords[0]`` of every measurement group of a TID 1500 SR when it loads
#: the SR; a group without a SCOORD (our TID 1411 volumetric groups, which reference SEG
#: segments instead) has none, so the viewer fails ("Something went wrong"). Hand OHIF a copy
#: of such a group with one empty coordinate: it finds no image reference there and skips it.
SR_GROUPS_WITHOUT_SCOORD = """
window.config.customizationService = {
  onBeforeSRAddMeasurement: {
    $set: ({ measurement }) =>
      measurement.coords && measurement.coords.length ? measurement : { ...measurement, coords: [{}] },
  },
};
"""


class OhifServer:
    """OHIF's ``dist`` on ``http://host:port/``, Orthanc's DICOMweb (``orthanc``, its HTTP
    root URL) behind ``/dicom-web``; ``port=0`` picks a free one."""

    def __init__(self, dist: Path, orthanc: str, host: str = "127.0.0.1", port: int = 0):
        self.dist = Path(dist).resolve()
        up = urllib.parse.urlsplit(orthanc)
        self.upstream = (up.hostname or "127.0.0.1", up.port or 80)
        self.config_js = app_config().encode()
        self.requests: list[tuple[str, int]] = []   # (path, status) of each request, for a test's report
        self.httpd = ThreadingHTTPServer((host, port), self._handler())
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, name="ohif-server", daemon=True)

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> OhifServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def __enter__(self) -> OhifServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format, *args):   # quiet; the test reports failures itself
                pass

            def do_GET(self):
                self._serve(body=True)

            def do_HEAD(self):
                self._serve(body=False)

            def do_POST(self):
                self._serve(body=True)

            def _serve(self, body: bool):
                path = urllib.parse.urlsplit(self.path).path
                try:
                    if path == DICOMWEB_ROOT or path.startswith(DICOMWEB_ROOT + "/"):
                        status = self._proxy(body)
                    elif path == "/app-config.js":
                        status = self._send(200, server.config_js, "text/javascript", body, cache=False)
                    else:
                        status = self._static(path, body)
                except (BrokenPipeError, ConnectionResetError):
                    return
                server.requests.append((self.path, status))

            def _send(self, status: int, data: bytes, ctype: str, body: bool, cache: bool = True,
                      extra: dict | None = None) -> int:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Cache-Control", "public, max-age=3600" if cache else "no-store")
                self.send_header("Cross-Origin-Opener-Policy", "same-origin")
                self.send_header("Cross-Origin-Embedder-Policy", "require-corp")
                self.send_header("Cross-Origin-Resource-Policy", "same-origin")
                for k, v in (extra or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                if body:
                    self.wfile.write(data)
                return status

            def _static(self, path: str, body: bool) -> int:
                rel = urllib.parse.unquote(path).lstrip("/")
                file = (server.dist / rel).resolve() if rel else server.dist / "index.html"
                if not file.is_relative_to(server.dist):
                    return self._send(404, b"not found", "text/plain", body)
                if not file.is_file():
                    if Path(rel).suffix and Path(rel).suffix != ".html":
                        return self._send(404, b"not found", "text/plain", body)   # a missing asset
                    file = server.dist / "index.html"   # a route of the single-page app
                ctype = mimetypes.guess_type(file.name)[0] or "application/octet-stream"
                return self._send(200, file.read_bytes(), ctype, body, cache=file.name != "index.html")

            def _proxy(self, body: bool) -> int:
                length = int(self.headers.get("Content-Length") or 0)
                payload = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() in FORWARDED}
                headers["Host"] = self.headers.get("Host", "")
                conn = http.client.HTTPConnection(*server.upstream, timeout=120)
                try:
                    try:
                        conn.request(self.command, self.path, body=payload, headers=headers)
                        r = conn.getresponse()
                        data = r.read()
                    except OSError as e:
                        return self._send(502, f"Orthanc: {e}".encode(), "text/plain", body, cache=False)
                    extra = {k: v for k, v in r.getheaders()
                             if k.lower() in ("etag", "content-encoding", "content-range", "last-modified")}
                    return self._send(r.status, data, r.getheader("Content-Type", "application/octet-stream"),
                                      body, cache=False, extra=extra)
                finally:
                    conn.close()

        return Handler


def main() -> None:
    # run as a script: tests/ohif/ is on sys.path
    from fetch import dist_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orthanc", default="http://127.0.0.1:8042", help="Orthanc's HTTP root (DICOMweb plugin on)")
    ap.add_argument("--dist", type=Path, default=None, help="OHIF's dist/ (default: tests/ohif/fetch.py's)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=3000)
    args = ap.parse_args()
    dist = args.dist or dist_dir()
    if not (dist / "index.html").exists():
        raise SystemExit(f"no OHIF dist at {dist}: run python tests/ohif/fetch.py")
    srv = OhifServer(dist, args.orthanc, args.host, args.port)
    print(f"OHIF at {srv.url}/ (DICOMweb: {args.orthanc}{DICOMWEB_ROOT}/)", flush=True)
    try:
        srv.httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
