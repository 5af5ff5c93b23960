"""Exclusive claims on sweep runs, so that several sweep processes can share one store and one checkpoint folder.

A claim is an advisory ``flock`` on ``<checkpoint_dir>/<run_key>.lock``. The operating system drops the lock
when its process ends, however it ends (``kill -9`` included), so a claim is never left stale: the next worker
takes the run over and resumes it from its checkpoint. Holding a claim is the only way to train a run; the
store's primary key keeps a run from being written twice whatever happens.

The protocol (:func:`~sharpness.harness.sweep.run_sweep`): skip a run that is stored; otherwise try to claim it
without waiting (a run claimed by another worker is skipped); once claimed, check the store again (another
worker may have finished it between the two checks), train, store, delete the checkpoint, and release the claim
(the lock file is deleted while it is still held, so nobody is left waiting on a deleted file).

``flock`` is POSIX (Linux, macOS); where it is missing, :func:`claim` always succeeds, which is right for one
worker and is why :func:`~sharpness.harness.sweep.run_sweep_parallel` refuses ``jobs > 1`` there. On network
file systems ``flock`` is only as good as the file system's locking (NFSv4: yes).
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

__all__ = ["Claim", "can_share", "claim", "clear_claim"]


def can_share() -> bool:
    """Whether several processes can safely run one sweep side by side here (``flock`` exists)."""
    return fcntl is not None


class Claim:
    """A held claim on one run; :meth:`release` (or leaving the ``with`` block) gives it back."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path, self._fd = path, fd

    def release(self) -> None:
        """Delete the lock file and drop the lock (idempotent)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def claim(folder: Path, key: str) -> Claim | None:
    """Claim run ``key`` without waiting: a :class:`Claim`, or None when another process holds it."""
    path = folder / f"{key}.lock"
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    if fcntl is not None:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return None
        if not _same_file(fd, path):  # the holder released it (and deleted the file) after our open: try again
            os.close(fd)
            return claim(folder, key)
    return Claim(path, fd)


def clear_claim(folder: Path, key: str) -> None:
    """Delete the lock file a crash left behind for run ``key`` (a no-op when there is none or it is held)."""
    if (folder / f"{key}.lock").exists():
        held = claim(folder, key)
        if held is not None:
            held.release()


def _same_file(fd: int, path: Path) -> bool:
    """Whether ``path`` still names the file open as ``fd`` (it was not deleted or replaced in between)."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (stat.st_dev, stat.st_ino) == (own.st_dev, own.st_ino)
