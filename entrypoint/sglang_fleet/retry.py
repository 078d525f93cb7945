"""Retry timing shared by the node loop, the watcher and the router: tenacity's exponential backoff."""
from __future__ import annotations

import tenacity


def backoff(attempt: int, base: float, cap: float) -> float:
    """tenacity's exponential backoff with jitter for the n-th consecutive failure (n >= 1)."""
    if attempt < 1 or base <= 0:
        return 0.0
    state = tenacity.RetryCallState(retry_object=None, fn=None, args=(), kwargs={})
    state.attempt_number = attempt
    return tenacity.wait_exponential_jitter(initial=base, max=cap, jitter=base / 2)(state)


__all__ = ["backoff"]
