"""Fixtures shared by the test modules that need a real S3 server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from common.s3server import EmbeddedS3
from common.storage import ObjectStore


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
