"""The fleet token cache against a real redis-server: replicas share one token per
credential per lifetime, and a cache that fails changes nothing but the count of
token requests.

Every replica here is a `TokenProvider` with its own metrics and its own Redis client
(tests/tokens/fleet.py); the tests with whole proxy processes are in
tests/tokens/test_fleet_processes.py.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest

from proxy.config import Secret, TokenCacheConfig, TokenConfig
from proxy.ops.metrics import Metrics
from proxy.tokens import provider as provider_module
from proxy.tokens import redis_backend
from proxy.tokens.cache_crypto import CacheKeys, credential_identity
from tests.support.redis_server import ErrorServer, RedisServer, SilentServer
from tests.support.token_server import TokenServer
from tests.support.waiting import eventually
from tests.tokens.fleet import (
    CLIENT_ID,
    SECRET,
    Replica,
    cache_config,
    make_replica,
    token_config,
    write_key_file,
)

pytestmark = pytest.mark.timeout(60)

MakeReplica = Callable[..., Replica]


class WallClock:
    """The wall clock of a replica whose clock is `offset` seconds off."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


@pytest.fixture
async def server() -> AsyncIterator[TokenServer]:
    async with TokenServer(clients={CLIENT_ID: SECRET}) as ts:
        yield ts


@pytest.fixture
def cache(redis_server: RedisServer, key_file: Path) -> TokenCacheConfig:
    return cache_config(redis_server.url, key_file, lock_timeout=5.0)


@pytest.fixture
async def replicas() -> AsyncIterator[list[Replica]]:
    created: list[Replica] = []
    yield created
    for replica in created:
        await replica.close()


@pytest.fixture
def replica(server: TokenServer, cache: TokenCacheConfig, replicas: list[Replica]) -> MakeReplica:
    """A replica on its own Redis connection: `replica(token=..., cache=..., ...)`."""

    def make(**options: Any) -> Replica:
        token = options.pop("token", None) or token_config(server.url)
        made = make_replica(token, options.pop("cache", cache), **options)
        replicas.append(made)
        return made

    return make


@pytest.fixture
def short_lifetimes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tokens of a second or two, to see refreshes within a test: below the real floor."""
    monkeypatch.setattr(provider_module, "MIN_LIFETIME", 0.5)


def key_text(path: Path) -> str:
    return path.read_text().strip()


async def all_valid(replicas: list[Replica]) -> None:
    async def valid() -> bool:
        return all(r.provider.is_valid() for r in replicas)

    await eventually(valid, within=15)


async def until(check: Callable[[], bool], within: float = 15.0) -> None:
    async def condition() -> bool:
        return check()

    await eventually(condition, within=within)


# -- sharing ---------------------------------------------------------------------------


async def test_ten_replicas_starting_together_make_one_token_request(
    server: TokenServer, replica: MakeReplica
) -> None:
    fleet = [replica() for _ in range(10)]
    for member in fleet:
        await member.provider.start()
    await all_valid(fleet)

    assert server.fetch_count == 1
    tokens = {member.provider.current() for member in fleet}
    assert tokens == {server.issued[0]}
    assert sum(member.fetches() for member in fleet) == 1
    sources = sorted(str(member.provider.status()["token_source"]) for member in fleet)
    assert sources == ["fetched"] + ["shared_cache"] * 9
    # The others either found the entry or waited for it: none waited in vain.
    assert sum(m.waits("timeout") + m.waits("error") for m in fleet) == 0


async def test_a_new_replica_with_a_valid_shared_token_requests_nothing(
    server: TokenServer, replica: MakeReplica
) -> None:
    first = replica()
    await first.provider.start()
    await all_valid([first])
    assert first.lookups("miss") == 1

    later = replica()
    await later.provider.start()
    await all_valid([later])

    assert server.fetch_count == 1
    assert later.provider.current() == first.provider.current()
    assert later.lookups("hit") == 1
    assert later.fetches() == 0
    status = later.provider.status()
    assert status["token_source"] == "shared_cache"
    assert status["shared_cache_hits"] == 1
    assert status["token_cache"] == "shared"
    # Its expiry comes from the entry, not from a lifetime of its own.
    assert 3500 < float(str(status["expires_in_seconds"])) <= 3600


@pytest.mark.usefixtures("short_lifetimes")
async def test_refreshes_are_coordinated_across_replicas(
    server: TokenServer, replica: MakeReplica
) -> None:
    server.expires_in = 2  # margin 0.4 s: refreshes about every 1.6 s
    fleet = [replica() for _ in range(5)]
    started = time.monotonic()
    for member in fleet:
        await member.provider.start()
    await all_valid(fleet)

    # Four refreshes, every replica following each, whoever renews.
    await until(lambda: server.fetch_count >= 5, within=20)
    last = server.issued[4]
    await until(lambda: all(m.provider.current() in (last, *server.issued[5:]) for m in fleet))

    # Five tokens for five replicas over five lifetimes, where 25 would be made alone.
    lifetimes = server.fetch_count
    assert sum(member.fetches() for member in fleet) == lifetimes
    hits = sum(member.lookups("hit") + member.waits("entry") for member in fleet)
    assert hits >= 4 * (lifetimes - 1)
    # What one replica alone needs: its first token and one per refresh interval
    # (lifetime 2 s minus the 0.4 s margin); the fleet asks for no more than 1.2 times that.
    alone = 1 + (time.monotonic() - started) / 1.6
    assert server.fetch_count <= 1.2 * alone


async def test_the_lock_holder_dying_costs_one_lock_expiry_and_one_request(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer, key_file: Path
) -> None:
    fast_lock = cache_config(redis_server.url, key_file, lock_timeout=3.0)
    fleet = [replica(cache=fast_lock) for _ in range(4)]
    slot = fleet[0].slot
    assert slot is not None
    name = slot.entry_name()
    assert name is not None
    # What a holder that died mid-fetch leaves behind: its lock, no entry, no release.
    # It died a while after taking the lock: 1 s of the lock's life is left, 2 s less
    # than the waiters' patience.
    left = 1.0
    assert left < slot.lock_ttl
    started = time.monotonic()
    client = redis_server.client()
    await client.set(f"{name}:lock", b"dead-holder", px=int(left * 1000))
    await client.aclose()

    for member in fleet:
        await member.provider.start()
    await all_valid(fleet)

    assert server.fetch_count == 1
    assert time.monotonic() - started >= left * 0.9
    assert sum(m.waits("acquired") for m in fleet) == 1
    assert sum(m.waits("entry") for m in fleet) == 3
    assert sum(m.waits("timeout") for m in fleet) == 0


async def test_a_slow_holder_loses_its_lock_to_one_waiter(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer, key_file: Path
) -> None:
    short = cache_config(redis_server.url, key_file, lock_timeout=1.0)
    holder, waiter = replica(cache=short), replica(cache=short)
    server.hold = asyncio.Event()  # the holder's token request hangs
    await holder.provider.start()
    await server.wait_for_requests(1)

    await waiter.provider.start()
    await server.wait_for_requests(2)  # the holder's lock expired: the waiter took it
    server.hold.set()
    await all_valid([holder, waiter])
    assert waiter.waits("acquired") == 1
    assert server.fetch_count == 2


async def test_waiters_request_a_token_themselves_after_lock_timeout(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer, key_file: Path
) -> None:
    short = cache_config(redis_server.url, key_file, lock_timeout=0.5)
    waiter = replica(cache=short)
    assert waiter.slot is not None
    name = waiter.slot.entry_name()
    # A holder with a lock longer than this replica's patience (another config, say).
    client = redis_server.client()
    await client.set(f"{name}:lock", b"other-holder", px=60_000)
    await client.aclose()

    await waiter.provider.start()
    await all_valid([waiter])
    assert waiter.waits("timeout") == 1
    assert server.fetch_count == 1
    # Its own token is written back all the same.
    assert len(await redis_server.dump()) == 2


async def test_401_purge_removes_the_entry_only_while_it_holds_the_refused_token(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer
) -> None:
    first, second = replica(), replica()
    await first.provider.start()
    await all_valid([first])
    await second.provider.start()
    await all_valid([second])
    refused = first.provider.current()
    assert refused is not None
    assert second.provider.current() == refused

    first.provider.invalidate(refused)
    await until(lambda: first.provider.current() not in (None, refused))
    renewed = first.provider.current()
    assert server.fetch_count == 2

    # The second replica is refused the same old token: its purge must not remove the
    # renewed entry, and it takes that entry instead of asking again.
    second.provider.invalidate(refused)
    await until(lambda: second.provider.current() == renewed)
    assert server.fetch_count == 2
    assert second.provider.status()["token_source"] == "shared_cache"
    assert len(await redis_server.dump()) == 1


# -- what Redis holds ------------------------------------------------------------------


async def test_redis_holds_no_token_secret_or_jwt(
    replica: MakeReplica, redis_server: RedisServer, tmp_path: Path
) -> None:
    async with TokenServer(
        clients={CLIENT_ID: SECRET}, token_format="jwt", expires_in=3600
    ) as jwt_server:
        secret_file = tmp_path / "secret"
        secret_file.write_text(SECRET + "\n")
        one = replica(token=token_config(jwt_server.url, scope=("read",)))
        two = replica(
            token=token_config(
                jwt_server.url,
                client_secret=None,
                client_secret_file=secret_file,
                audience="https://inventory.internal",
            ),
            upstream="billing",
        )
        await one.provider.start()
        await two.provider.start()
        await all_valid([one, two])
        tokens = jwt_server.issued
        assert len(tokens) == 2

        keys = (await redis_server.cli("--scan")).split()
        dump = await redis_server.dump()
        assert sorted(keys) == sorted(key.decode() for key in dump)
        assert len(keys) == 2
        everything = b"\n".join([*dump, *dump.values()])
        forbidden = [*tokens, SECRET, CLIENT_ID, "eyJ", "Bearer", "inventory", "billing"]
        for token in tokens:
            forbidden += [part for part in token.split(".") if len(part) > 8]
        for text in forbidden:
            assert text.encode() not in everything, text
        for value in dump.values():
            assert value[:1] == b"\x01"  # version, then nonce and AES-GCM ciphertext


async def test_a_tampered_value_is_a_counted_miss_never_an_error(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer
) -> None:
    first = replica()
    await first.provider.start()
    await all_valid([first])
    [(name, value)] = (await redis_server.dump()).items()
    client = redis_server.client()
    tampered = bytearray(value)
    tampered[-1] ^= 0x01
    await client.set(name, bytes(tampered), px=60_000)

    second = replica()
    await second.provider.start()
    await all_valid([second])
    assert second.lookups("miss") == 1
    assert (
        second.sample("token_proxy_token_cache_rejected_entries_total", reason="undecryptable") == 1
    )
    assert second.fetches() == 1
    assert second.provider.current() != first.provider.current()

    # Garbage of every shape is a miss too.
    for garbage in (b"", b"\x01", b"not a value at all", b"\x01" + bytes(200)):
        await client.set(name, garbage, px=60_000)
        third = replica()
        await third.provider.start()
        await all_valid([third])
        assert third.lookups("miss") == 1
        assert third.fetches() == 1
    await client.aclose()


async def test_a_value_moved_to_another_credential_does_not_open(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer
) -> None:
    first = replica()
    await first.provider.start()
    await all_valid([first])
    [value] = (await redis_server.dump()).values()

    other = replica(token=token_config(server.url, scope=("write",)))
    assert other.slot is not None
    other_name = other.slot.entry_name()
    assert other_name is not None
    client = redis_server.client()
    await client.set(other_name, value, px=60_000)
    await client.aclose()

    await other.provider.start()
    await all_valid([other])
    assert other.provider.current() != first.provider.current()
    assert (
        other.sample("token_proxy_token_cache_rejected_entries_total", reason="undecryptable") == 1
    )


async def test_a_replica_with_another_key_reads_nothing_and_fetches_its_own(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer, tmp_path: Path
) -> None:
    first = replica()
    await first.provider.start()
    await all_valid([first])

    other_key = write_key_file(tmp_path / "other-key")
    stranger = replica(cache=cache_config(redis_server.url, other_key))
    await stranger.provider.start()
    await all_valid([stranger])

    assert server.fetch_count == 2
    assert stranger.provider.current() != first.provider.current()
    assert stranger.lookups("miss") == 1
    # Another key names other entries: the two never meet.
    assert len(await redis_server.dump()) == 2


@pytest.mark.parametrize(
    "difference",
    [
        {"scope": ("write",)},
        {"audience": "https://billing.internal"},
        {"resource": ("https://billing.internal",)},
        {"extra_params": (("tenant", "b"),)},
        {"client_secret": Secret("another-secret-value")},
        {"auth_method": "client_secret_post"},
    ],
    ids=["scope", "audience", "resource", "extra_params", "secret", "auth_method"],
)
async def test_credentials_that_differ_in_one_thing_never_share_a_token(
    server: TokenServer, replica: MakeReplica, difference: dict[str, Any]
) -> None:
    server.clients["order-service"] = SECRET
    base = token_config(server.url, scope=("read",))
    changed = token_config(server.url, **{"scope": ("read",), **difference})
    first, second = replica(token=base), replica(token=changed, upstream="other")
    assert first.slot is not None
    assert second.slot is not None
    assert first.slot.entry_name() != second.slot.entry_name()

    await first.provider.start()
    await all_valid([first])
    await second.provider.start()
    if "client_secret" in difference:
        # The token server refuses that secret: the cache must not hand it the token.
        await server.wait_for_requests(2)
        await until(lambda: second.provider.status()["consecutive_failures"] != 0)
        assert second.provider.current() is None
    else:
        await all_valid([second])
        assert second.provider.current() != first.provider.current()
    assert second.lookups("hit") == 0


async def test_a_rotated_secret_file_is_another_credential(tmp_path: Path, key_file: Path) -> None:
    keys = CacheKeys.from_file(key_file)
    secret_file = tmp_path / "secret"
    secret_file.write_text("first-secret-value\n")
    config = TokenConfig(
        client_id=CLIENT_ID, token_url="http://127.0.0.1:9/t", client_secret_file=secret_file
    )
    before = keys.entry_name("p", credential_identity(config, keys))
    secret_file.write_text("first-secret-value")  # only the newline: the same secret
    assert keys.entry_name("p", credential_identity(config, keys)) == before
    secret_file.write_text("second-secret-value\n")
    assert keys.entry_name("p", credential_identity(config, keys)) != before
    assert "secret-value" not in str(credential_identity(config, keys))


async def test_an_upstream_with_cache_local_never_touches_redis(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer
) -> None:
    local = [replica(token=token_config(server.url, cache="local")) for _ in range(3)]
    for member in local:
        await member.provider.start()
    await all_valid(local)
    assert server.fetch_count == 3
    assert all(member.slot is None for member in local)
    assert all(member.provider.status()["token_cache"] == "local" for member in local)
    assert await redis_server.dump() == {}


# -- clocks ----------------------------------------------------------------------------


async def test_replicas_whose_clocks_differ_keep_the_margin_on_their_own_clock(
    server: TokenServer, replica: MakeReplica
) -> None:
    server.expires_in = 60  # margin min(300, 20 %) = 12 s
    writer = replica()
    await writer.provider.start()
    await all_valid([writer])

    ahead = replica(wall_clock=WallClock(+3))
    behind = replica(wall_clock=WallClock(-3))
    for member in (ahead, behind):
        await member.provider.start()
    await all_valid([ahead, behind])
    assert server.fetch_count == 1
    ahead_left = float(str(ahead.provider.status()["expires_in_seconds"]))
    behind_left = float(str(behind.provider.status()["expires_in_seconds"]))
    # Three seconds less on a clock three seconds ahead; never more than the lifetime.
    assert 54 < ahead_left <= 57.5
    assert 57 < behind_left <= 60

    # A clock far enough ahead sees the entry within its refresh margin: not taken.
    late = replica(wall_clock=WallClock(+50))
    await late.provider.start()
    await all_valid([late])
    assert late.lookups("miss") == 1
    assert late.provider.status()["token_source"] == "fetched"
    assert server.fetch_count == 2


# -- failures of the cache -------------------------------------------------------------


async def _serves_without_cache(
    server: TokenServer, replica: Replica, reason: str, *, lookups: str = "error"
) -> None:
    await replica.provider.start()
    await all_valid([replica])
    assert replica.provider.status()["token_source"] == "fetched"
    assert replica.lookups(lookups) >= 1
    assert replica.backend is not None
    status = replica.backend.status()
    assert status["state"] == "down"
    assert isinstance(status["last_error"], dict)
    assert status["last_error"]["reason"] == reason
    assert replica.sample("token_proxy_token_cache_up") == 0
    assert replica.sample("token_proxy_token_cache_errors_total", reason=reason) >= 1


async def test_redis_down_means_fetching_alone(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer, key_file: Path
) -> None:
    await redis_server.stop()
    member = replica()
    await _serves_without_cache(server, member, "unreachable")


async def test_redis_refusing_auth_means_fetching_alone(
    server: TokenServer, replica: MakeReplica, tmp_path: Path, key_file: Path
) -> None:
    directory = tmp_path / "locked"
    directory.mkdir()
    async with RedisServer(directory, password="the-redis-password") as locked:
        wrong = tmp_path / "redis-password"
        wrong.write_text("not-the-password\n")
        config = cache_config(locked.url, key_file, redis={"password_file": wrong})
        member = replica(cache=config)
        await _serves_without_cache(server, member, "auth")

        right = tmp_path / "right-password"
        right.write_text("the-redis-password\n")
        ok = replica(cache=cache_config(locked.url, key_file, redis={"password_file": right}))
        await ok.provider.start()
        await all_valid([ok])
        assert ok.backend is not None
        assert ok.backend.state == "up"
        assert len(await locked.dump()) == 1


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        ("MOVED 3999 127.0.0.1:6381", "cluster_redirect"),
        ("READONLY You can't write against a read only replica.", "read_only"),
        ("OOM command not allowed when used memory > 'maxmemory'.", "out_of_memory"),
        ("ERR unknown command", "error_reply"),
    ],
)
async def test_error_replies_mean_fetching_alone(
    server: TokenServer, replica: MakeReplica, key_file: Path, error: str, reason: str
) -> None:
    async with ErrorServer(error) as wrong:
        member = replica(cache=cache_config(wrong.url, key_file))
        await _serves_without_cache(server, member, reason)


async def test_a_real_read_only_or_full_redis_only_loses_the_write(
    server: TokenServer, replica: MakeReplica, redis_server: RedisServer
) -> None:
    client = redis_server.client()
    await client.config_set("maxmemory", 1)
    await client.config_set("maxmemory-policy", "noeviction")
    member = replica()
    await member.provider.start()
    await all_valid([member])
    assert member.sample("token_proxy_token_cache_write_failures_total", upstream="inventory") == 1
    assert member.provider.status()["token_source"] == "fetched"
    assert member.sample("token_proxy_token_cache_errors_total", reason="out_of_memory") >= 1
    await client.aclose()


async def test_a_redis_that_hangs_costs_one_short_timeout_and_never_blocks_the_loop(
    server: TokenServer, replica: MakeReplica, key_file: Path
) -> None:
    async with SilentServer() as silent:
        member = replica(cache=cache_config(silent.url, key_file))
        assert member.backend is not None
        backend = member.backend
        ticks_while_pending = 0

        async def ticker() -> None:
            nonlocal ticks_while_pending
            while True:
                await asyncio.sleep(0.01)
                if backend.state == "unknown":  # the first Redis call has not answered
                    ticks_while_pending += 1

        ticking = asyncio.create_task(ticker())
        started = time.monotonic()
        await _serves_without_cache(server, member, "timeout")
        elapsed = time.monotonic() - started
        ticking.cancel()
        assert elapsed < 3.0
        # About 50 ticks in the socket timeout (0.5 s). A loop blocked for it ticks
        # once at most before the call fails; a stall of the machine costs some ticks.
        assert ticks_while_pending >= 5
        # Down: the next refresh does not wait for Redis again before the retry time.
        assert backend.status()["retry_in_seconds"] is not None


async def test_the_cache_state_is_logged_once_per_change(
    replica: MakeReplica,
    redis_server: RedisServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    caplog.set_level(logging.INFO, logger="token_proxy.tokens.cache")
    monkeypatch.setattr(redis_backend, "RETRY_INITIAL", 0.02)
    monkeypatch.setattr(redis_backend, "RETRY_MAX", 0.05)
    member = replica()
    slot, backend = member.slot, member.backend
    assert slot is not None
    assert backend is not None
    await redis_server.stop()

    async def failed_lookups(n: int) -> bool:
        await slot.lookup(lambda entry: True)
        return backend.status()["consecutive_failures"] == n

    for attempt in range(1, 6):
        await eventually(lambda attempt=attempt: failed_lookups(attempt), within=5)
    await redis_server.start()

    async def answers() -> bool:
        await slot.lookup(lambda entry: True)
        return backend.state == "up"

    await eventually(answers, within=5)
    states = [getattr(r, "state", None) for r in caplog.records]
    assert states == ["down", "up"]
    assert member.lookups("error") >= 5


async def test_redis_stopped_and_restarted_while_tokens_refresh(
    server: TokenServer,
    replica: MakeReplica,
    redis_server: RedisServer,
    monkeypatch: pytest.MonkeyPatch,
    short_lifetimes: None,
) -> None:
    monkeypatch.setattr(redis_backend, "RETRY_MAX", 0.5)
    server.expires_in = 2
    # Renewed 1 s before expiry: a refresh may be 0.9 s late (a Redis timeout and a
    # stalled machine) before a token is missing.
    token = token_config(server.url, refresh_before_expiry=1.0)
    fleet = [replica(token=token) for _ in range(3)]
    for member in fleet:
        await member.provider.start()
    await all_valid(fleet)
    missing = 0

    async def reader() -> None:
        nonlocal missing
        while True:
            for member in fleet:
                if member.provider.current() is None:
                    missing += 1
            await asyncio.sleep(0.005)

    reading = asyncio.create_task(reader())
    await redis_server.stop()
    before = server.fetch_count
    await until(lambda: server.fetch_count >= before + 6, within=20)  # each on its own
    assert all(m.backend is not None and m.backend.state == "down" for m in fleet)
    await redis_server.start()
    await until(lambda: all(m.backend is not None and m.backend.state == "up" for m in fleet))
    after = server.fetch_count
    await until(lambda: server.fetch_count >= after + 3, within=20)
    reading.cancel()
    assert missing == 0
    assert all(m.provider.status()["consecutive_failures"] == 0 for m in fleet)


async def test_the_key_file_is_never_used_short(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("too-short\n")
    with pytest.raises(ValueError, match="at least 32 bytes"):
        CacheKeys.from_file(short)


def test_value_format_round_trips_and_binds_the_name(key_file: Path) -> None:
    from proxy.tokens.cache_crypto import CacheEntry, EntryRejected

    keys = CacheKeys.from_file(key_file)
    entry = CacheEntry("tok-1", "Bearer", expires_at=1e9, lifetime=3600.0)
    value = keys.seal("p:token:a", entry)
    assert keys.open_entry("p:token:a", value) == entry
    assert keys.seal("p:token:a", entry) != value  # a fresh nonce each time
    with pytest.raises(EntryRejected):
        keys.open_entry("p:token:b", value)
    rng = random.Random(7)
    for _ in range(50):
        with pytest.raises(EntryRejected):
            keys.open_entry("p:token:a", bytes(rng.randrange(256) for _ in range(64)))


async def test_the_cache_state_stays_current_between_refreshes(
    redis_server: RedisServer, cache: TokenCacheConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_backend, "RETRY_INITIAL", 0.05)
    monkeypatch.setattr(redis_backend, "RETRY_MAX", 0.1)
    monkeypatch.setattr(redis_backend, "HEALTH_INTERVAL", 0.1)
    metrics = Metrics()
    backend = redis_backend.CacheBackend(cache, metrics)
    backend.start()
    try:
        await until(lambda: backend.state == "up")
        assert metrics.registry.get_sample_value("token_proxy_token_cache_up") == 1
        await redis_server.stop()
        await until(lambda: backend.state == "down")
        assert metrics.registry.get_sample_value("token_proxy_token_cache_up") == 0
        await redis_server.start()
        await until(lambda: backend.state == "up")
    finally:
        await backend.close()


async def test_no_token_or_secret_reaches_a_log_line_or_status(
    server: TokenServer,
    replica: MakeReplica,
    redis_server: RedisServer,
    tmp_path: Path,
    key_file: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    first, second = replica(), replica()
    await first.provider.start()
    await all_valid([first])
    await second.provider.start()
    await all_valid([second])
    token = first.provider.current()
    assert token is not None
    first.provider.invalidate(token)
    await until(lambda: first.provider.current() not in (None, token))
    directory = tmp_path / "locked"
    directory.mkdir()
    async with RedisServer(directory, password="redis-pass-word-77") as locked:
        wrong = tmp_path / "wrong"
        wrong.write_text("wrong-pass-word-88\n")
        url = f"redis://user:url-pass-word-99@127.0.0.1:{locked.port}/0"
        refused = replica(cache=cache_config(url, key_file, redis={"password_file": wrong}))
        await refused.provider.start()
        await all_valid([refused])
        assert refused.backend is not None
        status = str(refused.backend.status())
    texts = [status, *(str(m.provider.status()) for m in (first, second, refused))]
    for record in caplog.records:
        texts.append(record.getMessage())
        texts.append(str(vars(record)))
    everything = "\n".join(texts)
    for secret in (
        *server.issued,
        SECRET,
        "redis-pass-word-77",
        "wrong-pass-word-88",
        "url-pass-word-99",
        key_text(key_file),
    ):
        assert secret not in everything
    assert "127.0.0.1" in status  # the backend is named, without its credentials
