"""Secrets that must cross into another process on this host go through a 0600 file, never a command line
(`ps`, SGLang's logged launch command) or an environment (`docker inspect`, /proc/<pid>/environ of
everything the child starts): smg's admin key for `sglang-fleet status`, the engine's API keys for
SGLang's --config. The files live in the temporary directory, named after the port they belong to.
"""
from __future__ import annotations

import errno
import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

REDACTED = "***"


def runtime_path(name: str) -> Path:
    return Path(tempfile.gettempdir()) / name


def write_private(path: Path, text: str) -> Path:
    """Writes `text` to a new 0600 file at `path`. O_EXCL|O_NOFOLLOW: never through a link somebody planted in
    a shared /tmp; a file of our own left by a process that was killed is replaced. OSError otherwise."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            st = os.lstat(path)
            if st.st_uid != os.getuid():
                raise OSError(errno.EEXIST, f"{path} exists and belongs to uid {st.st_uid}") from None
            path.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return path
    raise OSError(errno.EEXIST, f"{path} keeps coming back")


def read_private(path: Path) -> str | None:
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


def remove(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def redactor(secrets: Iterable[str | None]):
    """A function that replaces every one of `secrets` in a text by ***: for a child's output lines (SGLang
    logs its resolved server arguments, API keys included)."""
    words = sorted({s for s in secrets if s}, key=len, reverse=True)
    if not words:
        return lambda text: text
    pattern = re.compile("|".join(re.escape(w) for w in words))
    return lambda text: pattern.sub(REDACTED, text)


__all__ = ["REDACTED", "read_private", "redactor", "remove", "runtime_path", "write_private"]
