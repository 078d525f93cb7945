"""retry.py: the backoff every loop waits with."""
from __future__ import annotations

from sglang_fleet.retry import backoff


def test_backoff_grows_and_is_capped():
    assert backoff(0, 1, 60) == 0
    first = backoff(1, 1, 60)
    assert 1 <= first <= 1.5
    assert 8 <= backoff(4, 1, 60) <= 8.5
    assert backoff(20, 1, 60) <= 60
