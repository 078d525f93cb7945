"""Shared by every tier: each test starts with structlog unconfigured.

`cli.main` configures structlog once per process onto the sys.stdout of that moment; under pytest that is
a capture buffer that is closed after the test, so a later test that logs would write to a closed file.
"""
import pytest
import structlog

from sglang_fleet import logs


@pytest.fixture(autouse=True)
def _fresh_structlog():
    yield
    structlog.reset_defaults()
    logs._configured = False
