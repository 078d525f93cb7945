"""Retry timing shared by the node loop, the watcher and the router: tenacity's exponential backoff."""
from __future__ import annotations

import tenacity


def backoff(attempt: int, base: float, cap: float) -> float:
    """tenacity's exponential backoff with jitter for the n-th consecutive failure (n >= 1)."""
    if attempt < 1 or base <= 0:
        return 0.0
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    # wait_exponential + wait_random rather than wait_exponential_jitter, whose `initial` newer tenacity deprecates.
    wait = tenacity.wait_exponential(multiplier=base, max=cap) + tenacity.wait_random(0, base / 2)
    return min(cap, wait(state))


__all__ = ["backoff"]
