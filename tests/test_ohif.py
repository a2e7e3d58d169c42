"""The radiologist's view: OHIF Viewer 3 opens a study the node has processed.

A phantom exam goes to a real Orthanc (with Debian's DICOMweb plugin) and through the node,
which sends its SEG, SR and parametric maps there; OHIF 3's prebuilt ``dist/`` (npm
``@ohif/app``, fetched by ``tests/ohif/fetch.py``) is served with Orthanc's DICOMweb on one
origin (``tests/ohif/server.py``) and driven by Playwright in Debian's Chromium (WebGL by
SwiftShader). Each test opens the viewer afresh and screenshots what it checked into its
folder; with ``MUSCLENODE_SCREENSHOT=1`` the SEG overlay also goes to ``docs/ohif.png``
(the README's).

What OHIF 3.13.2 does with the node's objects (see README, "Viewing results in OHIF"):

* the study browser lists the MR series, the SEG, the SR and the maps; the SEG opens as a
  labelmap overlay and the segmentation panel lists its segments;
* the fat fraction map opens in OHIF's parametric map viewport, but its overlay is
  invisible: OHIF multiplies a map by 100 and shows it in a fixed 0..100 window (it expects
  fractions; ours is in %) and NaN voxels (no value) blank it; maps on the multi-echo
  spin-echo series cannot open at all (OHIF cannot make a volume of that series). Both are
  strict xfails, so a fix (in OHIF or in the maps) shows up as XPASS;
* the SR: OHIF 3.13.2 fails on a TID 1500 group without a SCOORD (our TID 1411 volumetric
  groups); the served ``app-config.js`` has it skip such groups, so the SR opens. The
  key-slice outlines are checked once the SR carries TID 1410 planar groups (skipped until
  then).
"""

from __future__ import annotations

import io
import os
import re
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import DICOMWEB_PLUGIN, REALISTIC, VISIT_T2, Orthanc, node_config, small_phantom, wait_until
from ohif.fetch import dist_dir
from ohif.server import OhifServer

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
ORTHANC = Path("/usr/sbin/Orthanc")

pytestmark = [
    pytest.mark.peers,
    pytest.mark.skipif(not ORTHANC.exists() or not DICOMWEB_PLUGIN.exists(),
                       reason="needs Orthanc and its DICOMweb plugin (apt-get install orthanc orthanc-dicomweb)"),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium (apt-get install chromium)"),
    pytest.mark.skipif(not (dist_dir() / "index.html").exists(),
                       reason=f"no OHIF viewer at {dist_dir()}: run python tests/ohif/fetch.py"),
]

#: series descriptions the node writes (reports.seg, reports.sr, reports.pmap)
SEG_DESC = "Muscle segmentation (musclenode)"
SR_DESC = "Muscle measurements (musclenode)"
FF_MAP = "fat fraction (%) map (musclenode)"
T2_MAP = "water T2 (ms) map (musclenode)"
MAPS = (FF_MAP, T2_MAP, "relative B1 (transmit field / nominal) map (musclenode)",
        "fat fraction of the T2 fit (%) map (musclenode)")
MR_SERIES = ("t1_vibe_dixon_tra_W", "t1_vibe_dixon_tra_F", "se_mc_tra_T2map")
SC_CLASSES = ("1.2.840.10008.5.1.4.1.1.7",)   # Secondary Capture (and its multi-frame .1-.4)

WAIT_MS = 60_000   # generous: SwiftShader renders on 2 shared cores
FAILED = "Something went wrong"   # OHIF's error boundary


class Study:
    """The study as Orthanc holds it: ``uid``, ``series`` (description -> SOP class UID) and
    the node's SR (pydicom)."""

    def __init__(self, uid: str, series: dict[str, str], sr: pydicom.Dataset, server: OhifServer):
        self.uid, self.series, self.sr, self.server = uid, series, sr, server


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Orthanc (DICOMweb on) holds a phantom exam and all the node made of it; OHIF is served
    against it."""
    from sqlalchemy import select

    from node import db
    from node.config import Destination
    from node.demo_peers import push
    from node.service import Node
    from quant.synthetic.exam import exam_datasets

    tmp = tmp_path_factory.mktemp("ohif")
    t0 = time.time()
    orthanc = Orthanc(tmp / "orthanc", dicomweb=True).start()
    node = None
    try:
        node = Node(node_config(tmp, destinations=[Destination("pacs", orthanc.aet, "127.0.0.1",
                                                               orthanc.dicom_port)]), poll_seconds=0.2).start()
        phantom = small_phantom(muscle_ff=0.06, snr=40, seed=11, **REALISTIC)
        datasets = exam_datasets(phantom, t2w_muscle_ms=VISIT_T2[0], patient_id="OHIF-0001",
                                 study_date="20260110", uid_seed="ohif")
        uid = str(datasets[0].StudyInstanceUID)
        # the scanner sends the exam to PACS and to the node; the node sends what it made to PACS
        assert set(push(datasets, "127.0.0.1", orthanc.dicom_port, called_ae=orthanc.aet)) == {0}
        assert set(push(datasets, "127.0.0.1", node.port, called_ae="MUSCLENODE")) == {0}

        def all_sent():
            with node.engine.begin() as conn:
                jobs = conn.execute(select(db.jobs)).all()
                kinds = conn.execute(select(db.outputs.c.kind)).scalars().all()
                states = conn.execute(select(db.outbox.c.state)).scalars().all()
            return (jobs and all(j.state in ("done", "failed", "skipped") for j in jobs)
                    and {"seg", "sr"} <= set(kinds) and states and all(s == "sent" for s in states))
        wait_until(all_sent, timeout=300, what="the node's outputs sent to Orthanc")
        series = {}
        for s in orthanc.get(f"/studies/{orthanc.post('/tools/lookup', uid)[0]['ID']}/series"):
            first = orthanc.get(f"/series/{s['ID']}/instances")[0]
            tags = orthanc.get(f"/instances/{first['ID']}/simplified-tags")
            series[tags.get("SeriesDescription", "")] = tags["SOPClassUID"]
            if tags["Modality"] == "SR":
                sr = pydicom.dcmread(io.BytesIO(orthanc.file(first["ID"])))
        print(f"study in Orthanc in {time.time() - t0:.1f} s: {sorted(series)}")
        with OhifServer(dist_dir(), orthanc.url) as server:
            yield Study(uid, series, sr, server)
    finally:
        if node is not None:
            node.stop()
        orthanc.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs playwright (pip install -e '.[test]')")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), headless=True,
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--use-angle=swiftshader",
                                    "--enable-unsafe-swiftshader", "--ignore-gpu-blocklist"])
        yield b
        b.close()


class Viewer:
    """One page of OHIF's viewer on the study: console log, page errors and screenshots."""

    def __init__(self, page, folder: Path):
        self.page, self.folder = page, folder
        self.log: list[str] = []
        self.errors: list[str] = []
        page.on("console", lambda m: self.log.append(f"{m.type}: {m.text}"))
        page.on("pageerror", lambda e: self.errors.append(str(e)))

    def shot(self, name: str) -> Path:
        path = self.folder / f"{name}.png"
        self.page.screenshot(path=path)
        return path

    def viewport(self):
        return self.page.locator("[data-cy=viewport-grid]")

    def open_series(self, description: str) -> None:
        """Double-click a series in the study browser (as a reader does)."""
        self.page.locator("[data-cy=series-description-label]", has_text=description).first.dblclick()

    def colour_fraction(self) -> float:
        """The fraction of the viewport's pixels that are coloured (not grey)."""
        from PIL import Image
        rgb = np.asarray(Image.open(io.BytesIO(self.viewport().screenshot())).convert("RGB")).astype(int)
        return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 40).mean())

    def wait_colour(self, at_least: float, timeout: float = WAIT_MS / 1000) -> float:
        end, seen = time.time() + timeout, 0.0
        while time.time() < end:
            seen = self.colour_fraction()
            if seen >= at_least:
                return seen
            self.page.wait_for_timeout(500)
        return seen

    def wait_log(self, pattern: str, timeout: float = WAIT_MS / 1000) -> str:
        rx = re.compile(pattern)
        end = time.time() + timeout
        while time.time() < end:
            hit = next((line for line in self.log if rx.search(line)), None)
            if hit:
                return hit
            self.page.wait_for_timeout(250)
        raise AssertionError(f"OHIF never logged {pattern!r}")

    def assert_no_failure(self) -> None:
        assert self.page.get_by_text(FAILED).count() == 0, f"OHIF failed: {self.errors or self.log[-5:]}"
        assert not self.errors, self.errors


@pytest.fixture
def viewer(browser, study, tmp_path):
    page = browser.new_page(viewport={"width": 1600, "height": 900})
    v = Viewer(page, tmp_path)
    # OHIF's first-visit tour: skipped whenever it shows up
    page.add_locator_handler(page.get_by_text("Skip all"), lambda loc: loc.click())
    t0 = time.time()
    page.goto(f"{study.server.url}/viewer?StudyInstanceUIDs={study.uid}")
    # the hanging protocol puts the Dixon water series in the viewport: wait for its first image
    page.locator("[data-cy=viewport-overlay-top-left]", has_text="t1_vibe_dixon_tra_W").wait_for(timeout=WAIT_MS)
    page.locator("[data-cy=viewport-grid] canvas").first.wait_for(timeout=WAIT_MS)
    wait_until(lambda: any("studyToFirstImage" in line for line in v.log), timeout=WAIT_MS / 1000,
               what="OHIF's first image")
    v.opened_in = time.time() - t0   # type: ignore[attr-defined]
    yield v
    page.close()


def test_study_browser_lists_the_node_results(viewer, study):
    page = viewer.page
    labels = page.locator("[data-cy=series-description-label]")
    labels.filter(has_text=SEG_DESC).wait_for(timeout=WAIT_MS)
    shown = set(labels.all_inner_texts())
    for desc in (*MR_SERIES, SEG_DESC, SR_DESC, *MAPS):
        assert desc in shown, (desc, sorted(shown))
    assert page.locator("[data-cy=study-browser-thumbnail]").count() >= 5   # the MR series have thumbnails
    viewer.shot("1-study")
    viewer.assert_no_failure()
    print(f"viewer: first image {viewer.opened_in:.1f} s after opening the page")


def test_seg_opens_as_overlay(viewer, study):
    page = viewer.page
    assert viewer.colour_fraction() < 0.01   # the MR image alone is grey
    viewer.open_series(SEG_DESC)
    page.get_by_role("button", name="Yes").click(timeout=WAIT_MS)   # "Do you want to open this Segmentation?"
    page.locator("[data-cy=panelSegmentation-btn]").click()
    for label in ("right thigh muscle", "left thigh muscle", "right thigh subcutaneous fat",
                  "left thigh anterior compartment (automatic)"):
        page.get_by_text(label, exact=True).first.wait_for(timeout=WAIT_MS)
    coloured = viewer.wait_colour(0.10)
    path = viewer.shot("2-seg")
    assert coloured >= 0.10, f"no segmentation overlay in the viewport ({coloured:.1%} coloured)"
    viewer.assert_no_failure()
    if os.environ.get("MUSCLENODE_SCREENSHOT"):   # the README's, in 256 colours (a fifth of the size)
        from PIL import Image
        Image.open(path).convert("RGB").quantize(256).save(ROOT / "docs" / "ohif.png", optimize=True)


def test_parametric_map_opens(viewer, study):
    page = viewer.page
    viewer.open_series(FF_MAP)
    # OHIF's parametric map viewport says so when it takes the map over
    page.get_by_text("The values are multiplied by 100").first.wait_for(timeout=WAIT_MS)
    page.wait_for_timeout(2000)
    viewer.shot("3-pmap-ff")
    assert page.get_by_text("Error loading displaySet").count() == 0
    viewer.assert_no_failure()


@pytest.mark.xfail(strict=True, reason="OHIF 3.13.2 shows a map x100 in a fixed 0..100 window (it expects fractions; "
                                       "the FF map is in %) and NaN (no value) voxels blank the overlay")
def test_parametric_map_overlay_is_visible(viewer, study):
    viewer.open_series(FF_MAP)
    viewer.page.get_by_text("The values are multiplied by 100").first.wait_for(timeout=WAIT_MS)
    coloured = viewer.wait_colour(0.05, timeout=8)
    viewer.shot("3-pmap-ff-overlay")
    assert coloured >= 0.05, f"the map's overlay is not visible ({coloured:.1%} coloured)"


@pytest.mark.xfail(strict=True, reason="OHIF 3.13.2 shows a map only over a volume, and makes no volume of a "
                                       "multi-echo series (several images per position): 'Referenced Volume is "
                                       "missing for the PMAP'")
def test_map_on_the_multi_echo_series_opens(viewer, study):
    page = viewer.page
    viewer.open_series(T2_MAP)
    opened = page.get_by_text("The values are multiplied by 100")
    opened.or_(page.get_by_text(FAILED)).first.wait_for(timeout=WAIT_MS)
    page.wait_for_timeout(1000)
    viewer.shot("3-pmap-t2")
    viewer.assert_no_failure()
    assert opened.count() > 0


def test_summary_page_displays(study, request):
    pages = [d for d, cls in study.series.items() if cls.startswith(SC_CLASSES)]
    if not pages:
        pytest.skip("the node sends no summary page (secondary capture) yet")
    viewer = request.getfixturevalue("viewer")
    viewer.open_series(pages[0])
    viewer.page.locator("[data-cy=viewport-overlay-top-left]", has_text=pages[0][:20]).wait_for(timeout=WAIT_MS)
    viewer.page.wait_for_timeout(1000)
    path = viewer.shot("4-summary-page")
    from PIL import Image
    rgb = np.asarray(Image.open(io.BytesIO(viewer.viewport().screenshot())).convert("L"))
    assert rgb.std() > 10, f"the summary page looks blank ({path})"
    viewer.assert_no_failure()


def _has_scoord(items) -> bool:
    return any(it.ValueType in ("SCOORD", "SCOORD3D") or _has_scoord(it.get("ContentSequence", []))
               for it in items)


def test_sr_opens(viewer, study):
    viewer.open_series(SR_DESC)
    # OHIF reads the SR's measurement groups and says which it can hydrate
    viewer.wait_log(r"rehydratable")
    viewer.page.wait_for_timeout(2000)
    viewer.shot("5-sr")
    viewer.assert_no_failure()


def test_sr_draws_key_slice_outlines_with_values(study, request):
    # Enabled by itself once the node's SR carries TID 1410 planar ROIs (SCOORD on key slices)
    if not _has_scoord(study.sr.ContentSequence):
        pytest.skip("the node's SR has no TID 1410 planar ROI (SCOORD) yet: nothing for OHIF to draw")
    viewer = request.getfixturevalue("viewer")
    viewer.open_series(SR_DESC)
    viewer.wait_log(r"rehydratable")
    # OHIF's SR viewport shows the image of the SR's first measurement group: with a volumetric
    # (TID 1411) group first it stays black, so the planar groups must come first
    label = viewer.viewport().locator("svg text", has_text=re.compile(r"Area.*mm"))
    try:
        label.first.wait_for(timeout=WAIT_MS)
    except Exception as e:   # playwright's TimeoutError
        pytest.fail(f"OHIF drew no outline with its area ({type(e).__name__}); it shows the image of the SR's "
                    "first measurement group, so the TID 1410 planar groups must come before the TID 1411 ones")
    finally:
        viewer.shot("5-sr-key-slice")
    assert viewer.viewport().locator("svg path, svg polyline, svg polygon").count() > 0   # the outline
    viewer.assert_no_failure()
