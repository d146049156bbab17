"""Shared pytest set-up.

Test helpers (netns, fakes, harnesses) are plain modules beside the tests;
these paths let every test directory import them. mypy sees the same paths
(mypy_path in pyproject.toml).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
for _folder in (_HERE, _HERE / "logscan", _HERE / "modsecurity", _HERE / "reputation"):
    sys.path.insert(0, str(_folder))

from daemon_harness import ensure_test_users, remove_test_users  # noqa: E402
from logscan_helpers import FakeClient, FakeDaemon  # noqa: E402 - needs the path above


@pytest.fixture
def anyio_backend() -> str:
    """`pytest.mark.anyio` tests run on asyncio only, as the daemon does (uvicorn's conftest)."""
    return "asyncio"


@pytest.fixture
def fake_client() -> FakeClient:
    """A stand-in for imr.client.Client that records block requests (log-scanner tests)."""
    return FakeClient()


@pytest.fixture
def fake_daemon(tmp_path: Path) -> Iterator[FakeDaemon]:
    """An asyncio Unix-socket server speaking the JSON protocol, recording requests."""
    daemon = FakeDaemon(tmp_path / "imr.sock").start()
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="module")
def test_users() -> Iterator[None]:
    """The real unprivileged test users (daemon_harness), made for a module and removed after."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create users")
    created = ensure_test_users()
    yield
    remove_test_users(created)
