"""What a gRPC client (grpcio) gets when the proxy answers itself, and what an
UNAUTHENTICATED status from the upstream does to the token.

The proxy's own errors reach a gRPC call as trailers-only answers whose `grpc-status`
says what the client may do (see `proxy.datapath.http2.grpc`); a non-gRPC HTTP/2
request gets the usual JSON body.
"""

from __future__ import annotations

import asyncio
import json
import socket

import grpc
import h2.events
import httpx
import pytest

from proxy.config import LimitsConfig
from tests.datapath.http2.conftest import CALL_TIMEOUT, GrpcProxy, StartGrpcProxy, in_thread, method
from tests.support.grpc_server import GrpcServer
from tests.support.h2_client import RawH2
from tests.support.token_server import TokenServer
from tests.support.waiting import eventually


async def failed_call(proxy: GrpcProxy, name: str, request: bytes = b"x") -> grpc.RpcError:
    channel = proxy.channel()
    try:
        call = channel.unary_unary(method(name))
        with pytest.raises(grpc.RpcError) as failure:
            await in_thread(lambda: call(request, timeout=CALL_TIMEOUT))
        return failure.value
    finally:
        channel.close()


def grpc_count(proxy: GrpcProxy, status: int) -> float:
    return proxy.metric(
        "token_proxy_grpc_responses_total", upstream="inventory", grpc_status=str(status)
    )


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_token_unavailable_is_unavailable(
    start_intercepting_grpc: StartGrpcProxy, token_server: TokenServer, tls_grpc_server: GrpcServer
) -> None:
    token_server.set_failing("500")
    proxy = await start_intercepting_grpc()
    error = await failed_call(proxy, "Unary")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "token_unavailable" in error.details()
    assert tls_grpc_server.calls == []  # never sent without its token
    assert grpc_count(proxy, 14) == 1
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="503") == 1
    assert proxy.metric("token_proxy_token_unavailable_total", upstream="inventory") == 1


async def test_host_not_allowed_is_permission_denied(
    start_intercepting_grpc: StartGrpcProxy, tls_grpc_server: GrpcServer
) -> None:
    # The upstream takes /api only; everything else to unknown hosts is denied.
    proxy = await start_intercepting_grpc(path_prefix="/api", proxy={"unknown_hosts": "deny"})
    error = await failed_call(proxy, "Unary")
    assert error.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "host_not_allowed" in error.details()
    assert tls_grpc_server.calls == []


async def test_upstream_timeout_is_deadline_exceeded(
    start_intercepting_grpc: StartGrpcProxy, tls_grpc_server: GrpcServer
) -> None:
    proxy = await start_intercepting_grpc(timeout=0.5)
    try:
        error = await failed_call(proxy, "Hold")
    finally:
        tls_grpc_server.release_holds()
    assert error.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert "upstream_timeout" in error.details()
    assert grpc_count(proxy, 4) == 1
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="504") == 1


async def test_upstream_unreachable_is_unavailable(start_reverse_grpc: StartGrpcProxy) -> None:
    proxy = await start_reverse_grpc(url=f"http://127.0.0.1:{closed_port()}")
    error = await failed_call(proxy, "Unary")
    assert error.code() == grpc.StatusCode.UNAVAILABLE
    assert "upstream_unreachable" in error.details()
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="502") == 1


async def test_a_request_for_another_host_is_internal(
    start_intercepting_grpc: StartGrpcProxy, tls_grpc_server: GrpcServer
) -> None:
    # Inside a tunnel to localhost:<port>, a call whose :authority names another host
    # is refused (400): gRPC's own mapping of 400 is INTERNAL.
    proxy = await start_intercepting_grpc()
    proxy.options += [
        ("grpc.default_authority", "elsewhere.test"),
        ("grpc.ssl_target_name_override", "localhost"),
    ]
    error = await failed_call(proxy, "Unary")
    assert error.code() == grpc.StatusCode.INTERNAL
    assert "does not match the CONNECT authority" in error.details()
    assert tls_grpc_server.calls == []


async def test_unauthenticated_drops_the_token_without_a_replay(
    start_intercepting_grpc: StartGrpcProxy,
    token_server: TokenServer,
    tls_grpc_server: GrpcServer,
) -> None:
    proxy = await start_intercepting_grpc()
    channel = proxy.channel()
    try:
        unary = channel.unary_unary(method("Unary"))
        assert await in_thread(lambda: unary(b"first", timeout=CALL_TIMEOUT)) == b"first"
        first = token_server.issued[-1]
        token_server.revoke(first)  # the upstream now answers UNAUTHENTICATED to it
        with pytest.raises(grpc.RpcError) as refused:
            await in_thread(lambda: unary(b"second", timeout=CALL_TIMEOUT))
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # No replay: the upstream saw the second call once, with the refused token.
        assert tls_grpc_server.authorizations() == [f"Bearer {first}"] * 2
        await token_server.wait_for_issued(2)

        async def new_token_held() -> bool:
            route = proxy.app.holder.current.routes["inventory"]
            return route.held_token.current() not in (None, first)

        await eventually(new_token_held)
        assert await in_thread(lambda: unary(b"third", timeout=CALL_TIMEOUT)) == b"third"
    finally:
        channel.close()
    second = token_server.issued[-1]
    assert second != first
    assert tls_grpc_server.authorizations()[-1] == f"Bearer {second}"
    assert grpc_count(proxy, 16) == 1
    assert grpc_count(proxy, 0) == 2


async def test_a_plain_http2_request_gets_the_json_answer(
    start_reverse_grpc: StartGrpcProxy, token_server: TokenServer
) -> None:
    token_server.set_failing("500")
    proxy = await start_reverse_grpc(limits=LimitsConfig())
    async with httpx.AsyncClient(http1=False, http2=True, trust_env=False) as client:
        response = await client.get(f"http://{proxy.target}/api/stock", timeout=CALL_TIMEOUT)
    assert response.http_version == "HTTP/2"
    assert response.status_code == 503
    assert response.headers["content-type"] == "application/json"
    assert int(response.headers["retry-after"]) >= 1
    body = json.loads(response.content)
    assert (body["error"], body["upstream"]) == ("token_unavailable", "inventory")


async def test_too_many_header_fields_are_refused(start_reverse_grpc: StartGrpcProxy) -> None:
    proxy = await start_reverse_grpc(limits=LimitsConfig(max_headers=10))
    fields = {f"x-field-{index}": "v" for index in range(11)}
    async with httpx.AsyncClient(http1=False, http2=True, trust_env=False) as client:
        response = await client.get(
            f"http://{proxy.target}/api/stock", headers=fields, timeout=CALL_TIMEOUT
        )
    assert response.status_code == 431
    assert json.loads(response.content)["detail"] == "too many request headers"


async def test_a_body_past_max_body_size_is_refused_and_never_reaches_the_upstream_whole(
    start_reverse_grpc: StartGrpcProxy, plain_grpc_server: GrpcServer
) -> None:
    # gRPC sends no content-length: the body is counted as it arrives.
    proxy = await start_reverse_grpc(limits=LimitsConfig(max_body_size=16 * 1024))
    channel = proxy.channel()
    try:
        unary = channel.unary_unary(method("Unary"))
        assert await in_thread(lambda: unary(b"small", timeout=CALL_TIMEOUT)) == b"small"
        with pytest.raises(grpc.RpcError) as failure:
            await in_thread(lambda: unary(b"x" * (64 * 1024), timeout=CALL_TIMEOUT))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "request body larger than 16384 bytes" in failure.value.details()
        client_stream = channel.stream_unary(method("ClientStream"))
        messages = [bytes([index]) * 1000 for index in range(50)]
        with pytest.raises(grpc.RpcError) as failure:
            await in_thread(lambda: client_stream(iter(messages), timeout=CALL_TIMEOUT))
        assert failure.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        channel.close()
    # The large unary call never reached the server whole: it was never answered there.
    assert [call.method for call in plain_grpc_server.calls if call.method == "Unary"] == ["Unary"]
    assert grpc_count(proxy, 8) == 2
    # The unary call was refused before its answer began; the streaming one after.
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="413") >= 1


async def test_a_declared_content_length_past_max_body_size_is_413_at_once(
    start_reverse_grpc: StartGrpcProxy, token_server: TokenServer
) -> None:
    proxy = await start_reverse_grpc(limits=LimitsConfig(max_body_size=1024))
    async with httpx.AsyncClient(http1=False, http2=True, trust_env=False) as client:
        response = await client.post(
            f"http://{proxy.target}/api/stock", content=b"x" * 4096, timeout=CALL_TIMEOUT
        )
    assert response.http_version == "HTTP/2"
    assert response.status_code == 413
    assert json.loads(response.content)["detail"] == "request body larger than 1024 bytes"
    assert proxy.metric("token_proxy_requests_total", upstream="inventory", code="413") == 1


async def test_a_client_still_sending_is_told_to_stop_after_a_413(
    start_reverse_grpc: StartGrpcProxy,
) -> None:
    # RFC 9113 §8.1: the answer, then RST_STREAM with NO_ERROR, so that the client stops
    # sending a body that nobody will read.
    proxy = await start_reverse_grpc(limits=LimitsConfig(max_body_size=1024))
    client = await RawH2.open(int(proxy.target.rpartition(":")[2]))
    try:
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":authority", b"inventory.internal"),
            (b":path", b"/api/stock"),
            (b"content-length", b"1000000"),
        ]
        client.h2.send_headers(1, headers)
        client.flush()
        async with asyncio.timeout(CALL_TIMEOUT):
            while 1 not in client.received.resets() and not client.received.closed:
                await client.read_events()
    finally:
        await client.close()
    responses = [e for e in client.events if isinstance(e, h2.events.ResponseReceived)]
    assert [dict(e.headers or [])[b":status"] for e in responses] == [b"413"]
    assert client.received.resets() == {1: 0}  # NO_ERROR
