"""Errors of the serialization layer (public: ``dmscale.LoadError``)."""

from __future__ import annotations

__all__ = ["LoadError", "ModelNotFoundError", "ForeignDirectoryError", "DirLockedError"]


class LoadError(ValueError):
    """A saved model that :func:`dmscale.load` refuses or cannot read.

    Raised for every refused or broken directory: a class or function outside the allowlist, a
    checksum that does not match, a size attribute that disagrees with the weights, a malformed
    ``structure.json``, a non-regular file, a missing weights file, ... The message names the file,
    the module path and the attribute or tag concerned. Subclasses ``ValueError``.
    """


class ModelNotFoundError(LoadError, FileNotFoundError):
    """No saved model (or one of its files) at the given path; also a ``FileNotFoundError``."""


class ForeignDirectoryError(FileExistsError):
    """A path that dmscale refuses to replace or delete because dmscale did not create it (or it holds
    files dmscale did not write). Nothing was changed."""


class DirLockedError(RuntimeError):
    """A directory is locked by another running dmscale process (the message names its PID)."""

    def __init__(self, message: str, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid
