"""A Python HTTP client, driven one scenario at a time (see tests/clients/driver.py).

`python python_client.py LIBRARY` with LIBRARY one of requests, httpx, aiohttp, urllib,
websocket-client. Each stdin line is a scenario as JSON; each gets one JSON result line
on stdout (and, while streaming, a `{"event": "first"}` line as soon as the first bytes
arrived). Proxies and CA trust come from the environment only, the way an unmodified
application gets them.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import urllib.request
from pathlib import Path
from typing import Any


def emit(document: dict[str, Any]) -> None:
    print(json.dumps(document), flush=True)


class Stream:
    """Counts a streamed body and reports its first bytes at once."""

    def __init__(self) -> None:
        self.size = 0
        self.digest = hashlib.sha256()

    def add(self, data: bytes) -> None:
        if data and self.size == 0:
            emit({"event": "first", "bytes": len(data)})
        self.size += len(data)
        self.digest.update(data)

    def result(self, status: int) -> dict[str, Any]:
        return {"status": status, "size": self.size, "sha256": self.digest.hexdigest()}


def run_requests(scenario: dict[str, Any]) -> dict[str, Any]:
    import requests

    name, url = scenario["scenario"], scenario["url"]
    with requests.Session() as session:
        if name == "upload":
            with open(scenario["file"], "rb") as body:
                response = session.post(url, data=body, timeout=30)
        elif name == "stream":
            stream = Stream()
            with session.get(url, stream=True, timeout=30) as response:
                for data in response.iter_content(chunk_size=None):
                    stream.add(data)
            return stream.result(response.status_code)
        else:
            response = session.get(url, timeout=30)
        return {"status": response.status_code, "body": response.text}


def run_httpx(scenario: dict[str, Any]) -> dict[str, Any]:
    import httpx

    name, url = scenario["scenario"], scenario["url"]
    with httpx.Client(timeout=30) as client:
        if name == "upload":
            with open(scenario["file"], "rb") as body:
                response = client.post(url, content=body.read())
        elif name == "stream":
            stream = Stream()
            with client.stream("GET", url) as response:
                for data in response.iter_raw():
                    stream.add(data)
            return stream.result(response.status_code)
        else:
            response = client.get(url)
        return {"status": response.status_code, "body": response.text}


def run_urllib(scenario: dict[str, Any]) -> dict[str, Any]:
    name, url = scenario["scenario"], scenario["url"]
    if name == "upload":
        with open(scenario["file"], "rb") as body:
            request = urllib.request.Request(url, data=body.read(), method="POST")
    else:
        request = urllib.request.Request(url)
    with urllib.request.urlopen(request, timeout=30) as response:
        if name == "stream":
            stream = Stream()
            while data := response.read1(65536):
                stream.add(data)
            return stream.result(response.status)
        return {"status": response.status, "body": response.read().decode()}


async def run_aiohttp(scenario: dict[str, Any], upload: bytes) -> dict[str, Any]:
    import aiohttp

    name, url = scenario["scenario"], scenario["url"]
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(trust_env=True, timeout=timeout) as session:
        if name.startswith("websocket"):
            async with session.ws_connect(url) as ws:
                greeting = await ws.receive_str()
                await ws.send_str("hello")
                echo = await ws.receive_str()
            return {"greeting": greeting, "echo": echo}
        if name == "upload":
            async with session.post(url, data=upload) as response:
                return {"status": response.status, "body": await response.text()}
        async with session.get(url) as response:
            if name == "stream":
                stream = Stream()
                async for data in response.content.iter_any():
                    stream.add(data)
                return stream.result(response.status)
            return {"status": response.status, "body": await response.text()}


def run_websocket_client(scenario: dict[str, Any]) -> dict[str, Any]:
    import websocket

    ws = websocket.create_connection(scenario["url"], timeout=30)
    try:
        greeting = ws.recv()
        ws.send("hello")
        echo = ws.recv()
    finally:
        ws.close()
    return {"greeting": greeting, "echo": echo}


def main() -> None:
    library = sys.argv[1]
    for line in sys.stdin:
        scenario = json.loads(line)
        try:
            if library == "aiohttp":
                upload = Path(scenario["file"]).read_bytes() if "file" in scenario else b""
                result = asyncio.run(run_aiohttp(scenario, upload))
            else:
                runner = {
                    "requests": run_requests,
                    "httpx": run_httpx,
                    "urllib": run_urllib,
                    "websocket-client": run_websocket_client,
                }[library]
                result = runner(scenario)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {exc}"}
        emit({"result": True, **result})


if __name__ == "__main__":
    main()
