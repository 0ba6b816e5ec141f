"""Model sources for the command line (``--model``) and the Python API: :func:`load_model`.

=============================  ==================================================================
``spec``                       what it loads
=============================  ==================================================================
``pkg.module:factory``         imports the *user's* module and calls ``factory(**kwargs)``; the
                               result must be an ``nn.Module`` (``factory`` may be a class or a
                               dotted attribute such as ``Zoo.small``)
a ``dmscale.save`` directory   :func:`dmscale.load` (allowlisted classes only; ``trust`` names
                               more packages), or a run directory's ``model/``
``hf:NAME_OR_PATH``            a Hugging Face checkpoint through the ``transformers`` Auto classes
                               (``trust_remote_code`` is never set; a GGUF file is passed as
                               ``kwargs={"gguf_file": ...}``)
=============================  ==================================================================

Only ``module:factory`` runs code, and only code the user named; a saved directory or checkpoint
never runs code from the files it loads.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
import json
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch.nn as nn

__all__ = ["load_model", "model_kind", "parse_model_kwargs", "ModelSpecError", "HF_TASKS"]

_FACTORY = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")
# task -> transformers Auto class; None = chosen from config.architectures
HF_TASKS: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "image-classification": "AutoModelForImageClassification",
    "sequence-classification": "AutoModelForSequenceClassification",
    "base": "AutoModel",
}
_ARCH_SUFFIX = (("ForCausalLM", "causal-lm"), ("LMHeadModel", "causal-lm"),
                ("ForImageClassification", "image-classification"),
                ("ForSequenceClassification", "sequence-classification"))


class ModelSpecError(ValueError):
    """A ``--model`` value that cannot be turned into a model; the message names what is wrong."""


def parse_model_kwargs(kwargs: Mapping[str, Any] | str | None) -> dict[str, Any]:
    """``--model-kwargs`` as a dict: a mapping, a JSON object string, or None."""
    if kwargs is None:
        return {}
    if isinstance(kwargs, str):
        try:
            val = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as e:
            raise ModelSpecError(f"--model-kwargs {kwargs!r}: not valid JSON ({e.msg} at column {e.colno}); "
                                 'expected an object such as \'{"width": 64, "classes": 10}\'') from e
        if not isinstance(val, dict):
            raise ModelSpecError(f"--model-kwargs {kwargs!r}: expected a JSON object, got {type(val).__name__}")
        return val
    if not isinstance(kwargs, Mapping):
        raise ModelSpecError(f"model kwargs must be a mapping or a JSON string, got {type(kwargs).__name__}")
    return dict(kwargs)


def model_kind(spec: str | os.PathLike) -> str:
    """``factory``, ``dmscale`` (a save or run directory) or ``hf`` for a ``--model`` value (reads no weights)."""
    s = os.fspath(spec)
    if s.startswith("hf:"):
        return "hf"
    p = Path(s).expanduser()
    if p.exists():
        if _dmscale_dir(p) is not None:
            return "dmscale"
        if p.is_dir() and (p / "config.json").is_file():
            raise ModelSpecError(f"--model {s}: a Hugging Face checkpoint directory; write it as hf:{s}")
        raise ModelSpecError(f"--model {s}: not a model directory: no structure.json (dmscale.save) in it "
                             f"{'or in its model/' if p.is_dir() else ''} and no config.json (Hugging Face)")
    if _FACTORY.match(s):
        return "factory"
    raise ModelSpecError(f"--model {s!r}: no such file or directory, and not of the form 'package.module:factory' "
                         "or 'hf:NAME_OR_PATH'")


def _dmscale_dir(p: Path) -> Path | None:
    """The ``dmscale.save`` directory that p is or holds (a run directory's model/), else None."""
    if p.is_dir() and (p / "structure.json").is_file():
        return p
    if p.is_dir() and (p / "model" / "structure.json").is_file():
        return p / "model"
    return None


def _import(module: str, spec: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise ModelSpecError(f"--model {spec}: module {module!r} is not importable (no module named "
                                 f"{e.name!r}); install it or add its directory to PYTHONPATH") from e
        raise ModelSpecError(f"--model {spec}: importing {module!r} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ModelSpecError(f"--model {spec}: importing {module!r} failed: {type(e).__name__}: {e}") from e


def _from_factory(spec: str, kwargs: dict[str, Any]) -> nn.Module:
    module, qual = spec.split(":", 1)
    obj: Any = _import(module, spec)
    where = module
    for part in qual.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            close = difflib.get_close_matches(part, names, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else ""
            raise ModelSpecError(f"--model {spec}: {where!r} has no attribute {part!r}{hint}")
        obj = getattr(obj, part)
        where = f"{where}.{part}"
    if not callable(obj):
        raise ModelSpecError(f"--model {spec}: {where} is a {type(obj).__name__}, not a callable returning a model")
    if isinstance(obj, nn.Module):
        raise ModelSpecError(f"--model {spec}: {where} is a model instance; name a function or class that builds one")
    try:
        model = obj(**kwargs)
    except TypeError as e:
        try:
            sig = f"{qual}{inspect.signature(obj)}"
        except (TypeError, ValueError):
            sig = qual
        raise ModelSpecError(f"--model {spec}: calling {sig} with --model-kwargs {json.dumps(kwargs)} failed: {e}") from e
    if not isinstance(model, nn.Module):
        raise ModelSpecError(f"--model {spec}: {qual}(...) returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _load_dmscale(p: Path, trust: tuple[str, ...], device: str) -> nn.Module:
    from dmscale.serialization.format import load

    return load(p, device=device, trust=list(trust) or None)


def _hf_task(config: Any, task: str | None, spec: str) -> str:
    if task is not None:
        if task not in HF_TASKS:
            raise ModelSpecError(f"--model {spec}: task {task!r} unknown; choose one of {list(HF_TASKS)}")
        return task
    for arch in getattr(config, "architectures", None) or []:
        for suffix, t in _ARCH_SUFFIX:
            if str(arch).endswith(suffix):
                return t
    return "base"


def _load_hf(spec: str, kwargs: dict[str, Any], task: str | None, device: str) -> nn.Module:
    try:
        import transformers
    except ImportError as e:
        raise ModelSpecError(f"--model {spec}: needs transformers: pip install 'dmscale[hf]'") from e
    name = spec[len("hf:"):]
    if not name:
        raise ModelSpecError("--model hf: needs a checkpoint directory or hub name, e.g. hf:path/to/checkpoint")
    if kwargs.get("trust_remote_code"):
        raise ModelSpecError(f"--model {spec}: trust_remote_code is refused: dmscale never runs code from a checkpoint")
    kwargs = {k: v for k, v in kwargs.items() if k != "trust_remote_code"}
    p = Path(name).expanduser()
    if p.is_dir() and not (p / "config.json").is_file() and "gguf_file" not in kwargs:
        ggufs = sorted(x.name for x in p.glob("*.gguf"))
        hint = f' (it has {ggufs[0]}: pass --model-kwargs \'{{"gguf_file": "{ggufs[0]}"}}\')' if ggufs else ""
        raise ModelSpecError(f"--model {spec}: directory {p} is not a Hugging Face checkpoint: no config.json{hint}")
    src = str(p) if p.exists() else name
    cfg_kw = {"gguf_file": kwargs["gguf_file"]} if "gguf_file" in kwargs else {}
    try:
        config = transformers.AutoConfig.from_pretrained(src, trust_remote_code=False, **cfg_kw)
    except Exception as e:
        local = "" if p.exists() else " (no such local directory; a hub name needs network access)"
        raise ModelSpecError(f"--model {spec}: cannot read a Hugging Face config from {src!r}{local}: "
                             f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    if getattr(config, "auto_map", None):
        raise ModelSpecError(f"--model {spec}: the checkpoint needs its own Python code (auto_map in config.json); "
                             "dmscale never runs code from a checkpoint")
    auto = getattr(transformers, HF_TASKS[_hf_task(config, task, spec)])
    try:
        model = auto.from_pretrained(src, trust_remote_code=False, **kwargs)
    except Exception as e:
        raise ModelSpecError(f"--model {spec}: {auto.__name__}.from_pretrained({src!r}) failed: "
                             f"{type(e).__name__}: {e}") from e
    return model.to(device)


def load_model(spec: str | os.PathLike | nn.Module, kwargs: Mapping[str, Any] | str | None = None,
               trust: Iterable[str] = (), *, task: str | None = None, device: str = "cpu") -> nn.Module:
    """The model ``spec`` names (see the module docstring); an ``nn.Module`` is returned as it is.

    Args:
        spec: ``package.module:factory``, a ``dmscale.save`` (or run) directory, or ``hf:NAME_OR_PATH``.
        kwargs: keyword arguments (a mapping or a JSON object string): for the factory, or for
            ``from_pretrained`` with ``hf:``; not allowed with a saved directory.
        trust: extra packages whose classes a saved directory may name (passed to ``dmscale.load``).
        task: ``hf:`` only: ``causal-lm``, ``image-classification``, ``sequence-classification``
            or ``base``; default from the checkpoint's ``architectures``.
        device: where to put the loaded model.

    Raises:
        ModelSpecError: with a message naming the module, attribute, directory or value at fault.
    """
    if isinstance(spec, nn.Module):
        return spec
    s = os.fspath(spec)
    kw = parse_model_kwargs(kwargs)
    kind = model_kind(s)
    if kind == "factory":
        return _from_factory(s, kw).to(device)
    if kind == "hf":
        return _load_hf(s, kw, task, device)
    if kw:
        raise ModelSpecError(f"--model {s}: --model-kwargs apply to 'module:factory' and 'hf:' models, "
                             "not to a saved directory")
    if task is not None:
        raise ModelSpecError(f"--model {s}: task= applies to 'hf:' models only")
    d = _dmscale_dir(Path(s).expanduser())
    assert d is not None
    return _load_dmscale(d, tuple(trust), device)
