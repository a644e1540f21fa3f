"""Fixtures of the interop tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def diffusers():
    return pytest.importorskip("diffusers")
