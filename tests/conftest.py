"""Shared pytest setup: `slow` tests (real downloaded assets) run only when asked for."""

import pytest


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "slow: uses real assets (e.g. the 93 MB SmolLM2 GGUF); run with -m slow"
    )


def pytest_collection_modifyitems(config, items):
    # A plain `pytest` stays fast and offline; `-m slow` (or any -m naming slow) opts in.
    if "slow" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
