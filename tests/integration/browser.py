"""A headless Chromium driven over the DevTools protocol (CDP, a WebSocket on a loopback port): the
dashboard test types into the sign-in form like a person would, over TLS.

Chromium trusts the deployment's server key only (`--ignore-certificate-errors-spki-list` with the
SHA-256 of the server certificate's public key — a pin, not "ignore every error"); the CA is not put into
any system store.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import IO, Any

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from services.common.config import Settings
from services.common.tls import server_paths

FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync", "--hide-scrollbars",
         "--remote-allow-origins=*")
START_S = 30.0


def chromium_path() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    assert Path(path).exists(), "chromium is not installed: test.sh runs deploy/bootstrap.sh --test-tools"
    return path


def server_key_pin(s: Settings) -> str:
    """base64 SHA-256 of the server certificate's SubjectPublicKeyInfo (what Chromium's SPKI list takes)."""
    cert = x509.load_pem_x509_certificate(server_paths(s).cert.read_bytes())
    spki = cert.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return base64.b64encode(hashlib.sha256(spki).digest()).decode()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Page:
    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self._ids = itertools.count(1)

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        msg_id = next(self._ids)
        await self.ws.send_str(json.dumps({"id": msg_id, "method": method, "params": params}))
        while True:
            msg = await asyncio.wait_for(self.ws.receive(), 30)
            assert msg.type == aiohttp.WSMsgType.TEXT, msg
            data = json.loads(msg.data)
            if data.get("id") == msg_id:  # events (no id) are not needed here
                assert "error" not in data, data
                return dict(data.get("result", {}))

    async def evaluate(self, expression: str) -> Any:
        result = await self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, result
        return result["result"].get("value")

    async def navigate(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'")

    async def wait_for(self, expression: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if await self.evaluate(expression):
                    return
            except AssertionError:  # between two documents (a navigation in progress)
                pass
            assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {expression}"
            await asyncio.sleep(0.2)

    async def html(self) -> str:
        return str(await self.evaluate("document.documentElement.outerHTML"))

    async def screenshot(self, path: Path, width: int, height: int) -> None:
        await self.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        shot = await self.send("Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(shot["data"]))


@asynccontextmanager
async def chromium(s: Settings) -> AsyncIterator[Page]:
    """A fresh profile (no cookies), one tab."""
    port = _free_port()
    profile = tempfile.mkdtemp(prefix="xs-chromium-")
    with tempfile.TemporaryFile() as log:
        cmd = [chromium_path(), *FLAGS, f"--user-data-dir={profile}", f"--remote-debugging-port={port}",
               f"--ignore-certificate-errors-spki-list={server_key_pin(s)}", "--window-size=1400,1000", "about:blank"]
        # Its own process group: Chromium's helpers (zygote, renderers, crash handler) outlive the main
        # process for a moment and keep writing into the profile unless they are stopped too.
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        try:
            async with aiohttp.ClientSession() as http:  # the browser's own debugging endpoint, loopback
                target = await _page_target(http, port, proc, log)
                async with http.ws_connect(target, max_msg_size=64 * 1024 * 1024) as ws:
                    page = Page(ws)
                    await page.send("Page.enable")
                    yield page
        finally:
            await _stop_group(proc)
            await _remove_profile(Path(profile))


async def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            proc.poll()
            try:
                os.killpg(proc.pid, 0)  # anyone of the group still alive?
            except ProcessLookupError:
                return
            await asyncio.sleep(0.1)
    proc.wait()


async def _remove_profile(profile: Path) -> None:
    for _ in range(20):  # a helper of another group (rare) may still be closing its files
        shutil.rmtree(profile, ignore_errors=True)
        if not profile.exists():
            return
        await asyncio.sleep(0.25)
    raise AssertionError(f"the Chromium profile {profile} could not be removed")


async def _page_target(http: aiohttp.ClientSession, port: int, proc: subprocess.Popen[bytes], log: IO[bytes]) -> str:
    deadline = time.monotonic() + START_S
    while True:
        try:
            async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                pages = [t for t in await resp.json() if t.get("type") == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
        except (aiohttp.ClientError, OSError):
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            log.seek(0)
            raise AssertionError(f"chromium did not start: {log.read().decode(errors='replace')[-2000:]}")
        await asyncio.sleep(0.2)
