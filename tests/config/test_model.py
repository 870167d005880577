"""Tests for `proxy.config.model`: what the loaded config shows of its secrets."""

from __future__ import annotations

from pathlib import Path

from proxy.config import load_config
from tests.config.documents import DELETE, ENV, SECRET, TOKEN, edited, write


def test_secret_is_not_in_repr_or_str_of_the_config(tmp_path: Path, files: Path) -> None:
    document = edited(
        {f"{TOKEN}.client_secret_file": DELETE, f"{TOKEN}.client_secret": "${CLIENT_SECRET}"}
    )
    config = load_config(write(tmp_path, document, files), environ=ENV)
    token = config.upstreams[0].token
    assert token.client_secret is not None
    assert token.client_secret.reveal() == SECRET
    for text in (repr(config), str(config), repr(token), repr(token.client_secret)):
        assert SECRET not in text
