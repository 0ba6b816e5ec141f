"""Save / load of models (structure JSON + safetensors weights), atomic writes, checkpoints."""

from .checkpoint import load_checkpoint, save_checkpoint
from .format import atomic_directory, atomic_write_bytes, atomic_write_text, file_digest, load, read_structure, save

__all__ = ["save", "load", "read_structure", "atomic_directory", "atomic_write_bytes", "atomic_write_text",
           "file_digest", "save_checkpoint", "load_checkpoint"]
