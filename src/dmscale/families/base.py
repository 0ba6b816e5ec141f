"""The family registry, the export context families work with, and the config check every export gets.

A :class:`Family` is what dmscale knows about one Hugging Face ``config.model_type`` that tracing
cannot infer: which module attributes hold sizes and what they mean ("num_heads of this
attention = its kept heads"), which config keys describe those sizes, and the bookkeeping Hugging
Face keeps outside the weights (KV-cache ``layer_idx``, per-layer ``layer_types``). After export
sliced the weights, export runs the model's family (or the generic fallback) and
then checks the edited config:

1. the config must load (``type(config).from_dict(config.to_dict())``, what :func:`dmscale.load`
   and ``from_pretrained`` do): otherwise :class:`~dmscale.ExportError` names the keys;
2. the config must rebuild the exported architecture (the model class built from it on the meta
   device has the export's parameter shapes and size attributes). When it cannot (sizes that
   differ per layer, heads x head_dim that the config derives from hidden_size, ...), the keys
   that describe one layer keep the supernet's values, ``config.dmscale_layer_sizes`` lists the
   real per-layer sizes and ``config.dmscale_inexact`` says why: the export is then stored with
   :func:`dmscale.save` (which rebuilds modules from their own attributes), not ``save_pretrained``.
"""

from __future__ import annotations

import copy
import sys
import warnings
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn as nn

from ..errors import ExportError
from ..trace.spaces import Space

if TYPE_CHECKING:
    from ..search import DMS

__all__ = ["Family", "ExportContext", "register_family", "unregister_family", "family_for", "registered_families",
           "start_export", "check_export_config", "config_describes_model", "hf_config",
           "config_mismatches", "INEXACT_KEYS", "register_post_export", "post_export_fixups"]

INEXACT_KEYS = ("dmscale_layer_sizes", "dmscale_inexact")

_FAMILIES: dict[str, "Family"] = {}


class Family:
    """Per-model-type knowledge for export (subclass it, or use :class:`~dmscale.families.common.Transformer`).

    ``model_types``: the ``config.model_type`` values this family handles. :meth:`update` runs on
    the exported model after its weights were sliced and removed blocks dropped; it sets module
    size attributes by meaning and edits ``ctx.config``, recording the per-layer config keys it
    wrote in ``ctx.layer_keys`` (restored to the supernet's values when the config cannot describe
    the export) and the real per-layer sizes in ``ctx.layer_sizes``.
    """

    model_types: tuple[str, ...] = ()

    def before_drop(self, ctx: "ExportContext") -> None:
        """Runs after slicing, before removed blocks are dropped (e.g. to move what a removed block owns)."""

    def update(self, ctx: "ExportContext") -> None:  # pragma: no cover - interface
        raise NotImplementedError

    def describe(self) -> str:
        """One line for the README's coverage table: what is searched."""
        return ""


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Use ``family`` for every model whose ``config.model_type`` is in ``family.model_types``."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family: expected a dmscale.families.Family, got {type(family).__name__}")
    if not family.model_types:
        raise ValueError(f"register_family: {type(family).__name__}.model_types is empty")
    taken = [t for t in family.model_types if t in _FAMILIES and _FAMILIES[t] is not family]
    if taken and not replace:
        raise ValueError(f"model_type {taken[0]!r} already has a family ({type(_FAMILIES[taken[0]]).__name__}); "
                         "pass replace=True to override it")
    for t in family.model_types:
        _FAMILIES[t] = family
    return family


def unregister_family(model_type: str) -> None:
    """Remove the family registered for ``model_type``."""
    if model_type not in _FAMILIES:
        raise KeyError(f"no family registered for model_type {model_type!r}")
    del _FAMILIES[model_type]


def registered_families() -> dict[str, Family]:
    """A copy of the table: model_type -> family."""
    return dict(_FAMILIES)


def hf_config(model: nn.Module) -> Any:
    """The Hugging Face config of a ``PreTrainedModel`` (None for any other module)."""
    if "transformers" not in sys.modules:  # an HF model implies transformers was imported; don't pay for it
        return None
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is optional
        return None
    return getattr(model, "config", None) if isinstance(model, PreTrainedModel) else None


def family_for(model: nn.Module) -> Family | None:
    """The family of a Hugging Face model (by ``config.model_type``), or None."""
    cfg = hf_config(model)
    return _FAMILIES.get(getattr(cfg, "model_type", None)) if cfg is not None else None


# --------------------------------------------------------------------------- context
class ExportContext:
    """What a family sees: the search, the original model, the export, and the sizes export kept.

    Module and parameter names are those of the original model unless a method says otherwise;
    :meth:`layers` maps the layers of a stack in the export to their original indices.
    """

    def __init__(self, dms: "DMS", exported: nn.Module, keep_of: Callable[[Space], torch.Tensor | None],
                 depth_keep: dict[str, torch.Tensor]) -> None:
        self.dms = dms
        self.model = dms.model
        self.exported = exported
        self.config = getattr(exported, "config", None)
        self.orig_config = getattr(dms.model, "config", None)
        self.trace = dms.trace
        self._keep_of = keep_of
        self.layer_keys: set[str] = set()  # per-layer config keys the family wrote
        self.layer_sizes: list[dict[str, Any]] = []  # the real sizes of every layer
        self.nonuniform: list[str] = []  # per-layer keys whose values differ between layers
        self.inexact: list[str] = []  # reasons the config cannot describe the export
        self.family: Family | None = None
        self._dropped: dict[str, set[int]] = {}
        for g in dms.groups:
            if g.kind != "depth":
                continue
            keep = depth_keep[g.key]
            for b, k in zip(g.blocks, keep.tolist()):
                if not k and not b.declared:
                    self._dropped.setdefault(b.container, set()).add(b.index)

    # -- sizes
    def kept(self, space: Space) -> int:
        """Number of elements export kept of a (possibly composite) space."""
        k = self._keep_of(space)
        return space.find().size if k is None else int(k.sum())

    def param_space(self, param: str, dim: int) -> Space | None:
        """The space of dim ``dim`` of the original model's parameter or buffer ``param``."""
        rec = self.trace.params.get(param)
        return rec.dims[dim] if rec is not None and dim < len(rec.dims) else None

    def tagged_size(self, param: str, dim: int, tag: str) -> int | None:
        """Kept size of the first part of ``param``'s dim ``dim`` tagged ``tag`` (e.g. 'head_dim'), or None."""
        s = self.param_space(param, dim)
        if s is None:
            return None
        for leaf in s.leaves():
            if tag in leaf.tags:
                return self.kept(leaf)
        return None

    # -- layers
    def dropped(self, container: str) -> set[int]:
        """Original indices of the blocks of ``container`` that export removed."""
        return set(self._dropped.get(container, ()))

    def layers(self, container: str) -> list[tuple[int, nn.Module]]:
        """(original index, exported module) for every layer of the ModuleList ``container`` the export kept."""
        mods = dict(self.exported.named_modules())
        cont = mods.get(container)
        if not isinstance(cont, (nn.ModuleList, nn.Sequential)):
            return []
        n_old = len(dict(self.model.named_modules())[container])
        kept = [i for i in range(n_old) if i not in self.dropped(container)]
        if len(kept) != len(cont):
            raise ExportError(f"'{container}': the export has {len(cont)} layers but the depth masks keep "
                              f"{len(kept)} of {n_old}")
        return list(zip(kept, cont))

    def find_stacks(self, suffix: str) -> list[str]:
        """Names of the original model's ModuleLists named ``suffix`` or ending in ``.suffix`` (in order)."""
        return [name for name, mod in self.model.named_modules()
                if isinstance(mod, (nn.ModuleList, nn.Sequential)) and (name == suffix or name.endswith("." + suffix))]

    # -- config
    def set_config(self, key: str, value: Any, per_layer: bool = False, create: bool = False) -> None:
        """Write ``config.key`` (when the config has that key, or ``create``); ``per_layer`` keys are restored
        to the supernet's values when the config cannot describe the export."""
        if self.config is None or not (create or hasattr(self.config, key)):
            return
        setattr(self.config, key, value)
        if per_layer:
            self.layer_keys.add(key)


_FIXUPS: list[tuple[Callable[[nn.Module], bool], Callable[[Any, nn.Module], None]]] = []


def register_post_export(applies: Callable[[nn.Module], bool], fixup: Callable[[Any, nn.Module], None]) -> None:
    """The pre-families hook (``dmscale.adapters.register_post_export``, deprecated): ``fixup(dms, exported)``
    runs on exports of models for which ``applies(original_model)`` is true, after the family's updates."""
    _FIXUPS.append((applies, fixup))


def post_export_fixups(dms: Any, exported: nn.Module) -> None:
    """Run the fix-ups registered with :func:`register_post_export` that apply to this model."""
    for applies, fixup in _FIXUPS:
        if applies(dms.model):
            fixup(dms, exported)


def set_attrs(module: nn.Module | None, values: dict[str, Any]) -> None:
    """Set the given size attributes on ``module`` where it has them as ints (by meaning, never by value)."""
    if module is None:
        return
    for attr, v in values.items():
        if v is not None and type(getattr(module, attr, None)) is int:
            setattr(module, attr, int(v))


# --------------------------------------------------------------------------- the driver
def start_export(dms: "DMS", exported: nn.Module, keep_of: Callable[[Space], torch.Tensor | None],
                 depth_keep: dict[str, torch.Tensor]) -> ExportContext:
    """The context for one export (after slicing, before blocks are dropped); runs the family's ``before_drop``.

    ``ctx.family`` is the model's family (None: the caller updates reshape ints by value).
    """
    ctx = ExportContext(dms, exported, keep_of, depth_keep)
    ctx.family = family_for(dms.model)  # None: dmscale.families.generic.update_export runs the fallback
    if ctx.family is not None:
        ctx.family.before_drop(ctx)
    return ctx


def check_export_config(ctx: ExportContext) -> None:
    """Mark the exported HF config exact or inexact; raise :class:`~dmscale.ExportError` when it would not load."""
    if ctx.config is not None and hf_config(ctx.exported) is not None:
        _check_config(ctx, ctx.family)


def _changed_keys(old: dict, new: dict) -> list[str]:
    return [k for k in new if k not in INEXACT_KEYS and old.get(k) != new[k]]


def _check_config(ctx: ExportContext, fam: Family | None) -> None:
    """Mark the config exact or inexact (see the module docstring); raise when it would not load."""
    cfg, orig = ctx.config, ctx.orig_config
    for k in INEXACT_KEYS:
        if k in cfg.__dict__:
            delattr(cfg, k)
    reasons = list(dict.fromkeys(ctx.inexact))  # one line per reason, not per layer
    if ctx.nonuniform:
        reasons.append("sizes differ between layers: " + ", ".join(sorted(set(ctx.nonuniform))))
    if not reasons:
        reasons = config_mismatches(ctx.exported, cfg, ctx)
    if reasons:
        for k in ctx.layer_keys:  # keys of one layer: the supernet's values (the config still loads)
            if hasattr(orig, k):
                setattr(cfg, k, copy.deepcopy(getattr(orig, k)))
            else:
                delattr(cfg, k)
        cfg.dmscale_layer_sizes = ctx.layer_sizes
        cfg.dmscale_inexact = "; ".join(reasons)
    try:
        type(cfg).from_dict(cfg.to_dict())
    except Exception as exc:
        if _keep_supernet_keys(ctx, fam, exc, reasons):
            return
        changed = _changed_keys(orig.to_dict(), cfg.to_dict())
        name = type(fam).__name__ if fam is not None else "generic Hugging Face fallback"
        hint = _divisor_hint(ctx)
        raise ExportError(f"the exported model's config would not load: {type(cfg).__name__} rejects the edited "
                          f"keys {', '.join(f'{k}={cfg.to_dict()[k]!r}' for k in changed)} ({_first_line(exc)}) "
                          f"[{name}].{hint}") from exc


def _loads(cfg: Any) -> bool:
    try:
        type(cfg).from_dict(cfg.to_dict())
        return True
    except Exception:
        return False


def _keep_supernet_keys(ctx: ExportContext, fam: Family | None, exc: Exception, reasons: list[str]) -> bool:
    """A config the class's own validation rejects (e.g. ``hidden_size`` not a multiple of the heads): give the
    fewest edited size keys back their supernet values (model width first) until it loads, and mark it inexact.

    The exported module is exact either way (it computes what the hard-masked supernet computes); only the
    config stops describing it, so the export is stored with :func:`dmscale.save`. False: nothing helps."""
    cfg, orig = ctx.config, ctx.orig_config
    old = orig.to_dict()
    changed = _changed_keys(old, cfg.to_dict())
    hidden = tuple(getattr(fam, "hidden_keys", ())) + ("hidden_size", "d_model", "n_embd", "embed_dim", "dim")
    structural = ("num_hidden_layers", "num_layers", "n_layer", "n_layers", "layer_types")  # block lists follow these
    order = [k for k in changed if k in hidden] + [k for k in changed if k not in hidden and k not in structural]
    edited: dict[str, Any] = {}
    for k in order:
        if not hasattr(orig, k):
            continue
        edited[k] = copy.deepcopy(getattr(cfg, k))
        setattr(cfg, k, copy.deepcopy(getattr(orig, k)))
        if _loads(cfg):
            reasons.append(f"{type(cfg).__name__} rejects the exported sizes ({_first_line(exc)}): the config keeps "
                           f"the supernet's {', '.join(edited)} (exported: "
                           f"{', '.join(f'{k_}={v!r}' for k_, v in edited.items())})")
            cfg.dmscale_layer_sizes = ctx.layer_sizes
            cfg.dmscale_inexact = "; ".join(reasons)
            warnings.warn(f"dmscale: {reasons[-1]}. The export is exact; store it with dmscale.save (save_pretrained "
                          f"would describe the supernet's sizes).{_divisor_hint(ctx)}", stacklevel=4)
            return _loads(cfg)
    for k, v in edited.items():  # nothing helped: the edited values again (the error names them)
        setattr(cfg, k, v)
    return False


def _first_line(exc: Exception) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[-1] if lines else type(exc).__name__


def _divisor_hint(ctx: ExportContext) -> str:
    """Name the hidden-size group and a divisor that keeps hidden_size a multiple of the heads."""
    heads = getattr(ctx.orig_config, "num_attention_heads", None)
    hidden = next((g for g in ctx.dms.groups if g.kind == "width" and
                   any(m.endswith(("embed_tokens.weight:1", "word_embeddings.weight:1", "wte.weight:1",
                                   "embed_in.weight:1")) for m in g.members)), None)
    if hidden is None or not isinstance(heads, int):
        return ""
    return (f" To keep the hidden size a multiple of {heads}: DMS(..., bounds={{'{hidden.name}': "
            f"{{'divisor': {heads}}}}}), or prune_width=False for it.")


def config_mismatches(exported: nn.Module, cfg: Any, ctx: ExportContext | None = None) -> list[str]:
    """Where the model class built from ``cfg`` (on the meta device) differs from ``exported`` (empty: it
    describes it): parameter / buffer shapes, size attributes, and buffers the config recomputes."""
    try:
        with torch.device("meta"):
            rebuilt = type(exported)(copy.deepcopy(cfg))
    except Exception as exc:  # the config does not even build the class
        return [f"{type(exported).__name__}(config) fails: {_first_line(exc)}"]
    out: list[str] = []
    new_t = {k: tuple(v.shape) for k, v in exported.state_dict().items()}
    ref_t = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    for k in sorted(set(new_t) | set(ref_t)):
        if new_t.get(k) != ref_t.get(k):
            out.append(f"{k}: export {new_t.get(k)}, from config {ref_t.get(k)}")
    ref_mods = dict(rebuilt.named_modules())
    orig_mods = dict(ctx.model.named_modules()) if ctx is not None else {}
    for name, mod in exported.named_modules():
        ref = ref_mods.get(name)
        if ref is None or type(ref) is not type(mod):
            if ref is not None:
                out.append(f"{name}: {type(mod).__name__} in the export, {type(ref).__name__} from config")
            continue
        for attr, v in vars(mod).items():  # sizes and scales (dropout rates do not change the function)
            if attr.startswith("_") or type(v) not in (int, float, tuple) or "drop" in attr:
                continue
            r = getattr(ref, attr, None)
            if type(r) is type(v) and r != v:
                out.append(f"{name}.{attr}: export {v!r}, from config {r!r}")
        old = orig_mods.get(name)
        for bname in getattr(mod, "_non_persistent_buffers_set", ()):  # recomputed from the config on load
            b, ob = mod._buffers.get(bname), getattr(old, bname, None) if old is not None else None
            if isinstance(b, torch.Tensor) and isinstance(ob, torch.Tensor) and b.shape != ob.shape:
                out.append(f"{name}.{bname}: a sliced buffer the config would recompute")
    return out[:8]


def config_describes_model(model: nn.Module) -> bool:
    """True when ``model.config`` rebuilds ``model`` (an export whose config dmscale did not mark inexact)."""
    cfg = hf_config(model)
    return cfg is not None and not any(k in cfg.__dict__ for k in INEXACT_KEYS)


def iter_module_names(model: nn.Module, suffixes: Iterable[str]) -> list[str]:
    """Names of modules equal to or ending in ``.suffix`` for any of ``suffixes``."""
    sfx = tuple(suffixes)
    return [n for n, _ in model.named_modules() if any(n == s or n.endswith("." + s) for s in sfx)]
