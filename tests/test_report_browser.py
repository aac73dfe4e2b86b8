"""Open the rendered report.html in headless Chromium: images load, no console errors, not blank.

Needs Debian's ``chromium`` and ``chromium-driver`` packages and the selenium package;
the test is skipped when either is missing.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import pytest

from builders import Planned, build_store
from mnistbench.report import write_report

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1280,2400",
)
MATRIX = {"name": "browser", "seeds": 5,
          "factors": {"activation": ["relu", "sigmoid"], "pool": [False, True]}}


def plan(cell, seed):
    if cell.settings.activation == "relu" and seed < 2:
        return Planned(accuracy=0.2, collapse_class=7 - seed)
    if cell.settings.pool and cell.settings.activation == "relu":
        return None
    return Planned(accuracy=0.92 - 0.07 * cell.settings.pool + 0.002 * seed)


@pytest.fixture(scope="module")
def driver(tmp_path_factory):
    webdriver = pytest.importorskip("selenium.webdriver")
    if not (shutil.which(CHROMIUM) and shutil.which(CHROMEDRIVER)):
        pytest.skip("headless Chromium needs: apt-get install -y chromium chromium-driver")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in CHROMIUM_FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = webdriver.ChromeService(executable_path=CHROMEDRIVER)
    browser = webdriver.Chrome(options=options, service=service)
    yield browser
    browser.quit()


@pytest.fixture(scope="module")
def report_page(driver, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("browser")
    build_store(directory / "s.sqlite", MATRIX, plan).close()
    paths = write_report(directory / "s.sqlite", directory / "out")
    driver.get(paths.html.as_uri())
    return paths.html


def test_every_image_loads(driver, report_page):
    sizes = driver.execute_script(
        "return Array.from(document.images, i => [i.complete, i.naturalWidth, i.naturalHeight]);")
    assert len(sizes) == 4
    for complete, width, height in sizes:
        assert complete
        assert width > 200
        assert height > 100


def test_no_console_errors_or_requests(driver, report_page):
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert errors == []
    resources = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);")
    assert [name for name in resources if not name.startswith("data:")] == []


def test_page_shows_report(driver, report_page):
    assert driver.title == "mnistbench report: browser"
    body = driver.find_element("tag name", "body").text
    assert "Claims from the original hand-tuned experiments" in body
    assert "max-pooling (pool=true vs pool=false) lowers final accuracy by" in body


def test_screenshot_not_blank(driver, report_page, tmp_path):
    image_module = pytest.importorskip("PIL.Image")
    png = driver.get_screenshot_as_png()
    (tmp_path / "report.png").write_bytes(png)
    image = image_module.open(io.BytesIO(png)).convert("RGB")
    assert image.size[0] >= 1000
    assert image.size[1] >= 1000
    colours = image.getcolors(maxcolors=1 << 20)
    assert colours is not None
    assert len(colours) > 200
    share_of_commonest = max(count for count, _ in colours) / (image.size[0] * image.size[1])
    assert share_of_commonest < 0.95
