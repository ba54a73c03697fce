"""What a user sees, the way they see it: a command-line run in a terminal, then its flow run in the Prefect
UI rendered by Debian's Chromium (headless, driven by chromium-driver) against a real Prefect server.

One run of two experiments, one of them fed a corrupt table, so the run fails: the terminal shows short
lines and no Dask log noise, the report artifact's figures load in the browser, tables hold rounded
numbers, the failed run's log ends without a traceback, and a task page shows the experiment's epochs.
Screenshots of every page go to ``test-output/ui/`` (or ``$EVEREST_TEST_OUTPUT/ui``) for a person to look at.
Without Chromium the test skips, unless ``EVEREST_REQUIRE_BROWSER=1`` (CI sets it) makes that a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from tables import spoil_once_checked
from tiny import overrides

pytestmark = pytest.mark.slow  # a real Prefect server, a command-line study and Chromium

CHROMIUM, DRIVER = shutil.which("chromium"), shutil.which("chromedriver")
SHOTS = Path(os.environ.get("EVEREST_TEST_OUTPUT", Path(__file__).resolve().parent.parent / "test-output")) / "ui"


def _post(api: str, path: str, body: dict) -> list[dict]:
    request = urllib.request.Request(api + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as r:
        return json.load(r)


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and DRIVER):
        if os.environ.get("EVEREST_REQUIRE_BROWSER") == "1":
            pytest.fail("chromium and chromium-driver are required (apt-get install chromium chromium-driver)")
        pytest.skip("needs Debian's chromium and chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=options)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def failed_cli_run(prefect_server, tiny_data, tmp_path_factory):
    """``python -m flows.production`` as a user types it, C-24 fine and M-24 with a corrupt training table."""
    base = tmp_path_factory.mktemp("ui-run")
    data = base / "data"
    shutil.copytree(tiny_data, data)
    table = data / "training_data_M_24.csv"
    lines = table.read_text().splitlines(keepends=True)
    lines[2] = re.sub(r",[-0-9.eE]*(\r?\n)$", r",not-a-number\1", lines[2])
    spoil_once_checked(base / "out", table, "".join(lines))  # corrupt once the run has checked it: its task fails
    argv = [sys.executable, "-m", "flows.production", "--targets", "C-24", "M-24", "--seeds", "0", "--data-dir",
            str(data), "--output-dir", str(base / "out"), *[f"--set={o}" for o in overrides("train.epochs=1")]]
    started = time.time()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, env={**os.environ, "COLUMNS": "120"})
    runs = _post(prefect_server, "/flow_runs/filter", {"sort": "START_TIME_DESC", "limit": 1})
    assert runs and runs[0]["start_time"], proc.stdout + proc.stderr
    assert time.mktime(time.strptime(runs[0]["start_time"][:19], "%Y-%m-%dT%H:%M:%S")) > started - 3600
    return proc, runs[0]


def _wait_for(driver, script: str, timeout: float = 45.0):
    """Poll a JavaScript expression until it is truthy (the UI renders asynchronously)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = driver.execute_script(f"return {script}")
        if value:
            return value
        time.sleep(0.5)
    return driver.execute_script(f"return {script}")


def _open(driver, url: str | None, shot: str, ready: str):
    """Load ``url`` (None: stay on the page), wait until ``ready`` holds, save a whole-page screenshot."""
    if url:
        driver.get(url)
    value = _wait_for(driver, ready)
    time.sleep(1.0)  # let late widgets settle before the screenshot
    SHOTS.mkdir(parents=True, exist_ok=True)
    height = driver.execute_script("return Math.max(document.body.scrollHeight, "
                                   "...Array.from(document.querySelectorAll('*')).map(e => e.scrollHeight))")
    driver.set_window_size(1400, min(max(height, 1000), 12000))
    driver.save_screenshot(str(SHOTS / shot))
    driver.set_window_size(1400, 1800)
    return value


def test_terminal_shows_the_run_not_the_logs(failed_cli_run):
    proc, _ = failed_cli_run
    out = proc.stdout
    assert proc.returncode == 1, out + proc.stderr
    assert out.startswith("everest-production: 2 experiments (C-24, M-24 x seeds 0) + 4 baseline fits"), out
    assert re.search(r"^\[\d/2\] everest_C_24h_seed0: test TSS -?\d\.\d{3}, threshold [\d.e-]+, trained in [\d.]+ s  "
                     r"\(\d of 2 finished", out, re.M), out
    assert re.search(r"^\[\d/2\] everest_M_24h_seed0: FAILED: DataError: .*not-a-number", out, re.M), out
    assert re.search(r"^flow run [\w-]+: watch it at http://127\.0\.0\.1:\d+/runs/flow-run/[0-9a-f-]{36}$", out, re.M)
    assert "report: " in out and "plots:  " in out and "run history: open http" in out
    terminal = out + proc.stderr
    assert len(re.findall(r"distributed\.[a-z]", terminal)) == 0, terminal
    assert "Traceback" not in terminal and "Finished in state" not in terminal, terminal


def test_report_figures_load_in_the_browser(browser, failed_cli_run, prefect_server):
    _, run = failed_cli_run
    arts = _post(prefect_server, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    (report,) = [a for a in arts if a["type"] == "markdown" and a["key"].startswith("everest-report")]
    assert "1 of 2 experiments finished" in report["description"] and "attempt 1" in report["description"]
    n_links = len(re.findall(r"!\[[^\]]*\]\(data:image/png;base64,", report["data"]))
    assert n_links >= 5 and "](../plots" not in report["data"]
    url = prefect_server.removesuffix("/api") + f"/artifacts/artifact/{report['id']}"
    figures_js = "Array.from(document.images).filter(i => i.src.startsWith('data:image'))"
    images = _open(browser, url, "report.png", f"{figures_js}.length >= 5 && {figures_js}.every(i => i.complete) && "
                   "Array.from(document.images).map(i => [i.src.slice(0, 22), i.naturalWidth])")
    figures = [w for src, w in images if src.startswith("data:image")]
    assert len(figures) == n_links and all(w > 0 for w in figures), images
    assert "Failed experiments" in browser.find_element("tag name", "body").text


def test_report_artifact_answers_on_its_first_screen(browser, failed_cli_run, prefect_server):
    """At 1400 x 1000 px, before any scrolling: every target's line (C-24 with its verdict word, M-24, which
    failed, with why it has none) and the verdict figure, above the first table; screenshot of that screen."""
    _, run = failed_cli_run
    arts = _post(prefect_server, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    (report,) = [a for a in arts if a["type"] == "markdown" and a["key"].startswith("everest-report")]
    browser.set_window_size(1400, 1000)
    try:
        browser.get(prefect_server.removesuffix("/api") + f"/artifacts/artifact/{report['id']}")
        figure = "Array.from(document.images).find(i => i.alt.startsWith('Verdict'))"
        assert _wait_for(browser, f"{figure} && {figure}.complete && {figure}.naturalWidth > 0")
        time.sleep(1.0)
        SHOTS.mkdir(parents=True, exist_ok=True)
        browser.save_screenshot(str(SHOTS / "report-first-screen.png"))
        screen = browser.execute_script(f"""
            const top = e => e ? e.getBoundingClientRect().top : Infinity;
            const lines = Array.from(document.querySelectorAll('li')).filter(li => /^(C|M)-24:/.test(li.innerText));
            return {{height: window.innerHeight, figure: top({figure}),
                     figureBottom: {figure}.getBoundingClientRect().bottom, table: top(document.querySelector('table')),
                     lines: lines.map(li => [li.innerText, top(li)])}};""")
    finally:
        browser.set_window_size(1400, 1800)
    lines: dict[str, tuple[str, float]] = {}
    for text, y in screen["lines"]:  # the first line of each target: the first screen's (sentences follow)
        lines.setdefault(text.split(":")[0], (text, y))
    assert set(lines) == {"C-24", "M-24"}, screen
    assert re.search(r"→ (beats|ties|trails)$", lines["C-24"][0]) and "no verdict" in lines["M-24"][0], lines
    assert all(y < screen["height"] for _, y in lines.values()), screen
    assert screen["figure"] < screen["height"] and screen["figureBottom"] <= screen["table"], screen


def test_metrics_table_shows_rounded_numbers(browser, failed_cli_run, prefect_server):
    _, run = failed_cli_run
    arts = _post(prefect_server, "/artifacts/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    (table,) = [a for a in arts if a["type"] == "table" and a["key"].startswith("everest-final-metrics")]
    url = prefect_server.removesuffix("/api") + f"/artifacts/artifact/{table['id']}"
    text = _open(browser, url, "metrics-table.png", "document.body.innerText.includes('everest_C_24h_seed0') && "
                 "document.body.innerText")
    assert "everest_C_24h_seed0" in text and "logistic" in text
    assert not re.search(r"\d\.\d{6,}", text), text


def test_failed_run_log_ends_without_a_traceback(browser, failed_cli_run, prefect_server):
    _, run = failed_cli_run
    assert run["state_type"] == "FAILED" and "1 of 2 experiments failed: everest_M_24h_seed0" in run["state"]["message"]
    url = prefect_server.removesuffix("/api") + f"/runs/flow-run/{run['id']}"
    text = _open(browser, url, "flow-run.png", "document.body.innerText.includes('experiments failed') && "
                 "document.body.innerText")
    assert "everest_M_24h_seed0: FAILED: DataError" in text, text
    assert "Traceback" not in text and "TypeError" not in text, text
    logs = _post(prefect_server, "/logs/filter", {"logs": {"flow_run_id": {"any_": [run["id"]]}},
                                                   "sort": "TIMESTAMP_ASC", "limit": 200})
    assert "Traceback" not in logs[-1]["message"] and "experiments failed" in logs[-1]["message"], logs[-1]
    assert browser.execute_script(  # the run page's Artifacts tab, as a user clicks it
        "const tab = Array.from(document.querySelectorAll('[role=tablist] > *'))"
        ".find(e => e.innerText.trim() === 'Artifacts'); if (tab) tab.click(); return !!tab;")
    _open(browser, None, "flow-run-artifacts.png", "document.body.innerText.includes('everest-report')")


def test_task_page_shows_the_experiments_epochs(browser, failed_cli_run, prefect_server):
    _, run = failed_cli_run
    tasks = _post(prefect_server, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
    (train,) = [t for t in tasks if t["name"] == "train-everest_C_24h_seed0"]
    url = prefect_server.removesuffix("/api") + f"/runs/task-run/{train['id']}"
    text = _open(browser, url, "task-run.png", "document.body.innerText.includes('epoch 1/1') && "
                 "document.body.innerText")
    assert re.search(r"epoch 1/1: loss \d+\.\d{4}, validation loss \d+\.\d{4}, validation TSS -?\d\.\d{3}", text), text
    assert re.search(r"everest_C_24h_seed0: test TSS -?\d\.\d{3}, threshold", text), text
    analysis = [t for t in tasks if t["name"].startswith("analyse-results")]
    assert analysis and len(analysis[0]["task_inputs"]["wait_for"]) == 2 + 4  # 2 experiments, 4 baseline fits
