"""Turning the samples of a run into the printed table, the JSON file and the plot.

Ratios to nginx are the median of per-round ratios: each round runs nginx and
token-proxy back to back, so a ratio compares two loads that saw the same machine
state, which is steadier on a shared machine than dividing two medians.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from bench.measure import LoadSample, TransferSample

BASELINE = "nginx"
# bench/bare_proxy.py: a Python proxy without features, the floor of such a data path.
REFERENCE = "bare"
MB = 1e6
MIB = 1024 * 1024
GIB = 1024 * MIB
NOISY_BACKGROUND_PERCENT = 10
_Sample = TypeVar("_Sample")


@dataclass
class TokenEconomy:
    """Token fetches per upstream over the run, and what lifetime and margin allow."""

    lifetime: float
    refresh_before_expiry: float
    jitter_fraction: float
    fetches: dict[str, list[float]]  # upstream -> wall-clock times of its fetches
    until: float  # wall-clock time the counts were taken

    def allowed(self, upstream: str) -> tuple[int, int]:
        """The fewest and most fetches a correct refresh schedule makes in this window."""
        times = self.fetches.get(upstream, [])
        if not times:
            return (1, 1)
        window = self.until - times[0]
        longest = self.lifetime - self.refresh_before_expiry
        shortest = self.lifetime - self.refresh_before_expiry * (1 + self.jitter_fraction)
        return (1 + math.floor(window / longest), 1 + math.floor(window / shortest))


@dataclass
class Results:
    """Everything one run measured, keyed by target name."""

    machine: dict[str, str]
    settings: dict[str, object]
    loads: dict[str, list[LoadSample]] = field(default_factory=dict)
    latency: dict[str, list[LoadSample]] = field(default_factory=dict)
    sweep: dict[str, dict[int, LoadSample]] = field(default_factory=dict)
    rss_idle: dict[str, int] = field(default_factory=dict)
    rss_after_load: dict[str, int] = field(default_factory=dict)
    rss_connections: dict[str, int] = field(default_factory=dict)
    transfers: dict[str, dict[str, list[TransferSample]]] = field(default_factory=dict)
    tokens: TokenEconomy | None = None
    requests_per_upstream: dict[str, int] = field(default_factory=dict)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else math.nan


def paired_ratio(
    samples: Sequence[_Sample], baseline: Sequence[_Sample], value: Callable[[_Sample], float]
) -> float:
    """Median over rounds of value(sample) / value(baseline sample of the same round)."""
    ratios = [value(s) / value(b) for s, b in zip(samples, baseline, strict=False) if value(b)]
    return median(ratios)


@dataclass(frozen=True)
class LoadRow:
    """A table line: medians over rounds of one target's loads."""

    name: str
    requests_per_second: float
    p50_us: float
    p99_us: float
    cpu_us_per_request: float
    ratio: float  # req/s relative to nginx's
    cpu_ratio: float  # CPU per request relative to nginx's
    process_cpu_percent: float
    load_core_busy: float


def load_rows(loads: dict[str, list[LoadSample]], load_core: int | None) -> list[LoadRow]:
    baseline = loads.get(BASELINE, [])
    rows = []
    for name, samples in loads.items():
        rows.append(
            LoadRow(
                name=name,
                requests_per_second=median([s.requests_per_second for s in samples]),
                p50_us=median([s.wrk.p50_us for s in samples]),
                p99_us=median([s.wrk.p99_us for s in samples]),
                cpu_us_per_request=median([_cpu(s) for s in samples]),
                ratio=paired_ratio(samples, baseline, lambda s: s.requests_per_second),
                cpu_ratio=paired_ratio(samples, baseline, _cpu),
                process_cpu_percent=median([s.process_cpu_percent or math.nan for s in samples]),
                load_core_busy=_core_busy(samples, load_core),
            )
        )
    return rows


def cpu_vs_reference(loads: dict[str, list[LoadSample]]) -> dict[str, float]:
    """Per token-proxy target: CPU per request relative to the bare reference's (paired)."""
    reference = loads.get(REFERENCE)
    if not reference:
        return {}
    return {
        name: paired_ratio(samples, reference, _cpu)
        for name, samples in loads.items()
        if name not in (BASELINE, REFERENCE)
    }


def _cpu(sample: LoadSample) -> float:
    return math.nan if sample.cpu_us_per_request is None else sample.cpu_us_per_request


def _core_busy(samples: Sequence[LoadSample], core: int | None) -> float:
    if core is None:
        return math.nan
    return median([s.core_busy.get(core, math.nan) for s in samples])


def _ms(microseconds: float) -> str:
    return f"{microseconds / 1000:.2f}"


def _mb(size: float) -> str:
    return f"{size / MIB:.1f} MiB"


def format_report(results: Results, load_core: int | None) -> str:
    settings = results.settings
    machine = results.machine
    lines = [
        f"token-proxy benchmark: {machine['nproc']} cores ({machine['cpu']}), "
        f"Python {machine['python']}, uvloop {machine['uvloop']}, "
        f"httptools {machine['httptools']}, {machine['nginx']}, {machine['wrk']}",
        f"token-proxy {machine['commit']}, data path: {machine.get('data_path', '?')}",
        f"pinning: {settings['pinning']}",
        *_background_lines(settings),
        "",
        f"keep-alive GET, 1 KiB responses, {settings['connections']} connections, "
        f"{settings['rounds']} interleaved rounds of {settings['duration']} s; medians",
        f"  {'scenario':<12} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'CPU µs/req':>10} "
        f"{'req/s vs nginx':>14} {'CPU vs nginx':>12} {'proxy CPU':>9} {'load core':>9}",
    ]
    for row in load_rows(results.loads, load_core):
        lines.append(
            f"  {row.name:<12} {row.requests_per_second:>9,.0f} {_ms(row.p50_us):>7} "
            f"{_ms(row.p99_us):>7} {row.cpu_us_per_request:>10.1f} {row.ratio:>14.2f} "
            f"{row.cpu_ratio:>12.2f} {row.process_cpu_percent:>8.0f}% {row.load_core_busy:>8.0f}%"
        )
    lines.append(
        "  (proxy CPU: share of one core the proxy process used; load core: how busy the "
        "core of wrk and the origin was)"
    )
    against_bare = cpu_vs_reference(results.loads)
    if against_bare:
        ratios = ", ".join(f"{name} {ratio:.2f}x" for name, ratio in against_bare.items())
        lines.append(
            f"  CPU per request vs {REFERENCE} (a Python proxy without features, "
            f"bench/bare_proxy.py): {ratios}"
        )
    lines += ["", *_latency_lines(results), "", *_memory_lines(results)]
    lines += ["", *_transfer_lines(results), "", *_token_lines(results)]
    return "\n".join(lines)


def _background_lines(settings: dict[str, object]) -> list[str]:
    busy = settings["background_busy_percent"]
    assert isinstance(busy, int | float)
    line = f"other load on the machine just before the run: {busy:.0f}% of all cores"
    if busy > NOISY_BACKGROUND_PERCENT:
        line += " - NOISY: compare the ratios, not the absolute numbers; rerun when idle"
    return [line]


def added_latency(results: Results) -> dict[str, dict[str, float]]:
    """Per target at one connection: median p50, and p50 added over the direct call."""
    direct = results.latency.get("direct", [])
    summary = {}
    for name, samples in results.latency.items():
        p50 = median([s.wrk.p50_us for s in samples])
        added = paired_ratio_difference(samples, direct)
        summary[name] = {"p50_us": p50, "added_us": added}
    return summary


def paired_ratio_difference(samples: Sequence[LoadSample], direct: Sequence[LoadSample]) -> float:
    """Median over rounds of p50(sample) - p50(direct call of the same round)."""
    return median([s.wrk.p50_us - d.wrk.p50_us for s, d in zip(samples, direct, strict=False)])


def _latency_lines(results: Results) -> list[str]:
    summary = added_latency(results)
    if not summary:
        return []
    nginx_added = summary.get(BASELINE, {}).get("added_us", math.nan)
    lines = ["latency at 1 connection (median p50; added = p50 minus the direct call's)"]
    for name, values in summary.items():
        text = f"  {name:<12} p50 {values['p50_us']:>6.0f} µs"
        if name != "direct":
            text += f"   added {values['added_us']:>5.0f} µs"
            if name != BASELINE and nginx_added > 0:
                text += f"   ({values['added_us'] / nginx_added:.2f}x what nginx adds)"
        lines.append(text)
    return lines


def _memory_lines(results: Results) -> list[str]:
    if not results.rss_idle:
        return []
    count = results.settings.get("idle_connections")
    lines = [
        "memory (RSS)",
        f"  {'':<14} {'idle at start':>13} {'idle after load':>15} "
        f"{f'with {count} idle keep-alive connections':>38}",
    ]
    for name, idle in results.rss_idle.items():
        after = results.rss_after_load.get(name)
        held = results.rss_connections.get(name)
        lines.append(
            f"  {name:<14} {_mb(idle):>13} {'-' if after is None else _mb(after):>15} "
            f"{'-' if held is None else _mb(held):>38}"
        )
    return lines


def transfer_summary(results: Results) -> dict[str, dict[str, dict[str, float]]]:
    """Per target and direction: median MB/s, paired ratio to nginx, peak RSS."""
    baseline = results.transfers.get(BASELINE, {})
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for name, directions in results.transfers.items():
        summary[name] = {}
        for direction, samples in directions.items():
            peaks = [s.peak_rss for s in samples if s.peak_rss is not None]
            summary[name][direction] = {
                "mb_per_s": median([s.bytes_per_second / MB for s in samples]),
                "ratio": paired_ratio(
                    samples,
                    baseline.get(direction, []),
                    lambda s: s.bytes_per_second,
                ),
                "peak_rss": float(max(peaks)) if peaks else math.nan,
                "cpu_s_per_gib": median([_cpu_per_gib(s) for s in samples]),
            }
    return summary


def _cpu_per_gib(sample: TransferSample) -> float:
    if sample.cpu_seconds is None:
        return math.nan
    return sample.cpu_seconds * GIB / sample.size


def _transfer_lines(results: Results) -> list[str]:
    if not results.transfers:
        return []
    size = results.settings["big_size"]
    assert isinstance(size, int)
    lines = [
        f"large bodies ({_mb(size)} with curl; MB/s = 10^6 bytes/s; CPU seconds per GiB and "
        "peak RSS of the proxy process)",
    ]
    for direction in ("download", "upload"):
        lines.append(
            f"  {direction:<12} {'MB/s':>7} {'vs nginx':>8} {'CPU s/GiB':>9} {'peak RSS':>10}"
        )
        for name, directions in transfer_summary(results).items():
            values = directions.get(direction)
            if values is None:
                continue
            peak = "-" if math.isnan(values["peak_rss"]) else _mb(values["peak_rss"])
            cpu = "-" if math.isnan(values["cpu_s_per_gib"]) else f"{values['cpu_s_per_gib']:.2f}"
            lines.append(
                f"    {name:<10} {values['mb_per_s']:>7.0f} {values['ratio']:>8.2f} "
                f"{cpu:>9} {peak:>10}"
            )
    return lines


def _token_lines(results: Results) -> list[str]:
    tokens = results.tokens
    if tokens is None:
        return []
    lines = [
        f"token requests at the token endpoint (lifetime {tokens.lifetime:.0f} s, "
        f"refreshed {tokens.refresh_before_expiry:.0f} s before expiry)"
    ]
    for upstream in sorted(tokens.fetches):
        times = tokens.fetches[upstream]
        low, high = tokens.allowed(upstream)
        expected = f"{low}" if low == high else f"{low}-{high}"
        verdict = "ok" if low <= len(times) <= high else "UNEXPECTED"
        served = results.requests_per_upstream.get(upstream)
        load = "" if served is None else f", {served:,} requests served"
        fetches = "1 fetch" if len(times) == 1 else f"{len(times)} fetches"
        lines.append(
            f"  {upstream:<14} {fetches} over {tokens.until - times[0]:.0f} s "
            f"(minimum the schedule allows: {expected}) {verdict}{load}"
        )
    return lines


def to_json(results: Results, load_core: int | None) -> dict[str, object]:
    return {
        "machine": results.machine,
        "settings": results.settings,
        "summary": {
            "loads": [row.__dict__ for row in load_rows(results.loads, load_core)],
            "cpu_vs_reference": cpu_vs_reference(results.loads),
            "latency_1_connection": added_latency(results),
            "transfers": transfer_summary(results),
            "rss_idle": results.rss_idle,
            "rss_after_load": results.rss_after_load,
            "rss_connections": results.rss_connections,
            "token_fetches": None
            if results.tokens is None
            else {
                name: {"fetches": len(times), "allowed": results.tokens.allowed(name)}
                for name, times in results.tokens.fetches.items()
            },
        },
        "samples": {
            "loads": {k: [s.as_dict() for s in v] for k, v in results.loads.items()},
            "latency": {k: [s.as_dict() for s in v] for k, v in results.latency.items()},
            "sweep": {
                k: {str(c): s.as_dict() for c, s in v.items()} for k, v in results.sweep.items()
            },
            "transfers": {
                k: {d: [s.as_dict() for s in v] for d, v in dirs.items()}
                for k, dirs in results.transfers.items()
            },
        },
    }


def plot(sweep: dict[str, dict[int, LoadSample]], path: Path, title: str) -> None:
    """Throughput and p50 latency against connection count, one line per target."""
    import matplotlib  # type: ignore[import-not-found, unused-ignore]

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # type: ignore[import-not-found, unused-ignore]

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, by_connections in sweep.items():
        counts = sorted(by_connections)
        left.plot(
            counts,
            [by_connections[c].requests_per_second for c in counts],
            marker="o",
            label=name,
        )
        right.plot(
            counts, [by_connections[c].wrk.p50_us / 1000 for c in counts], marker="o", label=name
        )
    counts = sorted({c for by_connections in sweep.values() for c in by_connections})
    for axes in (left, right):
        axes.set_xscale("log", base=2)
        axes.set_xticks(counts, [str(c) for c in counts])
        axes.set_xlabel("client connections (keep-alive)")
        axes.grid(True, alpha=0.3)
        axes.legend()
    left.set_ylabel("requests per second")
    left.set_ylim(bottom=0)
    right.set_ylabel("median latency (ms)")
    right.set_yscale("log")
    left.set_title("throughput")
    right.set_title("p50 latency")
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
