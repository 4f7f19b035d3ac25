"""Load a page in headless Chromium and read back what a person would see: console errors, whether every
image decoded, the load time, a full-page screenshot.

Chromium is driven over the DevTools protocol (CDP) with the `websockets` package: one browser process, one
connection, no driver binary or browser download (Playwright would bring its own browser build; `--dump-dom`
cannot report console errors or decoded image sizes). Used by tests/test_report.py, and as a script:

    python tests/browser.py report.html --screenshot docs/report.png [--palette]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
)  # fmt: skip
NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
WIDTH = 1280


def find_chromium() -> str | None:
    """The Chromium (or Chrome) executable on PATH, or None."""
    return next((found for name in NAMES if (found := shutil.which(name))), None)


@dataclass
class PageResult:
    """What loading a page showed.

    Attributes:
        errors: console errors, uncaught exceptions and failed loads, one line each.
        images: (alt text, natural width, natural height, decoded) of every <img>.
        load_ms: milliseconds from the start of navigation to the end of the load event.
        height: the page's height in CSS pixels.
    """

    errors: list[str] = field(default_factory=list)
    images: list[tuple[str, int, int, bool]] = field(default_factory=list)
    load_ms: float = 0.0
    height: int = 0


class _Session:
    """Commands to one page over the browser's socket (flat sessions), and the events it sends."""

    def __init__(self, socket: Any) -> None:
        self.socket = socket
        self.next_id = 0
        self.session: str | None = None
        self.events: list[dict[str, Any]] = []

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        message: dict[str, Any] = {"id": self.next_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        await self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(await self.socket.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    async def wait_for(self, method: str, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events:
                if event.get("method") == method:
                    return event
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {method} within {timeout} s")
            self.events.append(json.loads(await asyncio.wait_for(self.socket.recv(), left)))


def _errors(events: list[dict[str, Any]]) -> list[str]:
    out = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            out.append(
                "console: " + " ".join(str(a.get("value", a.get("description", ""))) for a in params["args"])
            )
        elif method == "Runtime.exceptionThrown":
            out.append("exception: " + params["exceptionDetails"].get("text", ""))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            out.append(f"log: {params['entry'].get('text', '')} {params['entry'].get('url', '')}".strip())
    return out


IMAGES_JS = """Promise.all(Array.from(document.images).map(i => i.decode().then(() => true, () => false)
  .then(ok => [i.alt, i.naturalWidth, i.naturalHeight, ok])))"""
LOAD_JS = """(() => { const n = performance.getEntriesByType('navigation')[0];
  return n.loadEventEnd - n.startTime; })()"""


async def _drive(ws_url: str, url: str, screenshot: Path | None, timeout: float) -> PageResult:
    import websockets

    async with websockets.connect(ws_url, max_size=None) as socket:
        cdp = _Session(socket)
        target = await cdp.send("Target.createTarget", url="about:blank")
        attached = await cdp.send("Target.attachToTarget", targetId=target["targetId"], flatten=True)
        cdp.session = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            await cdp.send(f"{domain}.enable")
        await cdp.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=900, deviceScaleFactor=1,
                       mobile=False)  # fmt: skip
        cdp.events.clear()
        await cdp.send("Page.navigate", url=url)
        await cdp.wait_for("Page.loadEventFired", timeout)
        result = PageResult()
        images = await cdp.send(
            "Runtime.evaluate", expression=IMAGES_JS, awaitPromise=True, returnByValue=True
        )
        result.images = [tuple(item) for item in images["result"]["value"]]
        load = await cdp.send("Runtime.evaluate", expression=LOAD_JS, returnByValue=True)
        result.load_ms = float(load["result"]["value"])
        metrics = await cdp.send("Page.getLayoutMetrics")
        result.height = int(metrics["cssContentSize"]["height"])
        if screenshot is not None:
            clip = {"x": 0, "y": 0, "width": WIDTH, "height": result.height, "scale": 1}
            shot = await cdp.send(
                "Page.captureScreenshot", format="png", captureBeyondViewport=True, clip=clip
            )
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            screenshot.write_bytes(base64.b64decode(shot["data"]))
        await asyncio.sleep(0.2)  # late console messages
        try:
            while True:
                cdp.events.append(json.loads(await asyncio.wait_for(socket.recv(), 0.05)))
        except TimeoutError:
            pass
        result.errors = _errors(cdp.events)
        return result


def load_page(path: Path, screenshot: Path | None = None, timeout: float = 60.0) -> PageResult:
    """Open `path` from file:// in a fresh headless Chromium (its own profile folder) and read it back.

    Raises:
        FileNotFoundError: no Chromium on PATH.
        TimeoutError: the page or the browser did not answer in time.
    """
    chromium = find_chromium()
    if chromium is None:
        raise FileNotFoundError("no chromium on PATH")
    with tempfile.TemporaryDirectory(prefix="tinyswin-chromium-") as profile:
        argv = [chromium, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-port=0", "about:blank"]
        process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            ws_url = _devtools_url(process, timeout)
            return asyncio.run(_drive(ws_url, path.resolve().as_uri(), screenshot, timeout))
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _devtools_url(process: subprocess.Popen, timeout: float) -> str:
    """The browser's DevTools websocket, from the line Chromium prints when it listens."""
    deadline = time.monotonic() + timeout
    assert process.stderr is not None
    lines = []
    while time.monotonic() < deadline:
        line = process.stderr.readline()
        if not line:
            if process.poll() is not None:
                raise RuntimeError(f"chromium exited ({process.returncode}): {' '.join(lines[-5:])}")
            continue
        lines.append(line.strip())
        found = re.search(r"DevTools listening on (ws://\S+)", line)
        if found:
            return found.group(1)
    raise TimeoutError(f"chromium did not open its DevTools port within {timeout} s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Load an HTML file in headless Chromium; report and screenshot."
    )
    parser.add_argument("page", type=Path, help="the HTML file")
    parser.add_argument("--screenshot", type=Path, default=None, help="write a full-page PNG here")
    parser.add_argument(
        "--palette", action="store_true", help="save the screenshot with 256 colours (a third of the size)"
    )
    args = parser.parse_args(argv)
    result = load_page(args.page, args.screenshot)
    if args.screenshot is not None and args.palette:
        from PIL import Image

        with Image.open(args.screenshot) as image:
            quantized = image.convert("RGB").quantize(256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        quantized.save(args.screenshot, optimize=True)
    broken = [image for image in result.images if not (image[3] and image[1] > 0)]
    size = args.page.stat().st_size / 1e6
    print(f"{args.page}: {size:.2f} MB, loaded in {result.load_ms:.0f} ms, {len(result.images)} images "
          f"({len(broken)} not decoded), {len(result.errors)} console errors")  # fmt: skip
    for error in result.errors:
        print(f"  {error}")
    return 1 if broken or result.errors else 0


if __name__ == "__main__":
    sys.exit(main())
