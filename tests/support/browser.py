"""Headless Chromium (Debian's ``chromium``) driven over the DevTools protocol with aiohttp's
websocket client: no Selenium, no Playwright, no driver binary.

>>> async with Browser.launch(tmp_path) as browser:
...     await browser.open("http://127.0.0.1:8000/ui")
...     await browser.evaluate("document.title")           # 'Ordermesh overview'
...     await browser.wait_for("document.querySelector('.parked') !== null")
"""

from __future__ import annotations

import asyncio
import itertools
import json
import re
import shutil
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp

CHROMIUM = "chromium"
MISSING = "chromium is not installed (apt install chromium, or run deploy/local/prereqs.sh)"
_LISTENING = re.compile(r"DevTools listening on (ws://\S+)")


def chromium_path() -> str | None:
    return shutil.which(CHROMIUM)


class BrowserError(Exception):
    """Chromium did not start, or a DevTools call failed."""


class Browser:
    """One page of a headless Chromium, through its DevTools websocket."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    @classmethod
    @asynccontextmanager
    async def launch(cls, profile: Path) -> AsyncIterator[Browser]:
        """Start Chromium with a fresh profile under ``profile``; killed on the way out."""
        binary = chromium_path()
        if binary is None:
            raise BrowserError(MISSING)
        # stderr to a file, not a pipe: nobody reads a pipe after start-up, and a full one
        # would block Chromium.
        log = profile / "chromium.log"
        with log.open("wb") as sink:
            process = await asyncio.create_subprocess_exec(
                binary,
                "--headless",
                "--no-sandbox",  # tests may run as root, where the sandbox refuses to start
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile / 'profile'}",
                "about:blank",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=sink,
            )
        try:
            endpoint = await _devtools_endpoint(process, log)
            async with aiohttp.ClientSession() as http:
                page = await _page_socket(http, endpoint)
                async with http.ws_connect(page, max_msg_size=0) as ws:
                    yield cls(ws)
        finally:
            if process.returncode is None:
                process.kill()
            await process.wait()

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        """One DevTools command; its result (events in between are skipped)."""
        call_id = next(self._ids)
        await self._ws.send_json({"id": call_id, "method": method, "params": params})
        async with asyncio.timeout(10):
            while True:
                message = json.loads(await self._ws.receive_str())
                if message.get("id") != call_id:
                    continue
                if "error" in message:
                    raise BrowserError(f"{method}: {message['error']}")
                result: dict[str, Any] = message["result"]
                return result

    async def open(self, url: str) -> None:
        """Navigate and wait for the document to finish loading."""
        await self.call("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        answer = await self.call(
            "Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True
        )
        if "exceptionDetails" in answer:
            raise BrowserError(f"{expression}: {answer['exceptionDetails']}")
        return answer["result"].get("value")

    async def wait_for(self, condition: str, *, within: float = 10.0) -> None:
        """Poll until the JavaScript ``condition`` is true."""
        try:
            async with asyncio.timeout(within):
                while not await self.evaluate(f"Boolean({condition})"):
                    await asyncio.sleep(0.1)
        except TimeoutError:
            text = await self.evaluate("document.body ? document.body.innerText : ''")
            raise AssertionError(f"not true within {within} s: {condition}\n{text}") from None


async def _devtools_endpoint(process: asyncio.subprocess.Process, log: Path) -> str:
    """The browser's ws:// URL, from the line Chromium prints on stderr when it listens."""
    async with asyncio.timeout(30):
        while process.returncode is None:
            if found := _LISTENING.search(_text(log)):
                return found.group(1)
            await asyncio.sleep(0.05)
    tail = _text(log)[-3000:]
    raise BrowserError(f"chromium exited ({process.returncode}) before listening:\n{tail}")


def _text(log: Path) -> str:
    # A few KB, read every 50 ms while Chromium starts: not worth a thread.
    return log.read_text(errors="replace")


async def _page_socket(http: aiohttp.ClientSession, endpoint: str) -> str:
    """The websocket URL of the page Chromium opened (``about:blank``)."""
    port = endpoint.split("/")[2]
    async with http.get(f"http://{port}/json/list") as answer:
        targets = await answer.json()
    pages = [t["webSocketDebuggerUrl"] for t in targets if t.get("type") == "page"]
    if not pages:
        raise BrowserError(f"chromium shows no page: {targets}")
    return str(pages[0])
