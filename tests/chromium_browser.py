"""A real headless Chromium driven over the DevTools protocol, shared by the session (a pytest plugin module).

Test modules that need it say `pytest_plugins = ["tests.chromium_browser"]` and take the `chromium`
fixture. Debian's `chromium` package is installed by launch/install_debian.sh when missing. The
protocol goes over aiohttp's websocket client (aiohttp comes with ray[default]; listed in the dev extra):
no browser download, no driver process, and the tests see every network event the page causes.

    tab = chromium.open(Path("site/index.html"))   # waits for the load event
    tab.evaluate("document.images.length")
    tab.requests                                   # every URL the page asked for, from Network events
"""
from __future__ import annotations

import asyncio
import base64
import json
import shutil
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Iterator, List, Optional

import aiohttp
import pytest

from tests.launch_helpers import ServerProcess

REPO = Path(__file__).resolve().parents[1]


def ensure_chromium_installed() -> str:
    """The chromium binary, installing Debian's package if missing; fails the test run if that fails."""
    if not shutil.which("chromium"):
        done = subprocess.run(["bash", str(REPO / "launch" / "install_debian.sh"), "chromium,chromedriver",
                             "chromium", "chromium-driver"], capture_output=True, text=True)
        if done.returncode or not shutil.which("chromium"):
            pytest.fail(f"could not install Debian's chromium (root and apt are needed):\n{done.stderr[-2000:]}")
    return shutil.which("chromium")


class Tab:
    """One page target: commands return their result; events are kept in `events` as they arrive."""

    def __init__(self, browser: "Chromium", ws_url: str) -> None:
        self._loop = browser.loop
        self._session: Optional[aiohttp.ClientSession] = None
        self._ws = self._loop.run_until_complete(self._connect(ws_url))
        self._next_id = 0
        self.events: List[dict] = []

    async def _connect(self, ws_url: str):
        self._session = aiohttp.ClientSession()
        # Screenshots of a whole page arrive as one large message.
        return await self._session.ws_connect(ws_url, max_msg_size=256 * 1024 * 1024)

    async def _receive(self, until, timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium")
            msg = json.loads((await self._ws.receive(timeout=left)).data)
            if "method" in msg:
                self.events.append(msg)
            if until(msg):
                return msg

    def send(self, method: str, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        call_id = self._next_id

        async def call():
            await self._ws.send_str(json.dumps({"id": call_id, "method": method, "params": params}))
            return await self._receive(lambda m: m.get("id") == call_id, timeout)

        answer = self._loop.run_until_complete(call())
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer.get("result", {})

    def wait_event(self, method: str, timeout: float = 30.0) -> dict:
        for event in self.events:
            if event["method"] == method:
                return event
        return self._loop.run_until_complete(self._receive(lambda m: m.get("method") == method, timeout))

    def evaluate(self, expression: str):
        """A JavaScript expression's value (JSON-serialisable), awaiting it if it is a promise."""
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    @property
    def requests(self) -> List[str]:
        return [e["params"]["request"]["url"] for e in self.events if e["method"] == "Network.requestWillBeSent"]

    def move_mouse(self, x: float, y: float) -> None:
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def screenshot(self, path: Path, full_page: bool = False) -> Path:
        params = {"format": "png"}
        if full_page:
            size = self.send("Page.getLayoutMetrics")["cssContentSize"]
            params.update(captureBeyondViewport=True,
                          clip={"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1})
        path.write_bytes(base64.b64decode(self.send("Page.captureScreenshot", **params)["data"]))
        return path

    def close(self) -> None:
        self._loop.run_until_complete(self._ws.close())
        self._loop.run_until_complete(self._session.close())


class Chromium(ServerProcess):
    """One headless chromium process with a throw-away profile under `workdir`."""
    LOG = "chromium.log"

    def __init__(self, workdir: Path, width: int = 1400, height: int = 900) -> None:
        self.workdir, self.width, self.height = workdir, width, height
        self.loop = asyncio.new_event_loop()
        self._proc: Optional[subprocess.Popen] = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> None:
        profile = self.workdir / "profile"
        port_file = profile / "DevToolsActivePort"
        port_file.unlink(missing_ok=True)  # a reused profile's file names the last browser's port
        log = open(self.workdir / self.LOG, "ab")
        # --no-sandbox: CI runs as root, where chromium refuses its sandbox. Port 0: chromium picks a free
        # port and writes it to DevToolsActivePort in the profile.
        self._proc = subprocess.Popen(
            [ensure_chromium_installed(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
             "--no-default-browser-check", "--disable-extensions", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--hide-scrollbars",
             f"--window-size={self.width},{self.height}", "--remote-debugging-port=0",
             "--remote-allow-origins=*", f"--user-data-dir={profile}", "about:blank"],
            stdout=log, stderr=subprocess.STDOUT)
        log.close()
        deadline = time.monotonic() + timeout
        while not (port_file.is_file() and port_file.read_text().strip()):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"chromium did not start; log:\n{self.log_tail()}")
            time.sleep(0.1)
        self.port = int(port_file.read_text().split()[0])

    def open(self, page: Path) -> Tab:
        """A new tab with network events on, at file://page, after its load event."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/json/new?about:blank", method="PUT")
        with urllib.request.urlopen(request, timeout=10) as r:
            target = json.load(r)
        tab = Tab(self, target["webSocketDebuggerUrl"])
        # The window's size less its (headless) frame: fix the viewport itself, so screenshots are its size.
        tab.send("Emulation.setDeviceMetricsOverride", width=self.width, height=self.height, deviceScaleFactor=1,
                 mobile=False)
        tab.send("Network.enable")
        tab.send("Page.enable")
        tab.send("Page.navigate", url=page.resolve().as_uri())
        tab.wait_event("Page.loadEventFired", timeout=60)
        return tab

    def stop(self) -> None:
        super().stop()
        self.loop.close()


@pytest.fixture(scope="session")
def chromium(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Chromium]:
    browser = Chromium(tmp_path_factory.mktemp("chromium"))
    browser.start()
    try:
        yield browser
    finally:
        browser.stop()
