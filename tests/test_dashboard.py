"""The dashboard at ``/``, in headless Chromium (Debian's chromium and chromedriver, driven
by Selenium; no browser download): the static files need no token and stay out of the
OpenAPI document, plotly.min.js comes from the installed plotly package, and after a sign-in
with a coordinator's token the completeness grid, a subject's trajectory plots and the
cohort plot render with no console error. Screenshots go to the test's folder; with
``MUSCLENODE_SCREENSHOT=1`` one also goes to ``docs/dashboard.png`` (the README's)."""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def _base(node) -> str:
    return f"http://127.0.0.1:{node.web.port}"


def test_static_files_need_no_token(web_node):
    node, *_ = web_node
    with httpx.Client(base_url=_base(node), timeout=30) as c:
        page = c.get("/")
        assert page.status_code == 200 and "text/html" in page.headers["content-type"]
        assert "/static/plotly.min.js" in page.text and "https://" not in page.text   # nothing from the internet
        for path in ("/static/dashboard.js", "/static/dashboard.css"):
            r = c.get(path)
            assert r.status_code == 200 and "https://" not in r.text, path
        plotly = c.get("/static/plotly.min.js")
        assert plotly.status_code == 200 and "javascript" in plotly.headers["content-type"]
        import plotly as plotly_package
        shipped = Path(plotly_package.__file__).parent / "package_data" / "plotly.min.js"
        assert plotly.content == shipped.read_bytes()
        assert not (ROOT / "node" / "web" / "static" / "plotly.min.js").exists()   # served, never copied
        assert c.get("/static/nothing.js").status_code == 404
        paths = c.get("/api/v1/openapi.json").json()["paths"]
        assert not any(p == "/" or p.startswith("/static") for p in paths)


@pytest.fixture
def browser():
    """Headless Chromium with its console log kept; skipped where Debian's chromium is missing."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1280,800", "--hide-scrollbars"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def test_dashboard_in_chromium(web_node, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from node.web.tokens import create_token
    node, *_ = web_node
    token = create_token(node.engine, "coord-dashboard", "coordinator")
    with httpx.Client(base_url=_base(node), headers={"Authorization": f"Bearer {token}"}, timeout=30) as c:
        codes = [s["subject"] for s in c.get("/api/v1/subjects").json()]
    wait = WebDriverWait(browser, 60)
    shots = []

    def shot(name):
        path = tmp_path / f"{name}.png"
        assert browser.save_screenshot(str(path))
        shots.append(path)

    browser.get(_base(node) + "/")
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    shot("signin")
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
    # the grid: one row per subject, one column per visit label, every visit done
    wait.until(lambda d: d.execute_script("return document.body.dataset.ready === '1'"))
    rows = browser.find_elements(By.CSS_SELECTOR, "#grid tbody tr")
    assert sorted(r.get_attribute("data-subject") for r in rows) == sorted(codes)
    heads = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "#grid thead th")]
    assert heads[1:] == ["Regions", "Group", "baseline", "month 6"]
    assert len(browser.find_elements(By.CSS_SELECTOR, "#grid td.state-done")) == 4
    # the first subject's trajectories and the cohort plot are drawn
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#trajectories .js-plotly-plot .main-svg")) >= 2)
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#cohort-plot .js-plotly-plot .main-svg, "
                                                          "#cohort-plot.js-plotly-plot .main-svg"))
    metrics = {d.get_attribute("data-metric") for d in browser.find_elements(By.CSS_SELECTOR, "#trajectories .plot")}
    assert {"csa_mm2", "ff_percent"} <= metrics
    notes = browser.find_element(By.ID, "trajectories").text
    assert "baseline" in notes and "Δ" in notes              # the baseline marked, the change annotated
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stats dd[data-field=n]"))   # the node's /api/v1/stats
    shot("dashboard")
    if os.environ.get("MUSCLENODE_SCREENSHOT") == "1":   # the README's: a 1920x1200 layout as a 1280x800 image
        browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                                {"width": 1920, "height": 1200, "deviceScaleFactor": 2 / 3, "mobile": False})
        browser.execute_script("window.scrollTo(0, 0); window.dispatchEvent(new Event('resize'))")
        time.sleep(1.0)   # the plots redraw at the new width
        (ROOT / "docs").mkdir(exist_ok=True)
        assert browser.save_screenshot(str(ROOT / "docs" / "dashboard.png"))
        browser.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    # another subject, chosen in the grid
    other = next(c for c in codes if c != browser.find_element(By.ID, "subject-title").text)
    browser.find_element(By.CSS_SELECTOR, f"#grid tr[data-subject='{other}'] button.subject-link").click()
    wait.until(lambda d: d.find_element(By.ID, "subject-title").text == other)
    wait.until(lambda d: len(d.find_elements(By.CSS_SELECTOR, "#trajectories .js-plotly-plot .main-svg")) >= 2)
    wait.until(lambda d: "Δ" in d.find_element(By.ID, "trajectories").text)
    browser.execute_script("document.getElementById('subject-section').scrollIntoView()")
    shot("subject")
    browser.execute_script("document.getElementById('cohort-section').scrollIntoView()")
    shot("cohort")
    # printable: Chromium's print to PDF (the print CSS: A4 landscape)
    pdf = base64.b64decode(browser.print_page())
    (tmp_path / "dashboard.pdf").write_bytes(pdf)
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": "print"})
    browser.execute_script("window.scrollTo(0, 0)")
    shot("print")
    assert not browser.find_element(By.ID, "signout").is_displayed()   # no controls on paper
    browser.execute_cdp_cmd("Emulation.setEmulatedMedia", {"media": ""})
    assert pdf.startswith(b"%PDF") and pdf.count(b"/Type /Page") - pdf.count(b"/Type /Pages") >= 3
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
    assert all(p.stat().st_size > 10_000 for p in shots)


def test_stats_panels_where_the_node_has_stats(web_node, browser):
    """The statistics panel shows the node's /api/v1/stats fields for the chosen metric, and
    the correlation panel (with its scatter plot) appears once an uploaded score is named."""
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from node.web.tokens import create_token
    node, *_ = web_node
    token = create_token(node.engine, "coord-stats", "coordinator")
    base = f"http://127.0.0.1:{node.web.port}"
    with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {token}"}, timeout=60) as c:
        codes = sorted(s["subject"] for s in c.get("/api/v1/subjects").json())
        lines = ["subject,visit,knee_extension[N]"] + [f"{code},{visit},{300 - 20 * k - 15 * m}"
                                                       for k, code in enumerate(codes)
                                                       for m, visit in enumerate(("baseline", "month 6"))]
        assert c.post("/api/v1/scores", files={"file": ("s.csv", "\n".join(lines) + "\n", "text/csv")}).json()[
            "stored"] == 2 * len(codes)
    wait = WebDriverWait(browser, 60)
    browser.get(f"{base}/")
    wait.until(lambda d: d.find_element(By.ID, "token").is_displayed())
    browser.find_element(By.ID, "token").send_keys(token)
    browser.find_element(By.CSS_SELECTOR, "#signin button[type=submit]").click()
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#stats dd[data-field=srm]"))
    fields = {e.get_attribute("data-field"): e.text for e in browser.find_elements(By.CSS_SELECTOR, "#stats dd")}
    assert list(fields) == ["n", "mean", "sd", "srm", "srm_ci", "n_per_arm_25", "n_per_arm_50"]
    assert fields["n"] == str(len(codes))
    assert browser.find_element(By.ID, "correlation-section").is_displayed()
    assert not browser.find_element(By.ID, "correlation-panel").is_displayed()
    browser.find_element(By.ID, "score").send_keys("knee_extension\t")
    wait.until(lambda d: d.find_element(By.ID, "correlation-panel").is_displayed())
    wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#correlation-plot .main-svg"))
    assert "pearson_r" in browser.find_element(By.ID, "correlation").text
    severe = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert not severe, severe
