"""Atomic files for the whole package (written beside the target and renamed over it), and the
package's one sha256 helper (:func:`sha256_hex`).

A file is written to a hidden temporary sibling and renamed over the target, so a reader
sees the old file or the new one, never half of one. The temporary file is removed when
anything fails (including ``KeyboardInterrupt``), and the new file gets the permissions a
plain ``open(path, "w")`` would give it (``0o666`` minus the umask), not ``mkstemp``'s 0600.

Standard library only, and in the runtime (the lowest layer), so the torch-free runtime's own
writers (collection outputs) and every other part of coopkit share this one writer; whole
folders (saved runs) are swapped in by :mod:`coopkit.atomic_dirs` on top of it.

:class:`ExclusiveLock` gives a path one writer at a time across processes (a collection
output): an advisory lock on a hidden ``.<name>.lock`` beside it, released by the kernel when
its holder dies, so a ``kill -9`` never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Iterator, Union

PathLike = Union[str, "os.PathLike[str]"]

_umask_lock = threading.Lock()


class LockedError(ValueError):
    """Another process (or another writer of this one) holds the lock on a path; the message names it."""


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on ``fd`` without waiting; False when another holds it."""
    try:
        import fcntl
    except ImportError:  # Windows: the first byte of the lock file, locked with msvcrt
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class ExclusiveLock:
    """One writer of ``path`` at a time: an exclusive lock on ``.<name>.lock`` beside it.

    :meth:`acquire` never waits: when another writer holds the lock it raises
    :class:`LockedError` naming the path and the holder's process id. The lock file is
    removed on :meth:`release`; the kernel drops the lock of a process that dies, so a killed
    writer never blocks the next one. Usable as a context manager.
    """

    def __init__(self, path: PathLike, *, what: str = "file") -> None:
        self.target = Path(path)
        self.path = self.target.parent / f".{self.target.name}.lock"
        self.what = what
        self.fd = -1

    def acquire(self) -> "ExclusiveLock":
        """Take the lock, or raise :class:`LockedError` if another writer holds it."""
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if not _try_lock(fd):
                holder = self._holder(fd)
                os.close(fd)
                raise LockedError(
                    f"{self.target} is being written by another run{holder}; wait for it to finish, "
                    f"or choose another {self.what}"
                )
            try:  # the lock file we opened may have been removed by its last holder meanwhile: retry
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode("ascii"))
        self.fd = fd
        return self

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError, ValueError, IndexError):
            os.lseek(fd, 0, os.SEEK_SET)
            pid = int(os.read(fd, 32).split()[0])
            return f" (process {pid})"
        return ""

    def release(self) -> None:
        """Remove the lock file and let go of the lock (idempotent)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):  # removed while still held, so nobody locks a stale name
            os.unlink(self.path)
        os.close(self.fd)
        self.fd = -1

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows, else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _umask_lock:
        mask = os.umask(0o022)
        os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is renamed over ``path``.

    For writers that insist on a file name (``savefig``, ``Image.save``, ``save_file``)::

        with atomic_path("plot.png") as tmp:
            fig.savefig(tmp, format="png")

    The temporary file keeps the target's suffix, so writers that look at it still work.
    On any exception the temporary file is deleted and the target is left as it was.
    """
    target = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{target.suffix}", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~current_umask())
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def atomic_write(path: PathLike, data: Union[bytes, str], *, fsync: bool = True) -> Path:
    """Write ``data`` (bytes, or text as UTF-8) to ``path`` atomically; returns the path.

    ``fsync=False`` skips flushing to disk (the rename is still atomic); for many small files
    that a crash may lose but must never leave half-written.
    """
    blob = data.encode("utf-8") if isinstance(data, str) else bytes(data)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(blob)
    return Path(path)


def fsync_dir(path: PathLike) -> None:
    """Flush a directory entry (after renames in it) where the platform allows."""
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


#: What :func:`sha256_hex` hashes: bytes-like objects (contiguous numpy arrays included) as they
#: are, strings as UTF-8, and iterables of these, item by item.
Chunk = Union[bytes, bytearray, memoryview, str]


def _chunks(part: Any) -> Iterator[Any]:
    if isinstance(part, str):
        yield part.encode("utf-8")
        return
    try:
        view = memoryview(part)
    except TypeError:
        for item in part:  # an iterable of chunks (a generator of file blocks, of tensor bytes...)
            yield from _chunks(item)
        return
    if not view.c_contiguous:
        raise ValueError("sha256_hex hashes contiguous buffers only; make the array C-contiguous first")
    yield view


def sha256_hex(*parts: Any) -> str:
    """The hex sha256 of ``parts`` in order: the one digest helper of coopkit (run checksums,
    file checksums, weight fingerprints, the exported files' tensor digests).

    Each part is bytes-like (a C-contiguous numpy array counts, hashed as its bytes), a string
    (hashed as UTF-8) or an iterable of such parts (e.g. a generator of file blocks), so large
    inputs can be streamed.
    """
    h = hashlib.sha256()
    for part in parts:
        for chunk in _chunks(part):
            h.update(chunk)
    return h.hexdigest()


def file_sha256(path: PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes, read in chunks (hex digest)."""
    with open(path, "rb") as f:
        return sha256_hex(iter(lambda: f.read(chunk), b""))
