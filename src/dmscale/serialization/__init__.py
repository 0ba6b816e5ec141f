"""Save / load of models (structure JSON + safetensors weights), atomic writes, owned directories, checkpoints.

``load`` never runs code from the files it reads (see ``SECURITY.md``): allowlisted classes only
(``trust=`` adds the caller's packages), functions from an explicit list, sizes checked against the
weights, and every refused file raises :class:`LoadError`.
"""

from .atomic import atomic_write_bytes, atomic_write_text, read_regular_file
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .dirs import (LOCK_FILE, MARKER_FILE, DirLock, atomic_directory, claim_dir, dir_kind, enclosing_dmscale_dir,
                   is_dmscale_dir, lock_dir, remove_dmscale_dir)
from .errors import DirLockedError, ForeignDirectoryError, LoadError, ModelNotFoundError
from .format import file_digest, load, read_structure, save

__all__ = ["save", "load", "read_structure", "LoadError", "ModelNotFoundError", "ForeignDirectoryError",
           "DirLockedError", "atomic_directory", "atomic_write_bytes", "atomic_write_text", "read_regular_file",
           "file_digest", "save_checkpoint", "load_checkpoint", "CheckpointError", "MARKER_FILE", "LOCK_FILE",
           "claim_dir", "dir_kind", "is_dmscale_dir", "enclosing_dmscale_dir", "lock_dir", "DirLock",
           "remove_dmscale_dir"]
