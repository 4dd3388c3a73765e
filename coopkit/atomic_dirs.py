"""Folders that change as a whole (a saved run: its files only make sense together), written
beside the target and swapped in with one rename; built on the file writer of
:mod:`coopkit.runtime.atomic`, which every part of coopkit uses for single files.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterator, Optional

from .runtime.atomic import PathLike, fsync_dir


# --- folders that are replaced whole -------------------------------------------------------------
#
# A folder (a saved run) is written as a hidden sibling ``.<name>.coopkit-new-<pid>-<hex>`` and
# takes the target's place in one step: ``renameat2(RENAME_EXCHANGE)`` on Linux, ``renamex_np
# (RENAME_SWAP)`` on macOS, so at every instant ``<name>`` is the complete old folder or the
# complete new one. The old folder, now under the hidden name, is deleted afterwards. Where the
# filesystem cannot exchange (NFS, some FUSE mounts, Windows), the old folder is first renamed to
# ``.<name>.coopkit-old-<pid>-<hex>``; a crash between that rename and the next leaves no
# ``<name>`` but the complete old folder under that name, which :func:`interrupted_backup` finds.
# Hidden leftovers of a killed process are removed by the next write to any folder of the same
# parent: only hidden folders named exactly as above, whose process no longer runs (an old-folder
# backup only once its own target exists again), never anything else a user keeps there.

_NEW, _OLD, _PROBE = "coopkit-new", "coopkit-old", "coopkit-probe"
#: The exact name of a hidden sibling: ``.<target name>.<kind>-<pid>-<8 hex digits>``.
_LEFTOVER = re.compile(rf"^\.(?P<target>.+)\.(?P<kind>{_NEW}|{_OLD}|{_PROBE})-(?P<pid>\d+)-[0-9a-f]{{8}}$")
_RENAME_EXCHANGE = 2  # linux/fs.h; macOS RENAME_SWAP has the same value
_AT_FDCWD = -100


def _sibling(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.{kind}-{os.getpid()}-{os.urandom(4).hex()}"


def _siblings(target: Path, kind: str) -> list[Path]:
    prefix = f".{target.name}.{kind}-"
    try:
        return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))
    except OSError:
        return []


def _owner_alive(path: Path) -> bool:
    """Whether the process that made a hidden sibling still runs (its pid is in the name)."""
    try:
        pid = int(path.name.rsplit("-", 2)[-2])
    except (ValueError, IndexError):
        return False
    if pid == os.getpid():  # another thread of this process may be writing it
        return True
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _exchange_function() -> Optional[Callable[[bytes, bytes], int]]:
    """``f(a, b) -> 0 or -1`` that swaps two paths atomically, or None where libc has none."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except (OSError, TypeError):  # no C library to look into (Windows)
        return None
    if hasattr(libc, "renameat2"):
        fn = libc.renameat2
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(_AT_FDCWD, a, _AT_FDCWD, b, _RENAME_EXCHANGE)
    if hasattr(libc, "renamex_np"):
        fn = libc.renamex_np
        fn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        return lambda a, b: fn(a, b, _RENAME_EXCHANGE)
    return None


_exchange_fn: list[Optional[Callable[[bytes, bytes], int]]] = []


def exchange(a: PathLike, b: PathLike) -> bool:
    """Swap two existing paths in one atomic step; ``False`` (nothing done) where the platform or
    the filesystem cannot."""
    import ctypes
    import errno

    if not _exchange_fn:
        _exchange_fn.append(_exchange_function())
    fn = _exchange_fn[0]
    if fn is None:
        return False
    if fn(os.fsencode(a), os.fsencode(b)) == 0:
        return True
    err = ctypes.get_errno()
    if err in {getattr(errno, name, None) for name in ("EINVAL", "ENOSYS", "ENOTSUP", "EOPNOTSUPP", "EXDEV")}:
        return False
    raise OSError(err, os.strerror(err), os.fspath(b))


def fsync_tree(folder: Path) -> None:
    """Flush every file below ``folder`` and then the folder itself to the disk (before it is swapped in)."""
    for p in folder.rglob("*"):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(folder)


def remove_stale(target: PathLike) -> None:
    """Delete the hidden leftovers of writes by processes that no longer run, to ``target`` and to
    every other folder of its parent (an old-folder backup only once its own target exists
    again). Only hidden folders named exactly as this module names them are touched."""
    parent = Path(target).parent
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return
    for entry in entries:
        m = _LEFTOVER.match(entry.name)
        if m is None or not entry.is_dir(follow_symlinks=False):
            continue
        path = Path(entry.path)
        if _owner_alive(path) or (m["kind"] == _OLD and not (parent / m["target"]).exists()):
            continue
        shutil.rmtree(path, ignore_errors=True)


def probe_beside(target: PathLike) -> None:
    """Create ``target``'s parent folders and prove that a folder can be made beside ``target``
    (made and removed at once): permission problems and read-only or full filesystems show
    now, as the ``OSError`` they are, instead of after long work."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    probe = _sibling(target, _PROBE)
    os.mkdir(probe)
    os.rmdir(probe)


def interrupted_backup(target: PathLike) -> Optional[Path]:
    """The complete old folder a write to ``target`` left when it was killed between its two
    renames (only on filesystems that cannot exchange), or None."""
    target = Path(target)
    if target.exists():
        return None
    backups = [p for p in _siblings(target, _OLD) if p.is_dir() and not _owner_alive(p)]
    return max(backups, key=lambda p: p.stat().st_mtime) if backups else None


def _rename_new(tmp: Path, target: Path) -> None:
    """Rename ``tmp`` to ``target``, which did not exist a moment ago: if another writer's folder
    took the name in between (two first writes at once), that one stays and this one fails with a
    one-line ``FileExistsError``, never half of each nor a raw ``Directory not empty``."""
    import errno

    try:
        os.rename(tmp, target)
    except OSError as e:
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
            raise
        raise FileExistsError(errno.EEXIST, "written by another process at the same moment (this write was not "
                              "made; write again to replace that one)", os.fspath(target)) from None


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; when the block succeeds, it replaces
    ``path`` (a folder or nothing) in one atomic step, and the old folder is deleted.

    A crash at any moment leaves ``path`` as the complete old folder or the complete new one
    (see the notes above); on an exception in the block, the hidden folder is removed and
    ``path`` is untouched. The new folder gets the permissions of a plain ``mkdir`` (``0o777``
    minus the umask). Make files in it with plain ``open`` (they get ``0o666`` minus the umask).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(target)
    tmp = _sibling(target, _NEW)
    os.mkdir(tmp)
    try:
        yield tmp
        if fsync:
            fsync_tree(tmp)
        if not target.exists():
            _rename_new(tmp, target)
        elif exchange(tmp, target):
            shutil.rmtree(tmp, ignore_errors=True)  # the old folder, now under the hidden name
        else:
            old = _sibling(target, _OLD)
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            shutil.rmtree(old, ignore_errors=True)
        if fsync:
            fsync_dir(target.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    remove_stale(target)  # e.g. the old folder an earlier, killed write left (target exists again)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) for the block and raise ``KeyboardInterrupt`` right after it.

    For short steps that must not stop half-way (saving a run takes milliseconds). Only in the
    main thread and only while Python's own SIGINT handler is installed; otherwise a no-op.
    """
    import signal

    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    caught: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if caught:
        raise KeyboardInterrupt
