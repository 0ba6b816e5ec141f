"""Directories dmscale owns: a marker file that claims them, an exclusive lock, atomic replacement.

dmscale replaces or deletes a directory only if it created it. It says so with a marker file
(``.dmscale``, a small JSON ``{"dmscale": KIND}``; KIND is ``"model"`` for :func:`dmscale.save`
directories and ``"run"`` for run directories). Anything else is refused with
:class:`ForeignDirectoryError` and left untouched.

* :func:`claim_dir` / :func:`dir_kind` / :func:`is_dmscale_dir` / :func:`enclosing_dmscale_dir`:
  write and recognise the marker.
* :func:`lock_dir`: an exclusive ``fcntl.flock`` on ``DIR/.dmscale.lock`` held for the life of a
  command. A second process fails at once with :class:`DirLockedError` naming the holder's PID.
  Within one process the lock is re-entrant (a count), unless it was taken ``reentrant=False``
  (a run directory held by a command: a second holder in the same process fails too).
* :func:`atomic_directory`: build a directory in a temp dir next to the target and swap it in, so
  a crash leaves the complete old or the complete new directory. Temp dirs that killed writers
  left behind (marked, unlocked) are removed by the next write to the same target.
* :func:`remove_dmscale_dir`: delete a directory dmscale created (marker checked, lock taken).
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import stat
import tempfile
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from dmscale.serialization.atomic import (TEMP_INFIX, atomic_write_text, default_mode, file_kind, fsync_dir,
                                          fsync_file, open_regular, remove_if_unlocked, rename_exchange, temp_siblings,
                                          try_flock)
from dmscale.serialization.errors import DirLockedError, ForeignDirectoryError

try:  # POSIX
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = ["MARKER_FILE", "LOCK_FILE", "claim_dir", "dir_kind", "is_dmscale_dir", "enclosing_dmscale_dir",
           "lock_dir", "DirLock", "atomic_directory", "check_replaceable", "clean_stale_temp_dirs",
           "remove_dmscale_dir", "ForeignDirectoryError", "DirLockedError"]

MARKER_FILE = ".dmscale"
LOCK_FILE = ".dmscale.lock"
_MARKER_MAX_BYTES = 4096
_KIND = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")


# ------------------------------------------------------------------------------------------ markers
def _check_kind(kind: str) -> str:
    if not isinstance(kind, str) or not _KIND.match(kind):
        raise ValueError(f"invalid directory kind {kind!r} (lower-case letters, digits, '-', '_')")
    return kind


def dir_kind(path: str | os.PathLike[str]) -> str | None:
    """The kind a dmscale marker in ``path`` declares (``"model"``, ``"run"``, ...), or None if there is none.

    Never blocks and never follows a marker that is a symlink, FIFO or device (those count as no marker).
    """
    p = Path(path) / MARKER_FILE
    try:
        fd = open_regular(p, what="marker", follow_symlinks=False)
    except (OSError, ValueError):
        return None
    try:
        with os.fdopen(fd, "rb") as fh:
            raw = fh.read(_MARKER_MAX_BYTES + 1)
        data = json.loads(raw.decode("utf-8")) if len(raw) <= _MARKER_MAX_BYTES else None
    except (OSError, ValueError):
        return None
    kind = data.get("dmscale") if isinstance(data, dict) else None
    return kind if isinstance(kind, str) and _KIND.match(kind) else None


def is_dmscale_dir(path: str | os.PathLike[str], kind: str | None = None) -> bool:
    """True if ``path`` is a real directory (not a symlink) carrying a dmscale marker (of ``kind``, if given)."""
    p = Path(path)
    try:
        st = os.lstat(p)
    except OSError:
        return False
    if not stat.S_ISDIR(st.st_mode):
        return False
    k = dir_kind(p)
    return k is not None and (kind is None or k == kind)


def _write_marker(directory: Path, kind: str) -> None:
    atomic_write_text(directory / MARKER_FILE, json.dumps({"dmscale": kind, "marker_version": 1}) + "\n")


def claim_dir(path: str | os.PathLike[str], kind: str) -> Path:
    """Create ``path`` if needed and mark it as a dmscale directory of ``kind``; returns the path.

    A directory already marked with another kind is refused (:class:`ForeignDirectoryError`).
    Claiming an existing unmarked directory is the caller's decision (e.g. an empty ``--out``).
    """
    _check_kind(kind)
    p = Path(path)
    if p.is_symlink() or (p.exists() and not p.is_dir()):
        raise ForeignDirectoryError(f"{str(p)!r} exists and is not a directory; dmscale will not use it")
    p.mkdir(parents=True, exist_ok=True)
    have = dir_kind(p)
    if have == kind:
        return p
    if have is not None:
        raise ForeignDirectoryError(f"{str(p)!r} is a dmscale {have} directory, not a {kind} directory")
    if os.path.lexists(p / MARKER_FILE):
        raise ForeignDirectoryError(f"{str(p / MARKER_FILE)!r} exists and is not a dmscale marker; "
                                    "dmscale will not overwrite it")
    _write_marker(p, kind)
    return p


def enclosing_dmscale_dir(path: str | os.PathLike[str], kind: str) -> Path | None:
    """``path`` itself or its nearest ancestor that carries a dmscale marker of ``kind``, else None."""
    p = Path(path).expanduser().absolute()
    for d in (p, *p.parents):
        if is_dmscale_dir(d, kind):
            return d
    return None


# ------------------------------------------------------------------------------------------ locks
_locks_guard = threading.Lock()
_held: dict[tuple[int, int], list] = {}  # (st_dev, st_ino) -> [fd, count, path, exclusive in this process]


def _read_pid(fd: int) -> int | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 64).decode("ascii", "replace").strip()
        return int(raw.split()[0]) if raw else None
    except (OSError, ValueError, IndexError):
        return None


class DirLock:
    """A held :func:`lock_dir` lock; release it with :meth:`release` or by leaving the ``with`` block."""

    def __init__(self, path: Path, key: tuple[int, int]) -> None:
        self.path = path
        self._key: tuple[int, int] | None = key

    @property
    def held(self) -> bool:
        """Whether this handle still holds its share of the lock."""
        return self._key is not None

    def release(self) -> None:
        """Drop this handle's share; the lock is released when the last handle in the process drops it."""
        key, self._key = self._key, None
        if key is None:
            return
        with _locks_guard:
            ent = _held.get(key)
            if ent is None:
                return
            ent[1] -= 1
            if ent[1] <= 0:
                del _held[key]
                with contextlib.suppress(OSError):
                    os.close(ent[0])

    def __enter__(self) -> DirLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.release()

    def __repr__(self) -> str:
        return f"DirLock({str(self.path)!r}, held={self.held})"


def lock_dir(path: str | os.PathLike[str], *, what: str = "directory", reentrant: bool = True) -> DirLock:
    """Take the exclusive lock of directory ``path`` (created if missing) for this process.

    Fails at once with :class:`DirLockedError` naming the holder's PID if another process holds it.
    Within this process a second ``lock_dir`` shares the held lock (a count), unless either of the
    two is taken with ``reentrant=False``: then it fails as well, naming this process's PID.
    The lock is an ``fcntl.flock`` on ``path/.dmscale.lock``; it is released by :meth:`DirLock.release`,
    at the end of a ``with`` block, or when the process ends (also on SIGKILL).
    """
    p = Path(path)
    p.mkdir(parents=True, exist_ok=True)
    st = os.stat(p)
    key = (st.st_dev, st.st_ino)
    with _locks_guard:
        ent = _held.get(key)
        if ent is not None:
            if not reentrant or ent[3]:
                raise DirLockedError(
                    f"{what} {str(p)!r} is in use by another dmscale command in this process (PID {os.getpid()}); "
                    "wait for it to finish, then run the command again", os.getpid())
            ent[1] += 1
            return DirLock(p, key)
        lock_path = p / LOCK_FILE
        flags = (os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
                 | getattr(os, "O_CLOEXEC", 0))
        try:
            fd = os.open(lock_path, flags, default_mode())
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ForeignDirectoryError(f"{str(lock_path)!r} is a symbolic link; refusing to use it as a lock") from None
            raise
        try:
            fst = os.fstat(fd)
            if not stat.S_ISREG(fst.st_mode):
                raise ForeignDirectoryError(f"{str(lock_path)!r} is a {file_kind(fst.st_mode)}, not a lock file")
            if not try_flock(fd):
                pid = _read_pid(fd)
                who = f"PID {pid}" if pid is not None else "an unknown PID"
                raise DirLockedError(
                    f"{what} {str(p)!r} is in use by another dmscale process ({who}); wait for it to finish "
                    f"or stop it (kill {pid if pid is not None else '<pid>'}), then run the command again", pid)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        except BaseException:
            os.close(fd)
            raise
        _held[key] = [fd, 1, p, not reentrant]
    return DirLock(p, key)


# ------------------------------------------------------------------------------------------ replacement
def check_replaceable(target: str | os.PathLike[str], kind: str, entries: Iterable[str],
                      legacy: Callable[[Path], bool] | None = None) -> None:
    """Raise :class:`ForeignDirectoryError` unless ``target`` may be replaced by a new ``kind`` directory.

    Replaceable: a missing path, an empty directory, or a directory carrying the ``kind`` marker (or,
    for directories written before markers existed, one that ``legacy`` recognises) that holds only
    regular files named in ``entries``. The message names what is in the way. Never reads a non-regular
    file (no FIFO can block this check).
    """
    t = Path(target)
    try:
        st = os.lstat(t)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise ForeignDirectoryError(f"{str(t)!r} is a symbolic link; dmscale will not replace it (choose another path)")
    if not stat.S_ISDIR(st.st_mode):
        raise ForeignDirectoryError(f"{str(t)!r} exists and is a {file_kind(st.st_mode)}, not a directory; "
                                    "dmscale will not replace it (choose another path)")
    allowed = set(entries) | {MARKER_FILE}
    foreign: list[str] = []
    special: list[str] = []
    names: list[str] = []
    with os.scandir(t) as it:
        for e in it:
            names.append(e.name)
            est = e.stat(follow_symlinks=False)
            if not stat.S_ISREG(est.st_mode):
                special.append(f"{e.name} ({file_kind(est.st_mode)})")
            elif e.name not in allowed:
                foreign.append(e.name)
    if not names:
        return
    if special:
        raise ForeignDirectoryError(f"{str(t)!r} holds entries dmscale did not write: {', '.join(sorted(special))}; "
                                    "nothing was changed (remove them or choose another path)")
    owned = dir_kind(t) == kind or (MARKER_FILE not in names and legacy is not None and legacy(t))
    if not owned:
        raise ForeignDirectoryError(
            f"{str(t)!r} exists, is not empty and was not created by dmscale (no {MARKER_FILE} {kind} marker); "
            f"nothing was changed: choose an empty or new path, or remove it yourself")
    if foreign:
        raise ForeignDirectoryError(
            f"{str(t)!r} holds files dmscale did not write: {', '.join(sorted(foreign)[:10])}; replacing it would "
            "delete them, so nothing was changed (move them out or choose another path)")


def _open_dir(path: str | os.PathLike[str]) -> int:
    return os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_NOFOLLOW", 0)
                   | getattr(os, "O_CLOEXEC", 0))


def clean_stale_temp_dirs(target: str | os.PathLike[str]) -> list[Path]:
    """Remove temp dirs that killed :func:`atomic_directory` writers of ``target`` left behind.

    Only directories with exactly the temp-name pattern, carrying a dmscale marker (written after
    the writer took the lock) and not locked by a live writer are removed. Returns them.
    """
    removed: list[Path] = []
    for e in temp_siblings(target):
        if e.is_dir(follow_symlinks=False) and dir_kind(e.path) is not None \
                and remove_if_unlocked(e.path, directory=True):
            removed.append(Path(e.path))
    return removed


def _discard_replaced(old: Path, entries: set[str]) -> None:
    """Delete the replaced directory's files (only names dmscale writes), then the directory if it is empty.

    Anything else that appeared there meanwhile is kept (and the directory with it)."""
    for name in entries | {MARKER_FILE}:
        p = old / name
        with contextlib.suppress(OSError):
            if stat.S_ISREG(os.lstat(p).st_mode):
                os.unlink(p)
    try:
        os.rmdir(old)
    except FileNotFoundError:
        pass
    except OSError:
        import warnings

        warnings.warn(f"kept {str(old)!r}: files dmscale did not write appeared in the replaced directory while "
                      "it was being saved; move them back", stacklevel=4)


def _replace_directory(new: Path, target: Path, entries: set[str]) -> None:
    """Move the finished directory ``new`` to ``target``, replacing an existing ``target`` as safely as possible."""
    if not os.path.lexists(target):
        os.rename(new, target)
        fsync_dir(target.parent)
        return
    if rename_exchange(new, target):  # one atomic step: target is never missing
        fsync_dir(target.parent)
        _discard_replaced(new, entries)  # ``new`` now holds the old contents
        return
    aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(aside, target)
        raise
    fsync_dir(target.parent)
    _discard_replaced(aside, entries)


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], kind: str, entries: Iterable[str],
                     legacy: Callable[[Path], bool] | None = None) -> Iterator[Path]:
    """Yield a marked, locked temp dir next to ``path``; on success fsync it and swap it in.

    ``path`` must be replaceable (:func:`check_replaceable` with ``kind``/``entries``/``legacy``),
    checked before anything is written and again just before the swap. The temp dir carries the
    ``kind`` marker from the start, so the finished directory is marked. On error the temp dir is
    deleted and ``path`` is untouched. Stale temp dirs of earlier killed writers are cleaned first.
    """
    _check_kind(kind)
    names = set(entries)
    target = Path(path).absolute()
    check_replaceable(target, kind, names, legacy)
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temp_dirs(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}{TEMP_INFIX}", dir=target.parent))
    fd = -1
    try:
        fd = _open_dir(tmp)
        try_flock(fd)  # a live writer: stale-dir cleaning skips it
        os.chmod(tmp, default_mode(directory=True))
        _write_marker(tmp, kind)
        yield tmp
        for root, _dirs, files in os.walk(tmp):
            for name in files:
                fsync_file(Path(root) / name)
            fsync_dir(Path(root))
        check_replaceable(target, kind, names, legacy)
        _replace_directory(tmp, target, names)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if fd >= 0:
            os.close(fd)


def remove_dmscale_dir(path: str | os.PathLike[str], kind: str, *, keep_if: Callable[[str], bool] | None = None) -> None:
    """Delete directory ``path`` only if dmscale created it as ``kind`` (marker) and no other process holds its lock.

    ``keep_if(name)`` may name top-level entries that are not dmscale's (e.g. a user's notes): if any
    exists, nothing is deleted and :class:`ForeignDirectoryError` lists them.
    """
    p = Path(path)
    if not os.path.lexists(p):
        return
    if p.is_symlink():
        raise ForeignDirectoryError(f"{str(p)!r} is a symbolic link, not a {kind} directory; dmscale will not delete it")
    if not p.is_dir():
        raise ForeignDirectoryError(f"{str(p)!r} is not a directory; dmscale will not delete it")
    if dir_kind(p) != kind:
        raise ForeignDirectoryError(
            f"{str(p)!r} was not created by dmscale as a {kind} directory (no {MARKER_FILE} marker); "
            "refusing to delete it: remove it yourself or choose another path")
    with lock_dir(p, what=f"{kind} directory"):
        if keep_if is not None:
            foreign = sorted(n for n in os.listdir(p) if keep_if(n))
            if foreign:
                raise ForeignDirectoryError(
                    f"{str(p)!r} holds files dmscale did not write: {', '.join(foreign[:10])}; refusing to delete it "
                    "(move them out first)")
        shutil.rmtree(p)
