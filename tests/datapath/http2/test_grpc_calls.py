"""grpcio clients through the proxy, to a real grpcio server: all four kinds of call.

Through the forward port, the client opens a CONNECT tunnel (`grpc.http_proxy`) and
speaks TLS to the proxy's interception certificate, choosing h2 in ALPN; the proxy
speaks HTTP/2 over verified TLS to the upstream. Through an upstream's own port, the
client speaks cleartext HTTP/2 with prior knowledge (h2c). Either way the server must
see the proxy's token on every call, and the answer, statuses and trailers intact.
"""

from __future__ import annotations

import hashlib

import grpc
import pytest

from tests.datapath.http2.conftest import (
    CALL_TIMEOUT,
    GrpcProxy,
    StartGrpcProxy,
    in_thread,
    method,
)
from tests.support.grpc_server import GrpcServer
from tests.support.token_server import TokenServer

STREAMED_MESSAGES = 50


def bearer(token_server: TokenServer) -> str:
    assert token_server.issued, "no token was issued"
    return f"Bearer {token_server.issued[-1]}"


async def all_four_calls(proxy: GrpcProxy) -> None:
    """A unary, a server-streaming, a client-streaming and a bidirectional call."""
    channel = proxy.channel()
    try:
        unary = channel.unary_unary(method("Unary"))
        assert await in_thread(lambda: unary(b"hello", timeout=CALL_TIMEOUT)) == b"hello"

        server_stream = channel.unary_stream(method("ServerStream"))
        parts = await in_thread(
            lambda: list(server_stream(b"%d" % STREAMED_MESSAGES, timeout=CALL_TIMEOUT))
        )
        assert parts == [b"part-%d" % index for index in range(STREAMED_MESSAGES)]

        client_stream = channel.stream_unary(method("ClientStream"))
        messages = [bytes([index]) * (1000 + index) for index in range(STREAMED_MESSAGES)]
        answer = await in_thread(lambda: client_stream(iter(messages), timeout=CALL_TIMEOUT))
        assert answer == b"%d:%d" % (len(messages), sum(map(len, messages)))

        bidi = channel.stream_stream(method("Bidi"))
        echoed = await in_thread(lambda: list(bidi(iter(messages), timeout=CALL_TIMEOUT)))
        assert echoed == messages
    finally:
        channel.close()


async def test_grpc_through_interception_carries_the_token_on_every_call(
    start_intercepting_grpc: StartGrpcProxy,
    tls_grpc_server: GrpcServer,
    token_server: TokenServer,
) -> None:
    proxy = await start_intercepting_grpc()
    await all_four_calls(proxy)
    assert [call.method for call in tls_grpc_server.calls] == [
        "Unary",
        "ServerStream",
        "ClientStream",
        "Bidi",
    ]
    assert tls_grpc_server.authorizations() == [bearer(token_server)] * 4
    intercepted = proxy.metric(
        "token_proxy_tunnels_total", upstream="inventory", outcome="intercepted"
    )
    assert intercepted == 1  # one tunnel, one HTTP/2 connection, four streams
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="200") == 4
    assert (
        proxy.metric("token_proxy_grpc_responses_total", upstream="inventory", grpc_status="0") == 4
    )


async def test_grpc_h2c_to_an_upstream_port_carries_the_token_on_every_call(
    start_reverse_grpc: StartGrpcProxy,
    plain_grpc_server: GrpcServer,
    token_server: TokenServer,
) -> None:
    proxy = await start_reverse_grpc()
    await all_four_calls(proxy)
    assert plain_grpc_server.authorizations() == [bearer(token_server)] * 4
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="200") == 4


@pytest.mark.parametrize("kind", ["intercepting", "reverse"])
async def test_trailers_and_statuses_arrive_intact(
    start_intercepting_grpc: StartGrpcProxy,
    start_reverse_grpc: StartGrpcProxy,
    kind: str,
) -> None:
    proxy = await (start_intercepting_grpc if kind == "intercepting" else start_reverse_grpc)()
    channel = proxy.channel()
    try:
        request = b"checked" * 1000
        call = channel.unary_unary(method("Trailers"))
        answer, outcome = await in_thread(lambda: call.with_call(request, timeout=CALL_TIMEOUT))
        assert answer == b"ok"
        trailing = dict(outcome.trailing_metadata())
        assert trailing["x-checksum"] == hashlib.sha256(request).hexdigest()

        refuse = channel.unary_unary(method("Refuse"))
        with pytest.raises(grpc.RpcError) as refused:
            await in_thread(lambda: refuse(b"FAILED_PRECONDITION", timeout=CALL_TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert refused.value.details() == "refused as asked"
    finally:
        channel.close()
    assert (
        proxy.metric("token_proxy_grpc_responses_total", upstream="inventory", grpc_status="9") == 1
    )
