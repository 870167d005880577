"""Real gRPC servers (grpcio) with generic handlers: raw bytes in and out, no codegen.

`GrpcServer` serves the service `tokenproxy.test.Echo` over h2c, or TLS with
`ssl_server_credentials`, on 127.0.0.1 in grpcio's own threads (independent of the
test's event loop). Every call is recorded (`calls`: method and metadata), and the
`authorization` metadata comes back to the caller as the initial metadata
`seen-authorization` (empty when none was sent; `Fail` and `Hold` send no head before
their answer). Methods:

- `Unary`: answers the request message;
- `Authorization`: answers the `authorization` value itself as the message;
- `ServerStream`: the request `b"<count>,<size>"` is answered with `count` messages of
  `size` bytes; `produced` counts the messages grpcio has taken from the handler;
- `Echo`: bidirectional, each message echoed as it arrives;
- `Fail`: the request `b"<code>"` ends the call with that status code;
- `Hold`: answers only after `release_holds()`; a call cancelled before (RST_STREAM or
  a lost connection) is counted in `cancelled`.

`grpc_message(payload)` frames a message as gRPC's PROTOCOL-HTTP2 says (a compressed
flag byte, a 4-byte big-endian length, the bytes); `grpc_messages(data)` splits a body
back into messages; `request_headers()` is the HTTP/2 header list of a call.
"""

from __future__ import annotations

import struct
import threading
from collections.abc import Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc

SERVICE = "tokenproxy.test.Echo"
HOLD_LIMIT_SECONDS = 60.0


def grpc_message(payload: bytes) -> bytes:
    """One length-prefixed gRPC message, uncompressed."""
    return struct.pack(">BI", 0, len(payload)) + payload


def grpc_messages(data: bytes) -> list[bytes]:
    """The messages of a gRPC body (uncompressed); fails on a truncated one."""
    messages = []
    offset = 0
    while offset < len(data):
        flag, length = struct.unpack_from(">BI", data, offset)
        assert flag == 0, "compressed message"
        offset += 5
        assert offset + length <= len(data), "truncated gRPC message"
        messages.append(data[offset : offset + length])
        offset += length
    return messages


def method_path(method: str) -> bytes:
    return f"/{SERVICE}/{method}".encode()


@dataclass
class Call:
    """One call as the server saw it."""

    method: str
    metadata: dict[str, str]


@dataclass
class GrpcServer:
    """A grpcio server on 127.0.0.1 with the generic handlers of `tokenproxy.test.Echo`."""

    max_concurrent_streams: int | None = None
    # (private key PEM, certificate chain PEM): TLS with ALPN h2, as grpcio always offers.
    tls: tuple[bytes, bytes] | None = None
    workers: int = 32
    calls: list[Call] = field(default_factory=list)
    released: bool = False
    cancelled: int = 0
    produced: int = 0
    port: int = 0
    _server: grpc.Server | None = None
    _executor: futures.ThreadPoolExecutor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _holding: list[threading.Event] = field(default_factory=list)

    def start(self) -> GrpcServer:
        options: list[tuple[str, int]] = []
        if self.max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        self._executor = futures.ThreadPoolExecutor(max_workers=self.workers)
        server = grpc.server(self._executor, options=options)
        server.add_generic_rpc_handlers((self._handlers(),))
        if self.tls is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            credentials = grpc.ssl_server_credentials([self.tls])
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None) -> threading.Event:
        """Stop (GOAWAY to clients); calls in flight get `grace` seconds to finish."""
        assert self._server is not None
        return self._server.stop(grace)

    def release_holds(self) -> None:
        """Let every `Hold` call, waiting or to come, answer."""
        with self._lock:
            self.released = True
            holding, self._holding = self._holding, []
        for wake in holding:
            wake.set()

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.release_holds()
        if self._server is not None:
            self._server.stop(None).wait(10)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- handlers --------------------------------------------------------------------

    def _record(self, method: str, context: grpc.ServicerContext, *, answer: bool = True) -> str:
        metadata = {key: str(value) for key, value in context.invocation_metadata()}
        with self._lock:
            self.calls.append(Call(method, metadata))
        authorization = metadata.get("authorization", "")
        if answer:
            context.send_initial_metadata((("seen-authorization", authorization),))
        return authorization

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Unary", context)
        return request

    def _authorization(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return self._record("Authorization", context).encode()

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("ServerStream", context)
        count, size = (int(part) for part in request.split(b","))
        message = b"m" * size
        for _ in range(count):
            with self._lock:
                self.produced += 1
            yield message

    def _echo(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Echo", context)
        yield from requests

    def _fail(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Fail", context, answer=False)  # no head: a trailers-only response
        code = next(status for status in grpc.StatusCode if status.value[0] == int(request))
        context.abort(code, "failed on request")
        raise AssertionError("abort returns only by raising")

    def _hold(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Hold", context, answer=False)  # nothing at all until released
        wake = threading.Event()
        with self._lock:
            if not self.released:
                self._holding.append(wake)
            else:
                wake.set()

        def on_done() -> None:
            with self._lock:
                if not self.released:
                    self.cancelled += 1
            wake.set()

        # Runs when the call ends: at once if it was cancelled (RST_STREAM, connection
        # lost) while we wait, else after the answer below.
        context.add_callback(on_done)
        wake.wait(HOLD_LIMIT_SECONDS)
        return request

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": unary(self._unary),
                "Authorization": unary(self._authorization),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
                "Echo": grpc.stream_stream_rpc_method_handler(self._echo),
                "Fail": unary(self._fail),
                "Hold": unary(self._hold),
            },
        )


def request_headers(
    authority: str,
    method: str,
    *,
    scheme: str = "http",
    metadata: Sequence[tuple[bytes, bytes]] = (),
) -> list[tuple[bytes, bytes]]:
    """The HTTP/2 header list of a gRPC call to `method` of the test service."""
    return [
        (b":method", b"POST"),
        (b":scheme", scheme.encode()),
        (b":authority", authority.encode()),
        (b":path", method_path(method)),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]
