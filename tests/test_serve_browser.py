"""lens-serve in a real browser: headless Chromium (Debian's chromium + chromium-driver, installed by
tests/setup_browser.sh, which `make test` runs first) driven by selenium.

The server is the console command itself (``python -m lens_train.inference.serve``) in a subprocess,
serving the tiny real run of ``tiny_real_run`` (conftest) on 127.0.0.1 and a free port. The page's
mask (the file it offers for download) must equal the Python API's mask for the same image and
instruction; bad input must show its message and leave the server serving. A screenshot of the
result lands in the test's tmp folder (and where ``LENS_SERVE_SCREENSHOT`` says, e.g. docs/serve.png).
"""

from __future__ import annotations

import io
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

CHROMIUM = "/usr/bin/chromium"
START_TIMEOUT_S = 240  # importing torch + gradio and building the tiny backbones on a busy 2-core machine
RESULT_TIMEOUT_S = 90


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _chromedriver() -> str:
    return shutil.which("chromedriver") or "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def server(tiny_real_run, tmp_path_factory):
    """``lens-serve --checkpoint RUN`` in a subprocess; yields its URL, stops it afterwards."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "server.log"
    # One intra-op thread, as the suite's in-process models (conftest): the same kernels, the same bits.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    command = [sys.executable, "-m", "lens_train.inference.serve", "--checkpoint", str(tiny_real_run.run_dir),
               "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    started = time.perf_counter()
    with open(log_path, "wb") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        while True:
            if process.poll() is not None:
                pytest.fail(f"lens-serve exited with {process.returncode}:\n{log_path.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - started > START_TIMEOUT_S:
                pytest.fail(f"lens-serve did not answer within {START_TIMEOUT_S} s:\n{log_path.read_text()}")
            time.sleep(0.25)
        yield type("Server", (), {"url": url, "log": log_path, "process": process})
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.fixture(scope="module")
def browser():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    if not Path(CHROMIUM).is_file():
        pytest.fail("chromium is not installed: run `sh tests/setup_browser.sh` (make test does)")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                     "--window-size=1400,1500"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(_chromedriver()), options=options)
    yield driver
    driver.quit()


class Page:
    """The Segment tab, by the elem_ids serve.build_app gives its components."""

    def __init__(self, driver, url: str) -> None:
        from selenium.webdriver.support.ui import WebDriverWait

        self.driver = driver
        driver.get(url)
        self.wait = WebDriverWait(driver, RESULT_TIMEOUT_S, poll_frequency=0.1)
        self.wait.until(lambda d: self.find("#lens-image input[type=file]") and self.find("#lens-run"))

    def find(self, css: str):
        from selenium.webdriver.common.by import By

        return self.driver.find_elements(By.CSS_SELECTOR, css)

    def upload(self, path: str | Path) -> None:
        self.find("#lens-image input[type=file]")[0].send_keys(str(path))
        self.wait.until(lambda d: self.find("#lens-image img"))  # the upload reached the server and is shown

    def ask(self, instruction: str) -> None:
        box = self.find("#lens-instruction textarea")[0]
        box.clear()
        if instruction:
            box.send_keys(instruction)
        self.find("#lens-run")[0].click()

    def status_with(self, text: str) -> str:
        self.wait.until(lambda d: text in self.find("#lens-status")[0].text)
        return self.find("#lens-status")[0].text


def test_bad_input_shows_its_message_in_the_page(server, browser, tiny_real_run, tmp_path):
    page = Page(browser, server.url)
    page.upload(tiny_real_run.image_path(0))
    page.ask("")
    assert page.status_with("the instruction is empty").startswith("error:")

    fake = tmp_path / "holiday.png"  # a file that says it is a picture and is not
    fake.write_text("this is not a PNG")
    page.upload(fake)
    page.ask("the hexagons")
    status = page.status_with("cannot read image holiday.png")
    assert "UnidentifiedImageError" in status and "/tmp" not in status
    assert not page.find("#lens-mask a[href]")
    assert server.process.poll() is None


def test_the_pages_mask_equals_the_python_apis(server, browser, tiny_real_run, segmenter, tmp_path):
    text, _ = tiny_real_run.query(0)
    image_path = tiny_real_run.image_path(0)
    page = Page(browser, server.url)  # a fresh page: the server kept serving after the bad requests above
    page.upload(image_path)
    started = time.perf_counter()
    page.ask(text)
    page.wait.until(lambda d: page.find("#lens-mask a[href]"))
    elapsed = time.perf_counter() - started
    link = page.find("#lens-mask a[href]")[0]
    assert link.get_attribute("download") == "mask.png"
    with urllib.request.urlopen(link.get_attribute("href"), timeout=30) as response:
        shown = np.asarray(Image.open(io.BytesIO(response.read())))

    expected = segmenter.segment(image_path, text)
    assert shown.shape == expected.mask.shape and set(np.unique(shown)) <= {0, 255}
    assert np.array_equal(shown == 255, expected.mask)
    status = page.status_with("score (SAM's predicted IoU)")
    assert f"{expected.iou_prediction:.3f}" in status and f"mask {int(expected.mask.sum())} px" in status
    assert float(page.find("#lens-score input")[0].get_attribute("value")) == pytest.approx(
        expected.iou_prediction, abs=1e-4)
    assert page.find("#lens-overlay img") and page.find("#lens-heatmap img")

    shot = tmp_path / "serve.png"
    assert browser.save_screenshot(str(shot)) and Image.open(shot).size[0] > 0
    if os.environ.get("LENS_SERVE_SCREENSHOT"):
        shutil.copyfile(shot, os.environ["LENS_SERVE_SCREENSHOT"])
    print(f"lens-serve answered in {elapsed:.2f} s (browser click to download link); screenshot {shot}")
