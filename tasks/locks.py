"""Exclusive locks on run directories and catalogs: one `deepfield run` at a time per run directory, one merge
at a time per catalog directory (`exclusive`, which refuses when the lock is held); and `waiting`, which waits
for the holder to let go (the actors of a run computing a field-level result once: tasks/stages/cluster.py).

A lock is an advisory `fcntl.flock` on a lock file, held for the duration of a `with` block. The kernel
releases it when the holding process ends, however it ends (`kill -9` included), so a lock is never stale
on a machine; the file keeps the last holder's host, process id and start time, which the refusal names.
(On a network file system, flock is as reliable as the file system's locking: NFSv4 and Lustre mounted with
`flock` honour it across hosts.)
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Iterator

__all__ = ["LockedError", "exclusive", "reap_orphans", "waiting"]


class LockedError(RuntimeError):
    """Another process holds the lock."""


@contextlib.contextmanager
def _locked(path: Path, wait: bool, refused) -> Iterator[int]:
    """The open lock file `path` (created with its parent), locked exclusively for the block: waiting for the
    holder when `wait`, else `refused(fd)` raises when another process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as exc:
            if wait or exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            refused(fd)
        try:
            yield fd
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def exclusive(path: str | Path, what: str) -> Iterator[Path]:
    """Hold the exclusive lock `path` (created with its parent) for the block; LockedError naming `what` and
    the holder (host, pid, since) when another process holds it."""
    path = Path(path)

    def refused(fd: int):
        try:
            holder = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
        except (OSError, ValueError):
            holder = {}
        who = (f"process {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
               if holder else "another process")
        raise LockedError(f"{path.parent}: {what} is in use by {who} (lock {path.name}); wait for it to end")
    with _locked(path, False, refused) as fd:
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(dict(host=socket.gethostname(), pid=os.getpid(),
                                      since=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))).encode(), 0)
        yield path


@contextlib.contextmanager
def waiting(path: str | Path) -> Iterator[Path]:
    """Hold the exclusive lock `path` (created with its parent) for the block, waiting as long as another
    process holds it. The kernel releases a holder's lock when it ends however it ends, so a killed holder
    cannot leave the others waiting."""
    with _locked(Path(path), True, None):
        yield Path(path)


def reap_orphans(marker: str, value: str) -> list[int]:
    """Stop the orphaned processes (re-parented to init) whose environment has `marker`=`value`: the helpers
    a killed run left behind (its Prefect server, Ray's agents), which inherit the run's environment. Call
    it holding the run's lock, so that no live run owns them. Linux only (/proc); returns the pids found."""
    import signal
    want = f"{marker}={value}".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        pid = int(proc.name)
        if pid == os.getpid():
            continue
        try:
            if int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) != 1:  # its parent lives
                continue
            if want not in (proc / "environ").read_bytes().split(b"\0"):
                continue
        except (OSError, ValueError, IndexError):
            continue
        found.append(pid)
    alive = list(found)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in alive:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while alive and time.monotonic() < deadline:
            time.sleep(0.2)
            alive = [p for p in alive if Path(f"/proc/{p}").exists()]
        if not alive:
            break
    return found
