"""A headless Chromium driven over the DevTools protocol (websocket-client), for the report pages' tests.

No Selenium or Playwright: Debian's ``chromium`` package and one websocket. :func:`find_chromium` finds the browser
(``$SMT_CHROMIUM``, then ``chromium``, ``chromium-browser``, ``google-chrome`` on ``PATH``); :func:`crawl` opens
every page reachable from a start page inside a folder and reports console errors, uncaught exceptions, failed
loads and ``<a href>``/``<img src>`` targets that do not exist.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from urllib.parse import unquote, urlparse

HOW_TO_GET_ONE = ("no Chromium found: install it (Debian/Ubuntu: `apt-get install -y chromium`; .ci/run does) or "
                  "point $SMT_CHROMIUM at a Chrome/Chromium binary")


def find_chromium() -> str | None:
    for name in (os.environ.get("SMT_CHROMIUM"), "chromium", "chromium-browser", "google-chrome"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


class Browser:
    """One headless browser with one page; ``events`` collects console errors, exceptions and failed loads."""

    def __init__(self, binary: str, width: int = 1280, height: int = 900):
        import websocket

        self._profile = tempfile.mkdtemp(prefix="smt-chromium-")
        self.proc = subprocess.Popen(
            [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--disable-sync", "--no-first-run", "--mute-audio",
             f"--user-data-dir={self._profile}", "--remote-debugging-port=0", f"--window-size={width},{height}",
             "about:blank"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        port = None
        deadline = time.monotonic() + 60
        while port is None and time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"{binary} exited with {self.proc.returncode} before listening")
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            port = int(m.group(1)) if m else None
        if port is None:
            self.close()
            raise RuntimeError(f"{binary} did not open its DevTools port within 60 s")
        pages = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30).read())
        ws_url = next(p["webSocketDebuggerUrl"] for p in pages if p.get("type") == "page")
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self._id = 0
        self.errors: list[str] = []
        self._events: list[dict] = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.send(f"{domain}.enable")

    def _record(self, msg: dict) -> None:
        method, p = msg.get("method"), msg.get("params", {})
        if method == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert"):
            self.errors.append("console: " + " ".join(str(a.get("value", a.get("description"))) for a in p["args"]))
        elif method == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            self.errors.append(f"exception: {d.get('exception', {}).get('description', d.get('text'))}")
        elif method == "Log.entryAdded" and p["entry"]["level"] == "error":
            self.errors.append(f"log: {p['entry']['text']} {p['entry'].get('url', '')}")
        elif method == "Network.loadingFailed" and not p.get("canceled"):
            self.errors.append(f"load failed: {p.get('errorText')}")
        self._events.append(msg)

    def send(self, method: str, **params):
        self._id += 1
        self.ws.send(json.dumps({"id": self._id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self._id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self._record(msg)

    def _wait_event(self, method: str, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            msg = json.loads(self.ws.recv())
            self._record(msg)
            if msg.get("method") == method:
                return
        raise TimeoutError(method)

    def open(self, url: str) -> None:
        self._events.clear()
        self.send("Page.navigate", url=url)
        self._wait_event("Page.loadEventFired")
        self.eval("new Promise(r => requestAnimationFrame(() => requestAnimationFrame(r)))")

    def eval(self, expression: str):
        res = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in res:
            raise RuntimeError(f"{expression}: {res['exceptionDetails']}")
        return res["result"].get("value")

    def key(self, key: str, code: str | None = None, modifiers: int = 0) -> None:
        """A real key press (keyDown, char, keyUp); modifiers: 1 Alt, 2 Ctrl, 4 Meta, 8 Shift."""
        named = {"ArrowLeft": 37, "ArrowUp": 38, "ArrowRight": 39, "ArrowDown": 40}
        args = {"key": key, "code": code or (key if key in named else f"Key{key.upper()}" if key.isalpha()
                                              else f"Digit{key}" if key.isdigit() else ""),
                "windowsVirtualKeyCode": named.get(key, ord(key.upper()) if len(key) == 1 else 0),
                "modifiers": modifiers}
        self.send("Input.dispatchKeyEvent", type="rawKeyDown" if key in named else "keyDown",
                  **({"text": key} if len(key) == 1 and key not in named else {}), **args)
        self.send("Input.dispatchKeyEvent", type="keyUp", **args)

    def click(self, x: float, y: float) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def screenshot(self) -> bytes:
        return base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"])

    def close(self) -> None:
        try:
            self.ws.close()
        except Exception:  # noqa: BLE001 - closing a browser that may already be gone
            pass
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        shutil.rmtree(self._profile, ignore_errors=True)


def _local(url: str) -> Path | None:
    parsed = urlparse(url)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def crawl(browser: Browser, start: Path, inside: Path, limit: int = 500) -> dict[str, list[str]]:
    """Open ``start`` and every ``.html`` page under ``inside`` linked from it (breadth first, at most
    ``limit``); per page, the problems found (empty lists for clean pages)."""
    queue, seen, report = [start.resolve()], {start.resolve()}, {}
    while queue and len(report) < limit:
        page = queue.pop(0)
        browser.errors.clear()
        browser.open(page.as_uri())
        problems = list(browser.errors)
        targets = browser.eval("Array.from(document.querySelectorAll('a[href], img[src], script[src], link[href]'))"
                               ".map(e => [e.tagName, e.href || e.src])")
        for tag, url in targets:
            if url.startswith(("http:", "https:")):
                problems.append(f"{tag} loads from the network: {url}")
                continue
            target = _local(url)
            if target is None:
                continue  # mailto:, javascript:, data: URIs
            if not target.exists():
                problems.append(f"{tag} target missing: {target}")
            elif tag == "A" and target.suffix == ".html" and inside.resolve() in target.resolve().parents \
                    and target.resolve() not in seen:
                seen.add(target.resolve())
                queue.append(target.resolve())
        report[str(page)] = problems
    return report
