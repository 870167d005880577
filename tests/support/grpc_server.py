"""A real grpcio server on 127.0.0.1 that records every call and the credentials it carried.

No generated code: `GrpcServer` serves the service `tokenproxy.test.Echo` with grpc's
generic handlers on raw bytes (no serializers), over h2c or TLS (a certificate from a
`trustme` CA), in grpcio's own threads; grpcio clients call it the same way
(`channel.unary_unary(...)` without serializers). Every call is recorded in `calls`
(method and metadata); a call whose `authorization` `validate` rejects ends with
UNAUTHENTICATED, as a real API would. An answer starts with the initial metadata
`seen-authorization` (the `authorization` received, empty when none was), except from
`Refuse` and `Hold`, which send no head before their end. Methods:

* `Unary`: answers the request's bytes back.
* `Authorization`: answers the `authorization` metadata itself.
* `ServerStream`: `N` asks for N messages `part-<i>`, `N,SIZE` for N of SIZE bytes.
* `ClientStream`: answers the number of messages and bytes received (`<count>:<bytes>`).
* `Bidi`: echoes each message as it arrives.
* `Refuse`: ends with the status named by the request (`UNAUTHENTICATED`, ...).
* `Trailers`: answers `ok` with trailing metadata `x-checksum: <sha256 of the request>`.
* `Hold`: reads nothing before `release_holds()`, then answers as `ClientStream` does.

`produced` counts the `ServerStream` messages grpcio has taken, `cancelled` the `Hold`
calls cancelled before their release (RST_STREAM, a lost connection, a server stop).

`grpc_message(payload)` frames a message as gRPC's PROTOCOL-HTTP2 says (a compressed
flag byte, a 4-byte big-endian length, the bytes); `grpc_messages(data)` splits a body
back into messages; `request_headers()` is the HTTP/2 header list of a call.
"""

from __future__ import annotations

import hashlib
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import trustme

SERVICE = "tokenproxy.test.Echo"
HOLD_LIMIT = 60.0  # seconds a `Hold` call waits for its release at most


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
        (b":path", f"/{SERVICE}/{method}".encode()),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        *metadata,
    ]


def counted(requests: Iterator[bytes]) -> bytes:
    """`<count>:<bytes>` of the messages read."""
    count = size = 0
    for message in requests:
        count += 1
        size += len(message)
    return b"%d:%d" % (count, size)


@dataclass
class Call:
    """One call as the server saw it: its method and text metadata."""

    method: str
    metadata: dict[str, str]


@dataclass
class GrpcServer:
    """A grpcio server on 127.0.0.1: h2c, or TLS with a certificate `ca` issued for
    localhost and 127.0.0.1 (grpcio always offers h2 in ALPN); with `client_ca` as well,
    clients must present a certificate it signed (mutual TLS)."""

    ca: trustme.CA | None = None
    client_ca: trustme.CA | None = None
    validate: Callable[[str | None], bool] | None = None
    max_concurrent_streams: int | None = None
    workers: int = 32
    calls: list[Call] = field(default_factory=list)
    produced: int = 0
    cancelled: int = 0
    port: int = 0
    _server: grpc.Server | None = None
    _executor: futures.ThreadPoolExecutor | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _released: bool = False
    _holding: list[threading.Event] = field(default_factory=list)

    def start(self) -> GrpcServer:
        options: list[tuple[str, int]] = []
        if self.max_concurrent_streams is not None:
            options.append(("grpc.max_concurrent_streams", self.max_concurrent_streams))
        self._executor = futures.ThreadPoolExecutor(max_workers=self.workers)
        server = grpc.server(self._executor, options=options)
        server.add_generic_rpc_handlers((self._handlers(),))
        if self.ca is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            issued = self.ca.issue_cert("localhost", "127.0.0.1")
            chain = b"".join(pem.bytes() for pem in issued.cert_chain_pems)
            client_ca = self.client_ca
            credentials = grpc.ssl_server_credentials(
                [(issued.private_key_pem.bytes(), chain)],
                root_certificates=client_ca.cert_pem.bytes() if client_ca is not None else None,
                require_client_auth=client_ca is not None,
            )
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        self._server = server
        return self

    def stop(self, grace: float | None) -> threading.Event:
        """Stop (GOAWAY to clients); calls in flight get `grace` seconds to finish."""
        assert self._server is not None
        return self._server.stop(grace)

    def __enter__(self) -> GrpcServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.release_holds()
        if self._server is not None:
            self._server.stop(None).wait(10)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)

    def release_holds(self) -> None:
        """Let every `Hold` call, waiting or to come, answer."""
        with self._lock:
            self._released = True
            for wake in self._holding:
                wake.set()

    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [call.metadata.get("authorization") for call in self.calls]

    # -- the service ---------------------------------------------------------------------

    def _handlers(self) -> grpc.GenericRpcHandler:
        unary = grpc.unary_unary_rpc_method_handler
        return grpc.method_handlers_generic_handler(
            SERVICE,
            {
                "Unary": unary(self._unary),
                "Authorization": unary(self._authorization),
                "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
                "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
                "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
                "Refuse": unary(self._refuse),
                "Trailers": unary(self._trailers),
                "Hold": grpc.stream_unary_rpc_method_handler(self._hold),
            },
        )

    def _record(
        self, method: str, context: grpc.ServicerContext, *, head: bool = True
    ) -> str | None:
        """Records the call, refuses it if `validate` says so, sends the head if asked."""
        metadata = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        authorization = metadata.get("authorization")
        with self._lock:
            self.calls.append(Call(method, metadata))
        if self.validate is not None and not self.validate(authorization):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        if head:
            context.send_initial_metadata((("seen-authorization", authorization or ""),))
        return authorization

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Unary", context)
        return request

    def _authorization(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        return (self._record("Authorization", context) or "").encode()

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("ServerStream", context)
        count, _, size = request.partition(b",")
        for index in range(int(count)):
            with self._lock:
                self.produced += 1
            yield b"x" * int(size) if size else b"part-%d" % index

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._record("ClientStream", context)
        return counted(requests)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Bidi", context)
        yield from requests

    def _refuse(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Refuse", context, head=False)  # no head: a trailers-only response
        context.abort(grpc.StatusCode[request.decode()], "refused as asked")
        raise AssertionError("abort returns only by raising")

    def _trailers(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Trailers", context)
        context.set_trailing_metadata((("x-checksum", hashlib.sha256(request).hexdigest()),))
        return b"ok"

    def _hold(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._record("Hold", context, head=False)  # nothing at all until released
        wake = threading.Event()
        with self._lock:
            self._holding.append(wake)
            if self._released:
                wake.set()

        def ended() -> None:
            # When the call ends: at once if it is cancelled while held, else after the answer.
            with self._lock:
                if not self._released:
                    self.cancelled += 1
            wake.set()

        if not context.add_callback(ended):  # already over
            ended()
        wake.wait(HOLD_LIMIT)
        return counted(requests) if context.is_active() else b""
