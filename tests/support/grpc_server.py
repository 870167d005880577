"""A real grpcio server on 127.0.0.1 that records the credentials each call arrived with.

No generated code: the service `test.Echo` is made of grpc's generic handlers with raw
bytes (no serializers), and clients call it the same way (`channel.unary_unary(...)`
without serializers). Methods:

* `Unary`: answers the request's bytes back.
* `ServerStream`: the request is a count N (ASCII); answers N messages `part-<i>`; or
  `N,SIZE`: N messages of SIZE bytes. `produced` counts the messages grpcio took.
* `ClientStream`: answers the number of messages and bytes received (`<count>:<bytes>`).
* `Bidi`: echoes each message as it arrives.
* `Refuse`: ends with the status named by the request (`UNAUTHENTICATED`, ...).
* `Trailers`: answers `ok` with trailing metadata `x-checksum: <sha256 of the request>`.
* `Slow`: answers only once `release` is set (or after `SLOW_LIMIT` seconds); a call
  cancelled meanwhile (RST_STREAM, a lost connection) is counted in `cancelled`.
* `Hold`: client-streaming; reads no message before `release` is set, then answers as
  `ClientStream` does.

Every call records its `authorization` metadata in `calls`; a call whose bearer token
`validate` rejects ends with UNAUTHENTICATED, as a real API would.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
import trustme

SERVICE = "test.Echo"
SLOW_LIMIT = 30.0


@dataclass
class Call:
    """One call as the server saw it."""

    method: str
    authorization: str | None
    metadata: dict[str, str]


@dataclass
class GrpcServer:
    """A grpcio server (TLS with a `trustme` certificate, or plaintext)."""

    validate: Callable[[str | None], bool] | None = None
    calls: list[Call] = field(default_factory=list)
    port: int = 0
    _server: Any = None
    release: threading.Event = field(default_factory=threading.Event)
    produced: int = 0
    cancelled: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self, ca: trustme.CA | None) -> None:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handler = grpc.method_handlers_generic_handler(SERVICE, self._handlers())
        server.add_generic_rpc_handlers([handler])
        if ca is None:
            self.port = server.add_insecure_port("127.0.0.1:0")
        else:
            issued = ca.issue_cert("localhost", "127.0.0.1")
            chain = b"".join(pem.bytes() for pem in issued.cert_chain_pems)
            credentials = grpc.ssl_server_credentials([(issued.private_key_pem.bytes(), chain)])
            self.port = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        self._server = server

    def stop(self) -> None:
        self.release.set()
        if self._server is not None:
            self._server.stop(grace=None).wait(5)

    def authorizations(self) -> list[str | None]:
        with self._lock:
            return [call.authorization for call in self.calls]

    # -- the service ---------------------------------------------------------------------

    def _handlers(self) -> dict[str, grpc.RpcMethodHandler]:
        return {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self._server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self._client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self._bidi),
            "Refuse": grpc.unary_unary_rpc_method_handler(self._refuse),
            "Trailers": grpc.unary_unary_rpc_method_handler(self._trailers),
            "Slow": grpc.unary_unary_rpc_method_handler(self._slow),
            "Hold": grpc.stream_unary_rpc_method_handler(self._hold),
        }

    def _record(self, method: str, context: grpc.ServicerContext) -> bool:
        metadata = {
            key: value for key, value in context.invocation_metadata() if isinstance(value, str)
        }
        authorization = metadata.get("authorization")
        with self._lock:
            self.calls.append(Call(method, authorization, metadata))
        if self.validate is not None and not self.validate(authorization):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid token")
        return True

    def _unary(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Unary", context)
        return request

    def _server_stream(self, request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("ServerStream", context)
        count, _, size = request.partition(b",")
        for index in range(int(count)):
            with self._lock:
                self.produced += 1
            yield b"x" * int(size) if size else b"part-%d" % index

    def _client_stream(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._record("ClientStream", context)
        count = size = 0
        for message in requests:
            count += 1
            size += len(message)
        return b"%d:%d" % (count, size)

    def _bidi(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        self._record("Bidi", context)
        yield from requests

    def _refuse(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Refuse", context)
        context.abort(grpc.StatusCode[request.decode()], "refused as asked")
        raise AssertionError("abort returns no more")

    def _trailers(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Trailers", context)
        context.set_trailing_metadata((("x-checksum", hashlib.sha256(request).hexdigest()),))
        return b"ok"

    def _slow(self, request: bytes, context: grpc.ServicerContext) -> bytes:
        self._record("Slow", context)
        gone = threading.Event()
        context.add_callback(gone.set)  # the call ended: cancelled, unless answered
        waited = 0.0
        while not self.release.is_set() and not gone.is_set() and waited < SLOW_LIMIT:
            self.release.wait(0.05)
            waited += 0.05
        if gone.is_set() and not self.release.is_set():
            with self._lock:
                self.cancelled += 1
        return request

    def _hold(self, requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        self._record("Hold", context)
        self.release.wait(SLOW_LIMIT)
        count = size = 0
        for message in requests:
            count += 1
            size += len(message)
        return b"%d:%d" % (count, size)
