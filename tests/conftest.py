"""Shared fixtures: the --fast toy world, built once per test session into a temporary folder."""

import pytest


@pytest.fixture(scope="session")
def fast_world(tmp_path_factory):
    """(path, build info) of a freshly built --fast toy world (about 40 s on 2 cores)."""
    import toy

    out = tmp_path_factory.mktemp("worlds") / "toy-fast"
    info = toy.build(out, toy.ToyConfig(**toy.FAST), log=lambda *a: None)
    return out, info
