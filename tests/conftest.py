"""Fixtures shared by the test modules (plain helpers are in tests/helpers.py)."""
from __future__ import annotations

import pytest

from tests.helpers import TINY, compose_cfg


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A collected tiny dataset; returns the overrides that point every script at it."""
    from collect import collect

    root = tmp_path_factory.mktemp("data")
    overrides = TINY + [f"data_root={root / 'datasets'}"]
    collect(compose_cfg("collect", overrides))
    return overrides
