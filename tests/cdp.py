"""A very small Chrome DevTools Protocol client (aiohttp) for the headless-Chromium test: start
Debian's chromium, open a page, evaluate JavaScript, collect console errors, take screenshots."""
from __future__ import annotations

import asyncio
import base64
import itertools
import json
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


class Browser:
    """``async with Browser() as b: page = await b.page(url)``"""

    def __init__(self, width=1600, height=1000):
        self.port = _free_port()
        self.profile = tempfile.mkdtemp(prefix="gfcg_chromium_")
        self.size = (width, height)

    async def __aenter__(self):
        import aiohttp

        exe = find_chromium()
        self.proc = subprocess.Popen(
            [exe, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
             f"--remote-debugging-port={self.port}", f"--user-data-dir={self.profile}",
             f"--window-size={self.size[0]},{self.size[1]}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2))
                target = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                if time.time() > deadline:
                    raise RuntimeError("chromium did not open its debugging port")
                await asyncio.sleep(0.5)
        self.session = aiohttp.ClientSession()
        self.ws = await self.session.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0)
        self.ids = itertools.count(1)
        self.pending = {}
        self.console = []
        self.reader = asyncio.create_task(self._read())
        for domain in ("Runtime", "Log", "Page"):
            await self.send(f"{domain}.enable")
        await self.send("Emulation.setDeviceMetricsOverride", width=self.size[0], height=self.size[1],
                        deviceScaleFactor=1, mobile=False)
        return self

    async def __aexit__(self, *exc):
        self.reader.cancel()
        await self.ws.close()
        await self.session.close()
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    async def _read(self):
        async for msg in self.ws:
            data = json.loads(msg.data)
            if "id" in data and data["id"] in self.pending:
                self.pending.pop(data["id"]).set_result(data)
                continue
            method, params = data.get("method"), data.get("params", {})
            if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
                self.console.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params["args"]))
            elif method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.console.append(d.get("exception", {}).get("description") or d.get("text", ""))
            elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
                self.console.append(params["entry"].get("text", "") + " " + params["entry"].get("url", ""))

    async def send(self, method, **params):
        i = next(self.ids)
        fut = asyncio.get_running_loop().create_future()
        self.pending[i] = fut
        await self.ws.send_str(json.dumps({"id": i, "method": method, "params": params}))
        res = await asyncio.wait_for(fut, 60)
        if "error" in res:
            raise RuntimeError(f"{method}: {res['error']}")
        return res.get("result", {})

    async def eval(self, expression: str, timeout: float = 60):
        res = await asyncio.wait_for(self.send("Runtime.evaluate", expression=expression, awaitPromise=True,
                                               returnByValue=True), timeout)
        if "exceptionDetails" in res:
            raise RuntimeError(f"JavaScript error: {res['exceptionDetails'].get('exception', {}).get('description')}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expression: str, timeout: float = 90):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if await self.eval(expression):
                    return True
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"waited {timeout} s for {expression}")

    async def goto(self, url: str):
        await self.send("Page.navigate", url=url)

    async def screenshot(self) -> bytes:
        res = await self.send("Page.captureScreenshot", format="png")
        return base64.b64decode(res["data"])
