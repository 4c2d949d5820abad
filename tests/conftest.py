"""Fixtures shared by the test modules: a real S3 server and the orchestrator over HTTP (tests/harness.py)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from common.s3server import EmbeddedS3
from common.storage import ObjectStore

if TYPE_CHECKING:
    from tests.harness import Keys, Net

# The harness's asserts (a refused registration, a wrong error code) explain themselves as a test's do. It is
# imported by the fixtures that use it, so that modules without an orchestrator do not load one.
pytest.register_assert_rewrite("tests.harness")


@pytest.fixture(scope="module")
def s3() -> Iterator[EmbeddedS3]:
    """moto's S3 server on a free loopback port, one per test module."""
    with EmbeddedS3(port=0) as server:
        yield server


@pytest.fixture(scope="module")
def store(s3: EmbeddedS3, request: pytest.FixtureRequest) -> ObjectStore:
    """A bucket named after the test module (`test_export` -> `test-export`) on that server."""
    bucket = request.module.__name__.rsplit(".", 1)[-1].replace("_", "-")
    store = ObjectStore.from_settings(s3.settings(bucket=bucket))
    store.ensure_bucket()
    return store


# ---------------------------------------------------------------------------------------------------------
# The orchestrator over HTTP: one chain per module, a fresh orchestrator per test


@pytest.fixture(scope="module")
def keys() -> Keys:
    """Hotkeys the module's chain registers, and one it never heard of."""
    from tests.harness import new_keys

    return new_keys()


@pytest.fixture(scope="module")
def chain_path(tmp_path_factory: pytest.TempPathFactory, keys: Keys) -> Path:
    from tests.harness import new_chain

    return new_chain(tmp_path_factory.mktemp("chain") / "chain.json", keys)


@pytest.fixture
def start(s3: EmbeddedS3, chain_path: Path, keys: Keys, tmp_path: Path) -> Iterator[Callable[..., Net]]:
    """Start an orchestrator with the given OrchestratorSettings overrides; stopped after the test."""
    from tests.harness import start_orchestrator

    with ExitStack() as stack:

        def _start(**overrides: Any) -> Net:
            return start_orchestrator(stack, s3, chain_path, keys, tmp_path, **overrides)

        yield _start


@pytest.fixture
def net(start: Callable[..., Net]) -> Net:
    return start()
