"""``engine serve`` in a real headless browser: the page plans, runs a 2-step tiny generation and
shows the video and the measured-against-predicted memory table.

Needs Debian's ``chromium`` (``/usr/bin/chromium``) and ``playwright`` (the Python client, driving
that Chromium: no browser download); ``.ci/run`` installs both. Skips, saying which is missing,
where either is not installed. About 30 s with the planner's fits cached.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from engine.cli import main

# what this machine's notes say Chromium needs as root on a closed network
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ROOT = Path(__file__).resolve().parent.parent


def _chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.skip("no browser: Debian's `chromium` is not installed (apt-get install chromium; .ci/run does)")
    pytest.importorskip("playwright.sync_api", reason="playwright is not installed (pip install playwright)")
    pytest.importorskip("gradio", reason="gradio is not installed (pip install engine[serve])")
    return path


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_serving(url: str, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"engine serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"engine serve did not answer at {url} within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def served(tmp_path):
    """``engine serve`` on a free loopback port in a subprocess; its files go under ``tmp_path``."""
    port, log = _free_port(), tmp_path / "serve.log"
    env = {**os.environ, "TMPDIR": str(tmp_path), "GRADIO_TEMP_DIR": str(tmp_path / "gradio"),
           "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONPATH": str(ROOT)}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", "--config", "tiny", "--host",
                                 "127.0.0.1", "--port", str(port)], cwd=tmp_path, env=env, stdout=out,
                                stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        _wait_until_serving(url, proc, log, timeout=90)
        yield url, log
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_serve_refuses_a_non_loopback_host(capsys):
    assert main(["serve", "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err
    assert "`--host` '0.0.0.0' is not a loopback address" in err and "ssh -L" in err


def test_memory_rows_pair_measured_with_predicted():
    from engine.config import load_spec
    from engine.device.spec import catalog_device
    from engine.planner.search import make_plan
    from engine.runtime.executor import StageRecord
    from engine.web.app import MEMORY_HEADERS, memory_rows

    plan = make_plan(load_spec("tiny"), 64, 64, 4, catalog_device("rtx-4090-laptop"), steps=2)
    measured = {s.name: StageRecord(s.name, (), 0.5, s.allocated_bytes // 2) for s in plan.stages}
    measured["denoise"] = StageRecord("denoise", (), 0.5, None)  # a device that gives no peak
    rows = memory_rows(plan, type("Result", (), {"stages": tuple(measured.values())})())
    assert [r[0] for r in rows] == [s.name for s in plan.stages]
    assert all(len(r) == len(MEMORY_HEADERS) for r in rows)
    by_name = {r[0]: r for r in rows}
    assert by_name["vae_decode"][4] == "0.50" and by_name["denoise"][3] == "not measured"


@pytest.mark.slow
def test_page_plans_runs_and_shows_the_video(served):
    chromium = _chromium()
    from playwright.sync_api import sync_playwright

    url, log = served
    with sync_playwright() as pw:
        # launch() gives the browser a new, empty profile directory of its own
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        try:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_selector("#height input", timeout=30_000)
            for name, value in (("height", 64), ("width", 64), ("frames", 4), ("steps", 2)):
                page.fill(f"#{name} input", str(value))
            page.click("#plan")
            # the plan is shown before anything runs (a machine's first plan ever fits the tiny
            # config's memory laws first, a minute or two; about a second once they are cached)
            page.wait_for_function("document.querySelector('#plan-text').innerText.includes('64x64x4, 2 steps')",
                                   timeout=240_000)
            page.click("#generate")
            page.wait_for_selector("#video video[src]", timeout=120_000)
            src = page.get_attribute("#video video", "src")
            page.wait_for_function("document.querySelector('#memory').innerText.includes('denoise')",
                                   timeout=10_000)
            table = page.inner_text("#memory")
        except Exception:
            print(log.read_text()[-3000:])
            raise
        finally:
            browser.close()
    assert src and (".mp4" in src or src.startswith("blob:"))
    assert "measured tensors" in table and "vae_decode" in table
    assert "not measured" not in table  # on the CPU the live-bytes tracker measured every stage
