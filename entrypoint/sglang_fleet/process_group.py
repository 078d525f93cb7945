"""OS plumbing for a supervised child and its process group (child.py decides when; this only does): the
kernel kills it with its supervisor (PR_SET_PDEATHSIG), signals reach the whole group, and "gone" means no
live member left (zombies reparented to a PID 1 that does not reap are not alive). Also the /dev/shm files
a group leaves behind (engine.py)."""
from __future__ import annotations

import ctypes
import glob
import os
import signal
import subprocess
import sys
from typing import Iterator

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _load_prctl():
    """libc's prctl, resolved once here: the child between fork and exec must not load anything."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


_PRCTL = _load_prctl()


def die_with_parent_thread(parent_pid: int):
    """preexec_fn for a supervised child: SIGKILL when the spawning thread dies (None where prctl is missing)."""
    if _PRCTL is None:
        return None

    # Runs in the forked child of a threaded process: only a pre-resolved libc call and os calls, no
    # imports and no locks another thread could have held at fork time.
    def preexec() -> None:
        _PRCTL(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent_pid:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGKILL)
    return preexec


def signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass  # the whole group is gone already


def proc_stats() -> Iterator[tuple[int, list[bytes]]]:
    """(pid, fields) for every process in /proc, the fields after "pid (comm) ": state ppid pgrp ...
    Raises OSError where /proc cannot be listed."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue  # the process is gone
        yield int(entry), stat[stat.rfind(b")") + 2:].split()


def group_alive(pgid: int) -> bool:
    """True while any non-zombie process is in the group (zombies reparented to a PID 1 that does not
    reap would otherwise keep a group 'alive' forever)."""
    try:
        stats = list(proc_stats())
    except OSError:
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
    return any(len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")
               for _, fields in stats)


def group_gone(proc: subprocess.Popen, pgid: int) -> bool:
    """One look: True once our own child is reaped and no live process is left in its group (orphans are
    reaped first, since a zombie still counts as a member). The leader must be reaped, not only look dead:
    /proc shows a multi-threaded leader as a zombie while its last threads still exit, and a child that is
    let go unreaped stays a zombie with its exit code unknown."""
    if proc.poll() is None:
        return False
    reap_orphans(pgid)
    return not group_alive(pgid)


def reap_orphans(pgid: int) -> None:
    """When we are PID 1 or a subreaper, orphaned processes of a child's group become our children: reap them."""
    while True:
        try:
            pid, _ = os.waitpid(-pgid, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


SHM_DIR = "/dev/shm"


def group_pids(pgid: int) -> list[int]:
    """Live (non-zombie) processes of the group."""
    try:
        return [pid for pid, fields in proc_stats()
                if len(fields) > 2 and int(fields[2]) == pgid and fields[0] not in (b"Z", b"X")]
    except OSError:
        return []


def shm_files_of(pids: list[int], shm_dir: str = SHM_DIR) -> set[str]:
    """Files in `shm_dir` these processes have mapped or open, plus Intel OpenMP's per-pid registration
    files: what they created there. Only these are theirs to clean up, since /dev/shm may be the host's
    (docker run --ipc host) and hold other engines' files."""
    prefix = shm_dir.rstrip("/") + "/"
    found: set[str] = set()
    for pid in pids:
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    path = line.rstrip(b"\n").split(b" ", 5)[-1].strip().decode(errors="replace")
                    if path.startswith(prefix) and not path.endswith(" (deleted)"):  # unlinked already
                        found.add(path)
            for fd in os.listdir(f"/proc/{pid}/fd"):
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if target.startswith(prefix) and not target.endswith(" (deleted)"):
                    found.add(target)
        except OSError:
            continue  # gone meanwhile, or not ours to read
        found.update(glob.glob(f"{prefix}__KMP_REGISTERED_LIB_{pid}_*"))
    return found


def remove_files(paths: set[str]) -> tuple[int, int]:
    """Unlinks what still exists; (files removed, bytes freed)."""
    count = size = 0
    for path in paths:
        try:
            st = os.stat(path)
            os.unlink(path)
        except OSError:
            continue
        count, size = count + 1, size + st.st_size
    return count, size


__all__ = ["die_with_parent_thread", "group_alive", "group_gone", "group_pids", "proc_stats", "reap_orphans",
           "remove_files", "shm_files_of", "signal_group"]
