"""File-level primitives: atomic writes, safe reads of regular files, fsync and atomic renames.

* :func:`atomic_write_bytes` / :func:`atomic_write_text` write a temp file next to the target,
  fsync it and rename it over the target: readers see the old or the new file, never half of one.
  While a temp file is being written its writer holds an ``flock`` on it; a later write to the same
  target removes the temp files that killed writers left behind (non-empty and not locked).
* :func:`read_regular_file` reads a file only if it is a regular file: a FIFO, a device or a socket
  is refused at once (opening is non-blocking), so a crafted ``structure.json`` cannot hang a reader.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["atomic_write_bytes", "atomic_write_text", "read_regular_file", "read_json_file", "remove_if_unlocked", "open_regular", "file_kind",
           "clean_stale_temp_files", "fsync_dir", "fsync_file", "rename_exchange", "default_mode", "try_flock"]

_umask_lock = threading.Lock()
_umask_cache: list[int] = []
TEMP_INFIX = ".tmp-"


def default_mode(directory: bool = False) -> int:
    """Permission bits a normal ``open``/``mkdir`` would give (tempfile uses 0600/0700)."""
    if not _umask_cache:
        with _umask_lock:
            if not _umask_cache:
                mask = os.umask(0o022)
                os.umask(mask)
                _umask_cache.append(mask)
    return (0o777 if directory else 0o666) & ~_umask_cache[0]


def fsync_dir(path: Path) -> None:
    """Flush a directory entry to disk so that a rename inside it survives a crash (no-op where unsupported)."""
    flags = getattr(os, "O_DIRECTORY", None)
    if flags is None:  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | flags)
    except OSError:  # pragma: no cover
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    """Flush one regular file's contents to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_kind(mode: int) -> str:
    """Human name of a file type from ``st_mode`` (for error messages)."""
    for test, name in ((stat.S_ISREG, "regular file"), (stat.S_ISDIR, "directory"), (stat.S_ISFIFO, "FIFO"),
                       (stat.S_ISCHR, "character device"), (stat.S_ISBLK, "block device"),
                       (stat.S_ISSOCK, "socket"), (stat.S_ISLNK, "symbolic link")):
        if test(mode):
            return name
    return "special file"  # pragma: no cover


def try_flock(fd: int) -> bool:
    """Take an exclusive ``flock`` on ``fd`` without waiting; False if another open file holds it."""
    if fcntl is None:  # pragma: no cover - Windows: no advisory locks
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        return False
    except OSError as exc:  # pragma: no cover - e.g. ENOLCK on some network file systems
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        raise
    return True


def open_regular(path: str | os.PathLike[str], *, what: str, exc: type[Exception] = ValueError,
                 follow_symlinks: bool = True) -> int:
    """Open ``path`` read-only and return the fd, only if it is a regular file.

    The open is non-blocking, so a FIFO without a writer returns at once and is then refused;
    devices, sockets and directories are refused too (``exc`` names ``what`` and the file type).
    ``FileNotFoundError`` passes through.
    """
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    if not follow_symlinks:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise
    except IsADirectoryError:
        raise exc(f"{what} {str(path)!r} is a directory, not a regular file") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise exc(f"{what} {str(path)!r} is a symbolic link; refusing to follow it") from None
        raise exc(f"{what} {str(path)!r} cannot be opened: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise exc(f"{what} {str(path)!r} is a {file_kind(st.st_mode)}, not a regular file; refusing to read it")
        if fcntl is not None and hasattr(os, "O_NONBLOCK"):  # back to blocking reads
            fl = fcntl.fcntl(fd, fcntl.F_GETFL)
            fcntl.fcntl(fd, fcntl.F_SETFL, fl & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def read_regular_file(path: str | os.PathLike[str], *, what: str, max_bytes: int | None = None,
                      exc: type[Exception] = ValueError, missing: type[Exception] | None = None) -> bytearray:
    """All bytes of a regular file (see :func:`open_regular`); refuses files over ``max_bytes``.

    With ``missing``, a missing file raises ``missing`` and any other OS error ``exc`` (both name the
    file); without it, ``OSError`` passes through.
    """
    try:
        fd = open_regular(path, what=what, exc=exc)
    except FileNotFoundError:
        if missing is None:
            raise
        raise missing(f"{what} {str(path)!r} does not exist") from None
    except OSError as e:
        if missing is None:
            raise
        raise exc(f"{what} {str(path)!r} cannot be read: {e.strerror or e}") from None
    with os.fdopen(fd, "rb", buffering=0) as fh:
        size = os.fstat(fh.fileno()).st_size
        if max_bytes is not None and size > max_bytes:
            raise exc(f"{what} {str(path)!r} is {size:,} bytes, more than the {max_bytes:,} bytes allowed")
        buf = bytearray(size)
        view = memoryview(buf)
        n = 0
        while n < size:
            got = fh.readinto(view[n:])
            if not got:
                break
            n += got
        if n != size or fh.read(1):
            raise exc(f"{what} {str(path)!r} changed size while it was read")
    return buf


def read_json_file(path: str | os.PathLike[str], *, what: str, exc: type[Exception] = ValueError,
                   max_bytes: int = 256 * 1024 * 1024, expect: type | None = dict) -> Any:
    """Parse a JSON file that must be a regular UTF-8 file (of type ``expect``); ``exc`` names the file on any failure.

    ``FileNotFoundError`` passes through (callers decide whether a missing file is an error).
    """
    import json

    raw = read_regular_file(path, what=what, max_bytes=max_bytes, exc=exc)
    try:
        data = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise exc(f"{what} {str(path)!r} is corrupted (not valid JSON: {str(e)[:200]})") from None
    if expect is not None and not isinstance(data, expect):
        raise exc(f"{what} {str(path)!r} is corrupted: expected a JSON {expect.__name__}, got {type(data).__name__}")
    return data


def temp_siblings(target: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    """Entries next to ``target`` named exactly like the temp files/dirs this package creates for it
    (``.NAME.tmp-XXXXXXXX``, the ``tempfile`` suffix)."""
    t = Path(target).absolute()
    pat = re.compile(rf"^\.{re.escape(t.name)}{re.escape(TEMP_INFIX)}[A-Za-z0-9_]{{8}}$")
    try:
        return [e for e in os.scandir(t.parent) if pat.match(e.name)]
    except OSError:
        return []


def clean_stale_temp_files(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temp files that killed :func:`atomic_write_bytes` calls for ``target`` left behind.

    A temp file is removed only if its name is exactly one this module creates, it is a non-empty
    regular file (its writer had taken the lock before writing) and no live writer holds its lock.
    Returns the removed paths.
    """
    removed: list[Path] = []
    for e in temp_siblings(target):
        try:
            if not e.is_file(follow_symlinks=False) or e.stat(follow_symlinks=False).st_size == 0:
                continue
        except OSError:
            continue
        if remove_if_unlocked(e.path):
            removed.append(Path(e.path))
    return removed


def remove_if_unlocked(path: str | os.PathLike[str], directory: bool = False) -> bool:
    """Remove a temp file (or, with ``directory``, a temp dir tree) unless a live writer holds its ``flock``.

    The lock is taken without waiting and held while removing; symlinks are never followed.
    Returns whether it was removed.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    flags |= getattr(os, "O_DIRECTORY", 0) if directory else getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        if not try_flock(fd):
            return False
        if directory:
            import shutil

            shutil.rmtree(path)
        else:
            os.unlink(path)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (temp file in the same dir, fsync, rename) so readers never see half a file."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.is_dir() and not target.is_symlink():
        raise IsADirectoryError(errno.EISDIR, f"cannot write file {str(target)!r}: it is a directory", str(target))
    clean_stale_temp_files(target)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}{TEMP_INFIX}", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as fh:
            try_flock(fh.fileno())  # marks the temp file as in use until it is renamed and closed
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
            os.chmod(tmp, default_mode())
            os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(target.parent)
    return target


def atomic_write_text(path: str | os.PathLike[str], text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (see :func:`atomic_write_bytes`)."""
    return atomic_write_bytes(path, text.encode(encoding))


def rename_exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths with Linux ``renameat2(RENAME_EXCHANGE)``; False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, f"renameat2(RENAME_EXCHANGE) failed: {os.strerror(err)}", str(a), None, str(b))
