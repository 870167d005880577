"""Open many keep-alive client connections, use each once, then hold them idle.

Run as `python -m bench.hold_connections PORT COUNT TARGET HOST`: every connection
sends `GET TARGET` with `Host: HOST` and reads the whole response, so the server
under test holds what a served-and-now-idle keep-alive connection costs it. Prints
`READY <n>` when all are open and idle, then holds them until terminated.
"""

from __future__ import annotations

import asyncio
import signal
import sys

CONCURRENT_OPENS = 50


async def open_and_use(port: int, request: bytes) -> asyncio.StreamWriter:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    status = head.split(b" ", 2)[1]
    if status != b"200":
        raise RuntimeError(f"unexpected status {status.decode()}")
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return writer


async def hold(port: int, count: int, target: str, host: str) -> None:
    request = f"GET {target} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    limit = asyncio.Semaphore(CONCURRENT_OPENS)

    async def one() -> asyncio.StreamWriter:
        async with limit:
            return await open_and_use(port, request)

    writers = await asyncio.gather(*(one() for _ in range(count)))
    print(f"READY {len(writers)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    for writer in writers:
        writer.close()


def main() -> None:
    port, count, target, host = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    asyncio.run(hold(port, count, target, host))


if __name__ == "__main__":
    main()
