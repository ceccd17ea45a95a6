"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``), driven over the
DevTools protocol, against a live demo federation on mosquitto. The page must show the boards
and a rising round counter by itself (no reload), and a screenshot is saved
(``$CAHFP_SCREENSHOT_DIR/dashboard.png`` when set, as docs/dashboard.png was made)."""

from __future__ import annotations

import base64
import itertools
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from tests.conftest import missing
from tests.deploy.test_demo import demo


class Browser:
    """Headless Chromium with one page, spoken to over the DevTools protocol."""

    def __init__(self, profile: Path):
        exe = shutil.which("chromium") or shutil.which("chromium-browser")
        if not exe:
            missing("chromium is not installed (apt-get install chromium)")
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--remote-debugging-port=0", f"--user-data-dir={profile}",
             "--window-size=1200,900", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + 60
        while not port_file.is_file() or not port_file.read_text().strip():
            alive = self.proc.poll() is None
            assert alive and time.monotonic() < deadline, "chromium did not start"
            time.sleep(0.1)
        port = port_file.read_text().split()[0]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as r:
            page = next(t for t in json.loads(r.read()) if t["type"] == "page")
        from websockets.sync.client import connect

        self.ws = connect(page["webSocketDebuggerUrl"], max_size=2**26)
        self.ids = itertools.count(1)

    def call(self, method: str, **params) -> dict:
        n = next(self.ids)
        self.ws.send(json.dumps({"id": n, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv(timeout=60))
            if msg.get("id") == n:
                assert "error" not in msg, msg
                return msg["result"]

    def js(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)[
            "result"
        ].get("value")

    def close(self) -> None:
        self.ws.close()
        self.proc.kill()
        self.proc.wait(10)


@pytest.mark.slow
def test_the_dashboard_shows_boards_and_rounds_in_a_browser(fmnist_root, tmp_path):
    if not shutil.which("mosquitto"):
        missing("mosquitto is not installed")
    proc = demo("--out", str(tmp_path / "run"), "--data-dir", str(fmnist_root),
                "--dashboard", "127.0.0.1:0", "--broker", "mosquitto")  # fmt: skip
    browser = None
    try:
        line = ""
        while "dashboard:" not in line:
            line = proc.stdout.readline()
            assert line, "the demo ended without a dashboard line"
        url = re.search(r"dashboard: (http://\S+/)", line).group(1)
        browser = Browser(tmp_path / "chromium")
        browser.call("Page.navigate", url=url)
        seen, rows = [], 0
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            text = browser.js("document.getElementById('round').textContent") or ""
            m = re.match(r"(\d+) / 2", text)
            if m:
                seen.append(int(m.group(1)))
            rows = browser.js("document.querySelectorAll('#boards tbody tr').length") or 0
            done = browser.js("document.querySelectorAll('#rounds tbody tr').length") or 0
            if rows == 3 and len(set(seen)) >= 2 and done >= 2:  # round 1 has ended
                break
            time.sleep(0.5)
        assert rows == 3, browser.js("document.body.innerText")
        assert len(set(seen)) >= 2 and seen == sorted(seen), seen  # rising, without a reload
        boards = browser.js("document.querySelector('#boards tbody').innerText")
        for cid in ("demo-0", "demo-1", "demo-2"):
            assert cid in boards
        assert "online" in boards
        shot = base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])
        assert shot[:8] == b"\x89PNG\r\n\x1a\n" and len(shot) > 10_000
        (tmp_path / "dashboard.png").write_bytes(shot)
        if os.environ.get("CAHFP_SCREENSHOT_DIR"):
            Path(os.environ["CAHFP_SCREENSHOT_DIR"], "dashboard.png").write_bytes(shot)
    finally:
        if browser:
            browser.close()
        out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
