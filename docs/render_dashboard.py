"""Render docs/img/dashboard.png: the Grafana dashboard's main panels, drawn from real metrics.

Run from the repository root (needs matplotlib: ``.venv/bin/pip install matplotlib``):

    .venv/bin/python -m docs.render_dashboard [--output docs/img/dashboard.png]

It takes under 2 minutes and touches nothing outside a temporary directory and the PNG.
What it does:

1. starts a real token endpoint for each of two upstreams (``inventory`` with 20 s tokens,
   ``billing`` with 45 s tokens, so their refresh saw-tooth shows in minutes), a real
   upstream API, token-proxy as a child process (``python -m proxy run``), and a real
   Prometheus server (Debian's ``prometheus`` binary, as in tests/ops/test_prometheus_e2e.py)
   scraping the proxy's admin port every second as job ``token-proxy``;
2. sends steady traffic through the proxy (inventory, billing, and pass-through traffic
   for an unconfigured host, with an occasional 404 from the upstream);
3. breaks inventory's token endpoint: it answers ``503`` for a while, then hangs (so the
   fetches time out), then recovers. Its cached token runs out during the outage, so the
   proxy answers ``503 token_unavailable`` until a fetch succeeds again;
4. reads the dashboard's queries back from Prometheus' range API (``/api/v1/query_range``,
   1 s step) and draws them with matplotlib in the Grafana layout, the outage shaded.

The queries are those of deploy/grafana/token-proxy-dashboard.json without the
namespace/upstream variables and with fixed windows (``[10s]`` for rates, ``[30s]`` for
latency quantiles) in place of ``$__rate_interval``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import io
import random
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

try:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt
    from matplotlib.axes import Axes
    from matplotlib.patches import Rectangle
    from PIL import Image
except ImportError:  # pragma: no cover - a docs tool, not a dependency of the proxy
    sys.exit("render_dashboard needs matplotlib: .venv/bin/pip install matplotlib")

from tests.support.process import ProxyProcess
from tests.support.prometheus import PrometheusServer
from tests.support.token_server import TokenServer
from tests.support.upstream import Upstream

REPO = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO / "docs" / "img" / "dashboard.png"
CLIENT_ID = "order-service"
CLIENT_SECRET = "render-dashboard-secret"
JOB = "token-proxy"

# The scenario, in seconds. Inventory's 20 s tokens are refreshed 4 s before expiry (the
# default margin is a fifth of the lifetime), so one runs out during the outage. The
# picture starts WARM_UP after the traffic, once the rate windows are full.
WARM_UP = 10.0
STEADY = 25.0
OUTAGE_503 = 25.0
OUTAGE_HANG = 10.0
RECOVERY = 25.0
# Requests per second sent through the proxy.
TRAFFIC = {"inventory": 8.0, "billing": 4.0, "unmatched": 2.0}

RATE = "10s"
QUANTILE = "15s"

# Grafana's classic palette, so the picture reads like the real dashboard: one colour
# per upstream, and the colours of trouble for failures, whatever the upstream.
UPSTREAM_COLOURS = {"inventory": "#5794F2", "billing": "#73BF69", "unmatched": "#B877D9"}
OTHER_COLOUR = "#8AB8FF"
RED, ORANGE, YELLOW = "#F2495C", "#FF9830", "#FADE2A"
TROUBLE_COLOURS = {
    "failure": RED,
    "http_5xx": RED,
    "503": RED,
    "timeout": ORANGE,
    "connect": ORANGE,
    "502": ORANGE,
    "504": ORANGE,
    "404": YELLOW,
}
BACKGROUND = "#181B1F"
PAGE = "#111217"
TEXT = "#CCCCDC"
GRID = "#2C3235"


@dataclass(frozen=True)
class Panel:
    """One dashboard panel: its title, unit, and (PromQL, legend template) targets."""

    title: str
    unit: str
    targets: tuple[tuple[str, str], ...]
    columns: int = 1


PANELS = (
    Panel(
        "Token lifetime remaining",
        "s",
        (("token_proxy_token_expires_in_seconds", "{upstream}"),),
        columns=2,
    ),
    Panel(
        "Token fetches by outcome",
        "fetches/s",
        (
            (
                f"sum by (upstream, outcome) (rate(token_proxy_token_fetches_total[{RATE}]))",
                "{upstream} {outcome}",
            ),
        ),
    ),
    Panel(
        "Token fetch failures by reason",
        f"failures per {RATE}",
        (
            (
                "sum by (upstream, reason) "
                f"(increase(token_proxy_token_fetch_failures_total[{RATE}])) > 0",
                "{upstream} {reason}",
            ),
        ),
    ),
    Panel(
        "Token fetch latency",
        "s",
        tuple(
            (
                f"histogram_quantile({quantile}, sum by (upstream, le) "
                f"(rate(token_proxy_token_fetch_duration_seconds_bucket[{QUANTILE}])))",
                "{upstream} " + name,
            )
            for quantile, name in ((0.5, "p50"), (0.99, "p99"))
        ),
    ),
    Panel(
        "503 token_unavailable",
        f"requests per {RATE}",
        (
            (
                f"sum by (upstream) (increase(token_proxy_token_unavailable_total[{RATE}]))",
                "{upstream}",
            ),
        ),
    ),
    Panel(
        "Requests by upstream",
        "req/s",
        ((f"sum by (upstream) (rate(token_proxy_requests_total[{RATE}]))", "{upstream}"),),
    ),
    Panel(
        "Responses by status code",
        "req/s",
        (
            (
                f"sum by (upstream, code) (rate(token_proxy_requests_total[{RATE}]))",
                "{upstream} {code}",
            ),
        ),
    ),
    Panel(
        "Request latency",
        "s",
        tuple(
            (
                f"histogram_quantile({quantile}, sum by (upstream, le) "
                f"(rate(token_proxy_request_duration_seconds_bucket[{QUANTILE}])))",
                "{upstream} " + name,
            )
            for quantile, name in ((0.5, "p50"), (0.99, "p99"))
        ),
    ),
)


@dataclass(frozen=True)
class Series:
    """One line of a panel: its legend and its (unix time, value) points."""

    legend: str
    times: list[float]
    values: list[float]


@dataclass(frozen=True)
class Phase:
    """A stretch of the scenario that the picture shades."""

    label: str
    start: float
    end: float
    colour: str


def upstream_entry(host: str, url: str, token_server: TokenServer) -> dict[str, Any]:
    return {
        "match": {"hosts": [host]},
        "url": url,
        "token": {
            "token_url": token_server.url,
            "client_id": CLIENT_ID,
            "client_secret": CLIENT_SECRET,
            "timeout": "2s",
            "retry_initial": "500ms",
            "retry_max": "4s",
        },
    }


async def poll(check: Callable[[], Awaitable[bool]], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.2)


class Traffic:
    """Sends requests through the proxy at fixed rates until stopped; never waits on one."""

    def __init__(self, proxy: ProxyProcess, upstream: Upstream) -> None:
        self._proxy = proxy
        self._targets = {
            "inventory": "http://inventory.internal/api/stock/{n}",
            "billing": "http://billing.internal/api/invoices/{n}",
            # A host no upstream matches: passed through to the same upstream server.
            "unmatched": f"http://127.0.0.1:{upstream.port}/health/{{n}}",
        }
        self._in_flight: set[asyncio.Task[None]] = set()
        self._random = random.Random(4)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=15)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            senders = [
                asyncio.create_task(self._send_at(session, name, rate))
                for name, rate in TRAFFIC.items()
            ]
            try:
                yield
            finally:
                for sender in senders:
                    sender.cancel()
                await asyncio.gather(*senders, return_exceptions=True)
                await asyncio.gather(*self._in_flight, return_exceptions=True)

    async def _send_at(self, session: aiohttp.ClientSession, name: str, rate: float) -> None:
        number = 0
        next_at = time.monotonic()
        while True:
            number += 1
            url = self._targets[name].format(n=number)
            if name == "inventory" and self._random.random() < 0.05:
                url = "http://inventory.internal/status/404"
            task = asyncio.create_task(self._one(session, url))
            self._in_flight.add(task)
            task.add_done_callback(self._in_flight.discard)
            next_at += 1.0 / rate
            await asyncio.sleep(max(0.0, next_at - time.monotonic()))

    async def _one(self, session: aiohttp.ClientSession, url: str) -> None:
        with contextlib.suppress(aiohttp.ClientError, TimeoutError):
            async with session.get(url, proxy=self._proxy.url) as response:
                await response.read()


async def run_scenario(workdir: Path) -> tuple[list[list[Series]], list[Phase], float, float]:
    """Run everything, and return each panel's series, the outage phases and the range."""
    clients = {CLIENT_ID: CLIENT_SECRET}
    async with (
        TokenServer(clients=clients, expires_in=20) as inventory_tokens,
        TokenServer(clients=clients, expires_in=45) as billing_tokens,
        Upstream() as upstream,
    ):
        proxy_dir = workdir / "proxy"
        proxy_dir.mkdir()
        proxy = ProxyProcess(
            proxy_dir,
            {
                "upstreams": {
                    "inventory": upstream_entry(
                        "inventory.internal", upstream.url, inventory_tokens
                    ),
                    "billing": upstream_entry("billing.internal", upstream.url, billing_tokens),
                }
            },
        )
        await proxy.start()
        try:
            async with aiohttp.ClientSession() as admin:

                async def ready() -> bool:
                    readyz = f"http://127.0.0.1:{proxy.admin_port}/readyz"
                    async with admin.get(readyz) as response:
                        return response.status == 200

                await poll(ready, 20, "proxy ready")
            prometheus_dir = workdir / "prometheus"
            prometheus_dir.mkdir()
            async with PrometheusServer(
                prometheus_dir, {JOB: [f"127.0.0.1:{proxy.admin_port}"]}
            ) as prometheus:

                async def scraped() -> bool:
                    return bool(await prometheus.query(f'up{{job="{JOB}"}} == 1'))

                await poll(scraped, 30, "first scrape")
                phases, start, end = await drive(proxy, upstream, inventory_tokens)

                async def scraped_after_end() -> bool:
                    stamps = await prometheus.query(f'timestamp(up{{job="{JOB}"}})')
                    return bool(stamps) and float(stamps[0]["value"][1]) >= end

                await poll(scraped_after_end, 15, "a scrape after the scenario")
                panels = [await panel_series(prometheus, panel, start, end) for panel in PANELS]
        finally:
            await proxy.stop()
    return panels, phases, start, end


async def drive(
    proxy: ProxyProcess, upstream: Upstream, inventory_tokens: TokenServer
) -> tuple[list[Phase], float, float]:
    async with Traffic(proxy, upstream).running():
        print(f"steady traffic for {WARM_UP + STEADY:.0f} s", flush=True)
        await asyncio.sleep(WARM_UP)
        start = time.time()
        await asyncio.sleep(STEADY)
        outage_start = time.time()
        print(f"inventory's token endpoint answers 503 for {OUTAGE_503:.0f} s", flush=True)
        inventory_tokens.set_failing("503")
        await asyncio.sleep(OUTAGE_503)
        hang_start = time.time()
        print(f"inventory's token endpoint hangs for {OUTAGE_HANG:.0f} s", flush=True)
        inventory_tokens.set_failing("hang")
        await asyncio.sleep(OUTAGE_HANG)
        recovered = time.time()
        print(f"recovered; steady traffic for {RECOVERY:.0f} s", flush=True)
        inventory_tokens.set_failing(None)
        await asyncio.sleep(RECOVERY)
    end = time.time()
    phases = [
        Phase("inventory token endpoint: 503", outage_start, hang_start, "#F2495C"),
        Phase("inventory token endpoint: hangs", hang_start, recovered, "#FF9830"),
    ]
    return phases, start, end


async def panel_series(
    prometheus: PrometheusServer, panel: Panel, start: float, end: float
) -> list[Series]:
    series = []
    for expr, legend in panel.targets:
        for result in await prometheus.query_range(expr, start, end, 1.0):
            points = [(float(t), float(v)) for t, v in result["values"]]
            series.append(
                Series(
                    legend.format_map(_Labels(result["metric"])),
                    [t for t, _ in points],
                    [v for _, v in points],
                )
            )
    return sorted(series, key=lambda s: s.legend)


class _Labels(dict[str, str]):
    def __missing__(self, key: str) -> str:
        return ""


def line_style(legend: str) -> tuple[str, str]:
    """Colour and dash of a line whose legend is "<upstream> [<outcome|reason|code|pNN>]"."""
    upstream, _, variant = legend.partition(" ")
    colour = TROUBLE_COLOURS.get(variant) or UPSTREAM_COLOURS.get(upstream, OTHER_COLOUR)
    return colour, "--" if variant == "p99" else "-"


def drawn(series: list[Series]) -> list[Series]:
    """Leave out lines that stay at 0 and would hide a line of the same colour and dash."""
    styles = [line_style(line.legend) for line in series]
    return [
        line
        for line, style in zip(series, styles, strict=True)
        if any(line.values) or styles.count(style) == 1
    ]


def draw(
    panels: list[list[Series]], phases: list[Phase], start: float, end: float, output: Path
) -> None:
    plt.rcParams.update(
        {
            "font.size": 11,
            "text.color": TEXT,
            "axes.labelcolor": TEXT,
            "xtick.color": TEXT,
            "ytick.color": TEXT,
            "axes.edgecolor": GRID,
        }
    )
    figure = plt.figure(figsize=(18, 12.5), dpi=100, facecolor=PAGE)
    grid = figure.add_gridspec(3, 3, hspace=0.42, wspace=0.18, top=0.9, bottom=0.06)
    slots = [(0, slice(0, 2)), (0, slice(2, 3))]
    slots += [(row, slice(column, column + 1)) for row in (1, 2) for column in range(3)]
    local = datetime.datetime.now().astimezone().tzinfo
    for panel, series, (row, columns) in zip(PANELS, panels, slots, strict=True):
        axes = figure.add_subplot(grid[row, columns])
        draw_panel(axes, panel, series, phases, start, end, local)
    figure.suptitle(
        "token-proxy (deploy/grafana/token-proxy-dashboard.json), drawn from a real Prometheus",
        color=TEXT,
        fontsize=16,
        y=0.985,
    )
    shaded = [Rectangle((0, 0), 1, 1, facecolor=phase.colour, alpha=0.18) for phase in phases]
    figure.legend(
        shaded,
        [phase.label for phase in phases],
        loc="upper center",
        bbox_to_anchor=(0.5, 0.955),
        ncol=len(phases),
        frameon=False,
        fontsize=11,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    rendered = io.BytesIO()
    figure.savefig(rendered, format="png", facecolor=PAGE)
    plt.close(figure)
    # A few flat colours on a dark page: 256 of them lose nothing and keep the commit small.
    with Image.open(rendered) as image:
        image.convert("RGB").quantize(256).save(output, optimize=True)


def draw_panel(
    axes: Axes,
    panel: Panel,
    series: list[Series],
    phases: list[Phase],
    start: float,
    end: float,
    zone: datetime.tzinfo | None,
) -> None:
    def when(stamp: float) -> float:
        # matplotlib's date numbers: days since its epoch, by default the Unix epoch.
        return stamp / 86400.0

    axes.set_facecolor(BACKGROUND)
    axes.set_title(panel.title, loc="left", color=TEXT, fontsize=13, fontweight="bold")
    axes.set_ylabel(panel.unit)
    axes.grid(color=GRID, linewidth=0.8)
    for phase in phases:
        axes.axvspan(when(phase.start), when(phase.end), color=phase.colour, alpha=0.18, lw=0)
    for line in drawn(series):
        colour, dash = line_style(line.legend)
        axes.plot(
            [when(t) for t in line.times],
            line.values,
            label=line.legend,
            color=colour,
            linestyle=dash,
            linewidth=1.8,
        )
    if not series:
        axes.text(0.5, 0.5, "No data", transform=axes.transAxes, ha="center", color=TEXT)
    axes.set_xlim(when(start), when(end))
    axes.set_ylim(bottom=0)
    clock = mdates.DateFormatter("%H:%M:%S", tz=zone)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_formatter(clock)
    every = 15 if panel.columns > 1 else 30
    ticks = mdates.SecondLocator(bysecond=range(0, 60, every), tz=zone)  # type: ignore[no-untyped-call]
    axes.xaxis.set_major_locator(ticks)
    if series:
        axes.legend(
            loc="upper left",
            fontsize=9,
            facecolor=BACKGROUND,
            edgecolor=GRID,
            labelcolor=TEXT,
            framealpha=0.85,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    arguments = parser.parse_args()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="render-dashboard-") as workdir:
        panels, phases, start, end = asyncio.run(run_scenario(Path(workdir)))
    draw(panels, phases, start, end, arguments.output)
    print(f"wrote {arguments.output} in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
