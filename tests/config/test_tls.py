"""Tests for `proxy.config.tls`: TLS files of upstreams and token endpoints, interception."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.documents import UP, Case, assert_problem

CASES = [
    Case(
        "client-key-without-cert",
        {f"{UP}.client_key_file": "FILES/client.key"},
        f"{UP}.client_cert_file",
        "missing (client_key_file needs it)",
    ),
    Case(
        "intercept-cert-without-key",
        {"tls_intercept": {"ca_cert_file": "FILES/ca.crt"}},
        "tls_intercept.ca_key_file",
        "missing (give both ca_cert_file and ca_key_file, or neither to generate a CA)",
    ),
    Case(
        "intercept-output-dir-missing",
        {"tls_intercept": {"write_ca_cert_to": "FILES/no-such-dir/ca.crt"}},
        "tls_intercept.write_ca_cert_to",
        "directory 'FILES/no-such-dir' does not exist",
    ),
    Case(
        "intercept-null",
        {"tls_intercept": None},
        "tls_intercept",
        "expected a mapping, got null (write tls_intercept: {} to intercept with a generated "
        "CA, or remove the key)",
    ),
]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_problem_names_file_key_path_and_problem(
    case: Case, tmp_path: Path, files: Path
) -> None:
    assert_problem(case, tmp_path, files)
