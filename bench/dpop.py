"""DPoP on the request path: token-proxy with ES256 and EdDSA proofs against bearer tokens.

One token-proxy process (pinned to the core under test, as in `bench.stack`) serves
three upstreams, each on its own reverse `listen` port and with its own client id, all
passing to the same nginx origin (`bench.nginx`, 1 KiB answers):

* `bench-bearer`: no `dpop`, so a bearer token and nothing signed;
* `bench-es256`: `dpop: {alg: ES256}`, a P-256 key generated at start-up;
* `bench-eddsa`: `dpop: {alg: EdDSA}`, an Ed25519 key generated at start-up.

The token endpoint (`bench.token_endpoint`) answers a token request that carries a
DPoP proof with `"token_type": "DPoP"`; before measuring, the proxy's `/status` must
show a DPoP token held by both DPoP upstreams, or the run fails. Every request sent
with a DPoP token carries a freshly signed proof (one signature per request). The
origin does not verify proofs, but it answers 401 to anything but `Bearer <token>`
without a `DPoP` field, or `DPoP <token>` with a proof shaped as a JWS, so a proxy
that sent the wrong scheme or no proof shows up as errors, not as fast numbers.

wrk loads the three ports in turn, round after round (`--rounds` x `--duration` s at
`--connections`, after a 1-second warm-up of each); the table shows medians, and the
ratios to bearer are medians of per-round ratios. CPU per request is the proxy
process's user + system time (/proc) over each load, divided by the requests wrk
completed (`bench.measure.load`).

Before the servers start, the same process times, in process (no network, pinned to
the core under test, CPU time per call): `ProofSigner.proof()` and `DpopKey.sign` for
ES256, EdDSA, RS256 and PS256; `Injector.inject` (the request path's whole credential
step) with a bearer token and with ES256 and EdDSA tokens; and an ES256 proof split
into its signature (ECDSA in OpenSSL, then DER to R || S) and the rest (jti, iat,
JSON, base64url), so the report can say what dominates what DPoP adds per request.

    .venv/bin/python -m bench.dpop                       # 3 rounds of 5 s, 32 connections
    .venv/bin/python -m bench.dpop --rounds 5 --duration 8 --json /tmp/dpop.json

`make compile` first to measure the compiled data path (as `make bench` does). nginx,
wrk, curl and taskset are installed with apt-get when missing. Everything listens on
127.0.0.1, every loop is bounded in count and time, and every process is stopped on
exit, error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import base64
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import time
import timeit
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import cast

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from bench import measure, nginx
from bench.measure import LoadSample
from bench.prerequisites import ensure_commands
from bench.processes import ProcessGroup, bounded_run, free_port, progress, stop_on_signals
from bench.report import median, paired_ratio
from bench.stack import (
    Cores,
    Target,
    bench_upstream,
    start_token_endpoint,
    start_token_proxy,
    token_proxy_config,
)
from bench.suite import background_busy_percent, machine_info
from bench.wrk import Request
from proxy.config import DpopAlgorithm, DpopConfig
from proxy.datapath.injector import Injector
from proxy.tokens.dpop import DpopKey, DpopSession, ProofSigner
from proxy.tokens.held_token import HeldToken

# Upstream name and its DPoP algorithm (None: bearer tokens).
UPSTREAMS: tuple[tuple[str, DpopAlgorithm | None], ...] = (
    ("bench-bearer", None),
    ("bench-es256", "ES256"),
    ("bench-eddsa", "EdDSA"),
)
BASELINE = "bench-bearer"
# The throughput each DPoP upstream should keep, as a share of bearer's (req/s).
TARGETS = {"bench-es256": 0.6, "bench-eddsa": 0.75}
MICRO_ALGORITHMS: tuple[DpopAlgorithm, ...] = ("ES256", "EdDSA", "RS256", "PS256")
INJECT_ALGORITHMS: tuple[DpopAlgorithm, ...] = ("ES256", "EdDSA")
# Longer than any run: no token refresh in the middle of a load.
TOKEN_LIFETIME = 3600
STATUS_TIMEOUT = 20.0
NOISY_PERCENT = 10
WARM_UP_SECONDS = 1.0
# Micro-measures: each repeat runs `number` calls, sized to take about this long,
# within these bounds.
MICRO_REPEATS = 5
MICRO_REPEAT_SECONDS = 0.2
MICRO_MAX_CALLS = 200_000
SAMPLE_TOKEN = "a" * 32  # what the token endpoint issues: 24 random bytes, base64url
_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# The origin's check, from `bench.nginx.origin_config`, and what replaces it here.
_BEARER_CHECK = 'if ($http_authorization !~ "^Bearer .") { return 401; }'
_CREDENTIAL_MAP = r"""
    map "$http_authorization|$http_dpop" $bench_credential_ok {
        default 0;
        "~^Bearer [^|]+\|$" 1;
        "~^DPoP [^|]+\|[-\w]+\.[-\w]+\.[-\w]+$" 1;
    }
"""


def origin_config(directory: Path, port: int, big_file: Path) -> str:
    """`bench.nginx`'s origin, taking `Bearer` without a proof or `DPoP` with one."""
    config = nginx.origin_config(directory, port, big_file)
    if config.count(_BEARER_CHECK) != 1 or config.count("\n    server {") != 1:
        raise RuntimeError("bench.nginx.origin_config changed: update bench.dpop's origin")
    config = config.replace(_BEARER_CHECK, "if ($bench_credential_ok = 0) { return 401; }")
    return config.replace("\n    server {", _CREDENTIAL_MAP + "    server {")


# -- the servers ------------------------------------------------------------------------


class DpopStack:
    """The origin, the token endpoint and token-proxy with its three upstreams."""

    def __init__(self, group: ProcessGroup, workdir: Path, cores: Cores) -> None:
        self.group = group
        self.workdir = workdir
        self.cores = cores
        self.origin_port = free_port()
        self.token_port = free_port()
        self.proxy_port = free_port()
        self.admin_port = free_port()
        self.ports = {name: free_port() for name, _ in UPSTREAMS}
        self.proxy: subprocess.Popen[bytes] | None = None

    def start(self) -> list[Target]:
        big_file = self.workdir / "big.bin"  # the origin's /big, unused here
        big_file.write_bytes(b"")
        big_file.chmod(0o644)
        origin_file = self.workdir / "origin.conf"
        origin_file.write_text(origin_config(self.workdir, self.origin_port, big_file))
        origin = self.group.start(
            "origin", nginx.nginx_command(origin_file, self.workdir), cpus=self.cores.origin
        )
        self.group.wait_for_port("origin", origin, self.origin_port)
        cores = self.cores
        secret = start_token_endpoint(self.group, self.token_port, TOKEN_LIFETIME, cores.origin)
        proxy = start_token_proxy(
            self.group,
            self.workdir,
            self.proxy_config(),
            secret=secret,
            admin_port=self.admin_port,
            cpus=self.cores.under_test,
        )
        self.proxy = proxy
        self.check_token_types()
        return [
            Target(
                name=name,
                port=self.ports[name],
                request=Request("/", host(name)),
                download_url=f"http://127.0.0.1:{self.ports[name]}/big",
                upload_url=None,
                curl_proxy=None,
                pids=[proxy.pid],
            )
            for name, _ in UPSTREAMS
        ]

    def proxy_config(self) -> dict[str, object]:
        upstreams: dict[str, dict[str, object]] = {}
        origin = f"http://127.0.0.1:{self.origin_port}"
        for name, alg in UPSTREAMS:
            dpop = {} if alg is None else {"dpop": {"alg": alg}}
            upstreams[name] = bench_upstream(
                name, host(name), origin, self.token_port, self.ports[name], **dpop
            )
        return token_proxy_config(self.proxy_port, self.admin_port, upstreams)

    def token_types(self) -> dict[str, str | None]:
        """Per upstream, from /status: the type of the token it holds ("Bearer", "DPoP")
        or None while it holds none."""
        url = f"http://127.0.0.1:{self.admin_port}/status"
        with _NO_PROXY.open(url, timeout=5) as response:
            upstreams: dict[str, dict[str, object]] = json.load(response)["upstreams"]
        types_held: dict[str, str | None] = {}
        for name, state in upstreams.items():
            dpop = state.get("dpop")
            if isinstance(dpop, dict):
                held = dpop.get("token_type")
                types_held[name] = held if isinstance(held, str) else None
            else:
                types_held[name] = "Bearer" if state.get("state") == "valid" else None
        return types_held

    def check_token_types(self) -> None:
        """Fail unless each upstream holds the kind of token it is measured with."""
        assert self.proxy is not None
        wanted = {name: "Bearer" if alg is None else "DPoP" for name, alg in UPSTREAMS}
        deadline = time.monotonic() + STATUS_TIMEOUT
        while True:
            self.group.check_running("token-proxy", self.proxy)
            held = self.token_types()
            if all(held.get(name) == kind for name, kind in wanted.items()):
                return
            # A token of the wrong type will not change by waiting; a missing one may.
            wrong = {
                name: held.get(name)
                for name, kind in wanted.items()
                if held.get(name) not in (kind, None)
            }
            if wrong or time.monotonic() > deadline:
                raise RuntimeError(
                    "token-proxy's /status shows "
                    + ", ".join(f"{name}: {held.get(name)}" for name in wanted)
                    + f" where {', '.join(f'{n}: {k}' for n, k in wanted.items())} is needed; "
                    "the DPoP upstreams must hold DPoP-bound tokens (bench.token_endpoint "
                    "answers a token request with a DPoP proof with token_type DPoP), "
                    "or the bench would measure bearer tokens three times"
                )
            time.sleep(0.1)


def host(name: str) -> str:
    return f"{name.removeprefix('bench-')}.bench"


# -- micro-measures ---------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    """Microseconds per call of one function, over `MICRO_REPEATS` repeats."""

    median_us: float
    min_us: float
    calls: int

    def as_dict(self) -> dict[str, float]:
        return {"median_us": self.median_us, "min_us": self.min_us, "calls": self.calls}


def time_calls(functions: dict[str, Callable[[], object]]) -> dict[str, Timing]:
    """CPU time per call of each function: a number of calls sized to take about
    `MICRO_REPEAT_SECONDS` (10 to `MICRO_MAX_CALLS`), timed `MICRO_REPEATS` times with
    the functions interleaved, so a busy moment of a shared machine hits them alike.
    CPU time of this process, not wall time: time given to other processes on the
    core does not count, as in the loads' CPU per request."""
    timers = {
        name: timeit.Timer(function, timer=time.process_time)
        for name, function in functions.items()
    }
    numbers: dict[str, int] = {}
    for name, timer in timers.items():
        once = max(timer.timeit(10) / 10, 1e-8)
        numbers[name] = max(10, min(MICRO_MAX_CALLS, int(MICRO_REPEAT_SECONDS / once)))
    per_call: dict[str, list[float]] = {name: [] for name in functions}
    for _ in range(MICRO_REPEATS):
        for name, timer in timers.items():
            per_call[name].append(1e6 * timer.timeit(numbers[name]) / numbers[name])
    return {
        name: Timing(median(times), min(times), numbers[name] * MICRO_REPEATS)
        for name, times in per_call.items()
    }


class _NoSignature:
    """Stands in for a `DpopKey` (same alg and JWK) with a fixed signature, so that
    what `ProofSigner.proof()` does besides signing is timed alone."""

    def __init__(self, key: DpopKey, signature: bytes) -> None:
        self.alg = key.alg
        self.jwk = key.jwk
        self._signature = signature

    def sign(self, signing_input: bytes) -> bytes:
        return self._signature


@dataclass(frozen=True)
class Micro:
    """Per algorithm: `proof()`, `request_proof()` and `DpopKey.sign` times and the
    proof's size; `Injector.inject` with a bearer and with DPoP tokens; for ES256,
    where the time goes."""

    proof: dict[str, Timing]
    request_proof: dict[str, Timing]
    sign: dict[str, Timing]
    inject: dict[str, Timing]
    proof_bytes: dict[str, int]
    breakdown: dict[str, Timing]

    def as_dict(self) -> dict[str, object]:
        return {
            "proof": {alg: t.as_dict() for alg, t in self.proof.items()},
            "request_proof": {alg: t.as_dict() for alg, t in self.request_proof.items()},
            "sign": {alg: t.as_dict() for alg, t in self.sign.items()},
            "inject": {kind: t.as_dict() for kind, t in self.inject.items()},
            "proof_bytes": self.proof_bytes,
            "es256_breakdown": {part: t.as_dict() for part, t in self.breakdown.items()},
        }


@contextmanager
def pinned(cpus: str | None) -> Iterator[None]:
    """Run this process on `cpus` (the core under test) for a while, if pinning at all."""
    if cpus is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {int(cpu) for cpu in cpus.split(",")})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def micro_measures(port: int) -> Micro:
    """Time proofs as the request path makes them: `GET http://127.0.0.1:<port>/`."""
    authority = f"127.0.0.1:{port}"
    htu = f"http://{authority}/"
    functions: dict[str, Callable[[], object]] = {}
    sizes: dict[str, int] = {}
    sessions: dict[str, DpopSession] = {}
    for alg in MICRO_ALGORITHMS:
        session = DpopSession(DpopKey.from_config(DpopConfig(alg=alg)))
        sessions[alg] = session
        proof = session.signer.proof("GET", htu, SAMPLE_TOKEN)
        sizes[alg] = len(proof)
        functions[f"proof {alg}"] = partial(session.signer.proof, "GET", htu, SAMPLE_TOKEN)
        functions[f"request_proof {alg}"] = partial(
            session.request_proof, "GET", "http", authority, "/", SAMPLE_TOKEN
        )
        # The signing input: the proof up to its last ".".
        functions[f"sign {alg}"] = partial(session.key.sign, proof.rpartition(b".")[0])

    es256 = sessions["ES256"]
    signing_input = es256.signer.proof("GET", htu, SAMPLE_TOKEN).rpartition(b".")[0]
    unsigned = ProofSigner(cast(DpopKey, _NoSignature(es256.key, es256.key.sign(signing_input))))
    # The same operations `DpopKey.sign` does for ES256, on a key of our own.
    private = ec.generate_private_key(ec.SECP256R1())
    ecdsa = ec.ECDSA(hashes.SHA256())
    der = private.sign(signing_input, ecdsa)

    def der_to_raw() -> bytes:
        r, s = decode_dss_signature(der)
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    def jti() -> str:
        return base64.urlsafe_b64encode(os.urandom(16)).rstrip(b"=").decode("ascii")

    # The whole of what the request path does for the credential: `Injector.inject`,
    # with a bearer token, and with a DPoP-bound one (proof included).
    fields = [(b"Host", b"dpop.bench"), (b"User-Agent", b"wrk")]
    inject_args = (fields, SAMPLE_TOKEN, "GET", "http", authority.encode(), b"/")
    functions["inject Bearer"] = partial(Injector("Authorization", True).inject, *inject_args)
    for alg in INJECT_ALGORITHMS:
        held = HeldToken(time.monotonic)
        held.hold(SAMPLE_TOKEN, math.inf, dpop=True)
        injector = Injector("Authorization", True, dpop=sessions[alg], held=held)
        functions[f"inject {alg}"] = partial(injector.inject, *inject_args)

    functions |= {
        "ecdsa_openssl": partial(private.sign, signing_input, ecdsa),
        "der_to_raw": der_to_raw,
        "proof_without_signature": partial(unsigned.proof, "GET", htu, SAMPLE_TOKEN),
        "jti": jti,
    }
    timings = time_calls(functions)
    proofs: dict[str, Timing] = {alg: timings.pop(f"proof {alg}") for alg in MICRO_ALGORITHMS}
    request_proofs: dict[str, Timing] = {
        alg: timings.pop(f"request_proof {alg}") for alg in MICRO_ALGORITHMS
    }
    signatures: dict[str, Timing] = {alg: timings.pop(f"sign {alg}") for alg in MICRO_ALGORITHMS}
    injects = {kind: timings.pop(f"inject {kind}") for kind in ("Bearer", *INJECT_ALGORITHMS)}
    breakdown = {
        "proof": proofs["ES256"],
        "sign": signatures["ES256"],
        **timings,
        "request_proof": request_proofs["ES256"],
    }
    return Micro(proofs, request_proofs, signatures, injects, sizes, breakdown)


# -- the run ------------------------------------------------------------------------------


def _cpu(sample: LoadSample) -> float:
    return float("nan") if sample.cpu_us_per_request is None else sample.cpu_us_per_request


def paired_difference(
    samples: list[LoadSample], baseline: list[LoadSample], value: Callable[[LoadSample], float]
) -> float:
    """Median over rounds of value(sample) - value(baseline sample of the same round)."""
    return median([value(s) - value(b) for s, b in zip(samples, baseline, strict=False)])


def summary(loads: dict[str, list[LoadSample]], cores: Cores) -> dict[str, dict[str, float]]:
    baseline = loads[BASELINE]
    core = None if cores.under_test is None else int(cores.under_test)
    rows: dict[str, dict[str, float]] = {}
    for name, samples in loads.items():
        rows[name] = {
            "requests_per_second": median([s.requests_per_second for s in samples]),
            "p50_us": median([s.wrk.p50_us for s in samples]),
            "p99_us": median([s.wrk.p99_us for s in samples]),
            "cpu_us_per_request": median([_cpu(s) for s in samples]),
            "requests_per_second_vs_bearer": paired_ratio(
                samples, baseline, lambda s: s.requests_per_second
            ),
            "cpu_vs_bearer": paired_ratio(samples, baseline, _cpu),
            "extra_cpu_us_per_request": paired_difference(samples, baseline, _cpu),
            "proxy_cpu_percent": median([s.process_cpu_percent or float("nan") for s in samples]),
            "core_busy_percent": median(
                [float("nan") if core is None else s.core_busy.get(core, math.nan) for s in samples]
            ),
        }
    return rows


def format_report(
    machine: dict[str, str],
    args: argparse.Namespace,
    cores: Cores,
    background: float,
    rows: dict[str, dict[str, float]],
    micro: Micro,
) -> str:
    lines = [
        f"token-proxy DPoP benchmark: {machine['nproc']} cores ({machine['cpu']}), "
        f"Python {machine['python']}, cryptography {machine['cryptography']} "
        f"({machine['openssl']}), uvloop {machine['uvloop']}, httptools {machine['httptools']}, "
        f"{machine['nginx']}, {machine['wrk']}",
        f"token-proxy {machine['commit']}, data path: {machine['data_path']}",
        f"pinning: {cores.describe()}",
        f"other load on the machine just before the run: {background:.0f}% of all cores"
        + (f" (above {NOISY_PERCENT}%: a noisy run)" if background > NOISY_PERCENT else ""),
        "",
        f"keep-alive GET, 1 KiB responses, reverse listen ports, {args.connections} "
        f"connections, {args.rounds} interleaved rounds of {args.duration:g} s; medians",
        f"  {'upstream':<13} {'req/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>10} "
        f"{'req/s vs bearer':>15} {'CPU vs bearer':>13} {'+CPU µs/req':>11} {'proxy CPU':>9} "
        f"{'its core':>8}",
    ]
    for name, row in rows.items():
        lines.append(
            f"  {name:<13} {row['requests_per_second']:>8,.0f} {row['p50_us'] / 1000:>7.2f} "
            f"{row['p99_us'] / 1000:>7.2f} {row['cpu_us_per_request']:>10.1f} "
            f"{row['requests_per_second_vs_bearer']:>15.2f} {row['cpu_vs_bearer']:>13.2f} "
            f"{row['extra_cpu_us_per_request']:>11.1f} {row['proxy_cpu_percent']:>8.0f}% "
            f"{row['core_busy_percent']:>7.0f}%"
        )
    lines += [
        "  (+CPU: CPU per request above bearer's in the same round; proxy CPU: share of one "
        "core the proxy used;",
        "   its core: how busy the proxy's core was, all processes together; well above "
        "proxy CPU, other processes shared the core, and req/s then follows the proxy's "
        "share of it more than its CPU per request)",
    ]
    for name, floor in TARGETS.items():
        ratio = rows[name]["requests_per_second_vs_bearer"]
        verdict = "met" if ratio >= floor else "NOT met"
        lines.append(f"  target {name}: req/s >= {floor:.2f}x bearer's: {ratio:.2f}x, {verdict}")

    lines += [
        "",
        f"DPoP proofs in process (no network, pinned like the proxy): µs per call, median "
        f"(min) of {MICRO_REPEATS} repeats",
        f"  {'alg':<6} {'proof()':>15} {'request_proof()':>17} {'DpopKey.sign':>15} "
        f"{'proof size':>11}",
    ]
    for alg in MICRO_ALGORITHMS:
        proof, request_proof, sign = micro.proof[alg], micro.request_proof[alg], micro.sign[alg]
        lines.append(
            f"  {alg:<6} {proof.median_us:>7.1f} ({proof.min_us:>5.1f}) "
            f"{request_proof.median_us:>9.1f} ({request_proof.min_us:>5.1f}) "
            f"{sign.median_us:>7.1f} ({sign.min_us:>5.1f}) {micro.proof_bytes[alg]:>9,} B"
        )
    lines.append(
        "  (request_proof(): what the request path calls: htu from the target, then proof())"
    )

    parts = micro.breakdown
    total = parts["proof"].min_us

    def part(label: str, key: str, indent: int) -> str:
        value = parts[key].min_us
        return (
            f"  {' ' * indent}{label:<{58 - indent}} {value:>6.1f} µs {100 * value / total:>4.0f}%"
        )

    lines += [
        "",
        "where an ES256 proof's time goes (µs per call, best of the repeats: the least "
        "disturbed by other work; % of proof())",
        part("proof(), with ath", "proof", 0),
        part("DpopKey.sign: the signature", "sign", 2),
        part("ECDSA P-256 with SHA-256 in OpenSSL (cryptography, DER)", "ecdsa_openssl", 4),
        part("DER to R || S (decode_dss_signature, int.to_bytes)", "der_to_raw", 4),
        part("everything else: jti, iat, claims JSON, base64url", "proof_without_signature", 2),
        part("of which the jti (os.urandom(16), base64url)", "jti", 4),
        part("request_proof(): proof() and the htu (target_uri)", "request_proof", 0),
    ]
    bearer = micro.inject["Bearer"]
    lines += [
        "",
        "what DPoP adds per request: CPU above bearer's under load (paired, median), and "
        "Injector.inject's time above bearer's in process (median, min)",
        f"  {'upstream':<13} {'under load':>10} {'in process':>11} {'(min)':>7}",
    ]
    for name in TARGETS:
        signed_with = dict(UPSTREAMS)[name]
        assert signed_with is not None
        inject = micro.inject[signed_with]
        added, least = inject.median_us - bearer.median_us, inject.min_us - bearer.min_us
        lines.append(
            f"  {name:<13} {rows[name]['extra_cpu_us_per_request']:>7.1f} µs "
            f"{added:>8.1f} µs ({least:>4.1f})"
        )
    lines.append(
        f"  (inject() with a bearer token takes {bearer.median_us:.2f} µs; with a DPoP token "
        "it also makes the proof: request_proof())"
    )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    cores = Cores.for_machine()
    with bounded_run("bench.dpop") as bench_run:
        group, workdir = bench_run.group, bench_run.workdir
        background = background_busy_percent()
        _progress("timing proofs in process")
        with pinned(cores.under_test):
            micro = micro_measures(free_port())
        for alg, timing in micro.proof.items():
            _progress(f"{alg:<6} proof() {timing.median_us:7.1f} µs (median)")
        stack = DpopStack(group, workdir, cores)
        _progress(f"starting servers in {workdir}")
        targets = stack.start()

        def load(target: Target, duration: float) -> LoadSample:
            return measure.load(
                target,
                connections=args.connections,
                duration=duration,
                workdir=workdir,
                cores=cores,
            )

        for target in targets:
            load(target, WARM_UP_SECONDS)
        loads: dict[str, list[LoadSample]] = {}
        for round_number in range(1, args.rounds + 1):
            for target in targets:
                sample = load(target, args.duration)
                loads.setdefault(target.name, []).append(sample)
                _progress(
                    f"round {round_number}/{args.rounds} {target.name:<13} "
                    f"{sample.requests_per_second:>9,.0f} req/s  "
                    f"{_cpu(sample):.1f} µs CPU/req"
                )
        # Still the same kinds of token after the loads.
        stack.check_token_types()
        machine = {
            **machine_info(),
            "cryptography": importlib.metadata.version("cryptography"),
            "openssl": openssl_version(),
        }
        rows = summary(loads, cores)
        print(format_report(machine, args, cores, background, rows, micro), flush=True)
        if args.json is not None:
            payload = {
                "machine": machine,
                "settings": {
                    "rounds": args.rounds,
                    "duration": args.duration,
                    "connections": args.connections,
                    "pinning": cores.describe(),
                    "background_busy_percent": background,
                    "command": " ".join(["python -m bench.dpop", *sys.argv[1:]]),
                },
                "summary": rows,
                "targets": TARGETS,
                "loads": {name: [s.as_dict() for s in runs] for name, runs in loads.items()},
                "micro": micro.as_dict(),
            }
            args.json.write_text(json.dumps(payload, indent=2))
            _progress(f"results written to {args.json}")
        return 0
    return bench_run.code


def openssl_version() -> str:
    from cryptography.hazmat.backends.openssl import backend

    return str(backend.openssl_version_text())


def _progress(message: str) -> None:
    progress("bench.dpop", message)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench.dpop",
        description="token-proxy with DPoP proofs (ES256, EdDSA) against bearer, on loopback.",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per load")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--json", type=Path, metavar="FILE", help="write all results here")
    args = parser.parse_args(argv)
    if not 1 <= args.duration <= 300 or not 1 <= args.rounds <= 50:
        parser.error("--duration must be 1..300 s and --rounds 1..50")
    if not 1 <= args.connections <= 1024:
        parser.error("--connections must be 1..1024")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    stop_on_signals()
    ensure_commands()
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
