"""Atomic file and directory writes: write under a temporary name beside the target, then rename.

A crash or kill at any moment leaves either the previous complete file or the new complete file,
never a half-written one (os.replace is atomic on POSIX within a file system). `shared_result` builds on it a
file that one of several processes computes and the others read (a run's actors: tasks/stages/cluster.py).
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TypeVar

T = TypeVar("T")
log = logging.getLogger(__name__)

_UMASK = os.umask(0o022)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what open() would give; mkstemp makes 0600 files


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, target)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_text(target: str | os.PathLike, text: str) -> None:
    with atomic_path(target) as tmp:
        tmp.write_text(text)


@contextlib.contextmanager
def atomic_dir(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a fresh temporary directory beside `target`; on success it replaces `target`.

    An existing `target` is removed just before the rename, so after a crash it is either the old
    complete directory, the new complete directory, or absent, never a partial one.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        publish(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def publish(src: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move a finished file or directory `src` onto `target` (same file system): a file atomically; a
    directory by removing an old `target` just before the rename, so that after a crash `target` is the old
    complete one, the new complete one, or absent, never partial."""
    src, target = Path(src), Path(target)
    if src.is_dir():
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        elif target.exists() or target.is_symlink():
            target.unlink()
        os.rename(src, target)
    else:
        os.replace(src, target)


def version_dir(link: str | os.PathLike) -> Path:
    """A new, empty directory beside `link` to build its next version in (`.<name>-v-<random>`)."""
    link = Path(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=f".{link.name}-v-", dir=link.parent))
    os.chmod(path, 0o777 & ~_UMASK)  # as mkdir would make it (mkdtemp's are private)
    return path


def publish_version(version: str | os.PathLike, link: str | os.PathLike) -> None:
    """Show the complete directory `version` (made by `version_dir(link)`) at `link`, in one atomic step:
    `link` is a symbolic link to its current version, replaced by rename, so that a reader (or a crash) sees
    the old complete directory or the new one, never a mix. A real directory at `link` (written before
    links were used) is moved aside first. The previous versions, and versions left by killed writers,
    are removed afterwards; call this under the writer's lock (tasks.locks), one writer at a time."""
    version, link = Path(version), Path(link)
    if version.parent != link.parent or not version.name.startswith(f".{link.name}-v-"):
        raise ValueError(f"{version} is not a version directory of {link}")
    for stale in link.parent.glob(f".{link.name}.link-*"):  # a killed writer's, or ours from before
        stale.unlink(missing_ok=True)
    tmp = link.with_name(f".{link.name}.link-{os.getpid()}")
    os.symlink(version.name, tmp)
    if link.is_dir() and not link.is_symlink():  # removed with the old versions below
        os.rename(link, link.with_name(f".{link.name}-v-legacy-{os.getpid()}"))
    os.replace(tmp, link)
    for old in link.parent.glob(f".{link.name}-v-*"):
        if old != version and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def clean_stale_temporaries(directory: str | os.PathLike) -> int:
    """Remove temporaries left by killed writers in `directory`; returns how many."""
    n = 0
    d = Path(directory)
    if not d.is_dir():
        return 0
    for p in d.glob(".*.tmp"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        n += 1
    return n


def shared_result(lock: Path, path: Path, compute: Callable[[], T], load: Callable[[Path], T],
                  save: Callable[..., None]) -> T:
    """What `compute()` returns, kept at `path` in a directory several processes share: read when it is there,
    else computed and written (atomic_path) by the first process to take `lock` (tasks.locks.waiting) while the
    others wait for it; one that cannot be read is computed again. Files beside it of the same kind (the name
    up to its first dot; other keys: older inputs or configurations) are removed. `save(file, value)` writes to
    an open binary file, `load(path)` reads. A directory that cannot be locked or written (read-only, full) only
    costs the sharing: a warning, and each process computes for itself."""
    from .locks import waiting
    kind = path.name.split(".", 1)[0]
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(waiting(lock))
        except OSError as exc:
            log.warning(f"no lock in {path.parent} ({exc}); computing {kind} without the shared copy")
            return compute()
        if path.exists():
            try:
                return load(path)
            except Exception as exc:  # damaged: computed again below
                log.warning(f"{path} cannot be read ({type(exc).__name__}: {exc}); computing it again")
        for tmp in path.parent.glob(f".{kind}.*.tmp"):  # atomic_path's, of a writer killed holding this lock
            tmp.unlink(missing_ok=True)
        value = compute()
        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as fh:
                save(fh, value)
        except OSError as exc:
            log.warning(f"cannot write {path} ({exc}); the other processes compute it for themselves")
            return value
        for old in path.parent.glob(f"{kind}.*{path.suffix}"):
            if old != path:
                old.unlink(missing_ok=True)
        return value
