"""Fixtures of the client matrix: the lab (servers and proxy) and one runner per client.

Both live for the whole session. A client that this machine cannot have (see
tests/support/clients.py) makes each of its tests skip with the reason, which `-ra`
prints. Every matrix test's outcome is recorded for tests/clients/matrix.py.
"""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from pathlib import Path

import pytest

from tests.clients import matrix
from tests.clients.lab import Lab
from tests.clients.runners import Runner, start
from tests.support.clients import ToolUnavailable


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    lab = Lab(tmp_path_factory.mktemp("client-lab"))
    lab.start()
    try:
        yield lab
    finally:
        lab.stop()


@pytest.fixture(scope="session")
def runners(
    lab: Lab, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[[str], Runner]]:
    started: dict[str, Runner] = {}
    unavailable: dict[str, str] = {}
    directory = tmp_path_factory.mktemp("client-programs")

    def runner(client: str) -> Runner:
        if client in unavailable:
            pytest.skip(unavailable[client])
        if client not in started:
            try:
                started[client] = start(client, lab, directory)
            except ToolUnavailable as exc:
                unavailable[client] = f"{client} is not available here: {exc}"
                pytest.skip(unavailable[client])
        return started[client]

    yield runner
    for each in started.values():
        each.close()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    report = yield
    callspec = getattr(item, "callspec", None)
    if callspec is None or item.path.name != "test_matrix.py":
        return report
    client, scenario = callspec.params.get("client"), callspec.params.get("scenario")
    if not isinstance(client, str) or not isinstance(scenario, str):
        return report
    if report.when == "call" or report.outcome != "passed":
        if hasattr(report, "wasxfail"):
            outcome = matrix.DEFECT if report.skipped else matrix.FAIL
        else:
            outcome = {"passed": matrix.PASS, "skipped": matrix.SKIPPED}.get(
                report.outcome, matrix.FAIL
            )
        matrix.record(client, scenario, outcome)
    return report


def pytest_sessionfinish(session: pytest.Session) -> None:
    if matrix.OUTCOMES:
        matrix.save_run(Path(session.config.rootpath))
