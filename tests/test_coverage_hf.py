"""The Hugging Face part of the coverage matrix (issue 11): every family, built from a tiny config.

Each model is searched for 40 steps with Adam (structure and weights) under a FLOPs target,
projected onto the budget (``dmscale.budget.project``) and exported. Checks, one test each:

- the export equals the hard-masked supernet;
- the budget is met within 1% (the projection lands at or below the target);
- every expected dimension (heads, FFN, hidden, layers) is a searched group, and an export that
  prunes only that dimension is exact;
- the ``dmscale.save`` / ``dmscale.load`` round trip gives identical outputs;
- causal LMs: greedy ``generate`` with the KV cache equals decoding without it;
- the exported config loads; where the family's config can describe a uniform export, a plain
  ``save_pretrained`` / ``from_pretrained`` round trip rebuilds it exactly.

A budget missed by more than 1% is an expected failure only when the projection is provably the
nearest point on its path (a tiny config's coarsest step, e.g. one head of four, is larger than 1%);
a check that waits for another part of issue 11 is ``xfail(strict=True)`` with the reason.
"""

from __future__ import annotations

import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import torch

import dmscale
import hf_models as H
from dmscale.budget import project

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")

FFN = r"mlp|intermediate|ffn|DenseReluDense|dense_h_to_4h|c_fc|fc_in|\.fc1$|gate_up|up_proj|pwconv1|expand_conv"
HIDDEN = r"embed|wte|word_embeddings|patch_embed|embeddings\.convolution|conv1|projection"


@dataclass
class Case:
    name: str
    build: Callable[[], tuple]
    dims: tuple[str, ...]  # expected searchable: heads, ffn, hidden, layers
    causal: bool = False
    search: dict[str, Any] = field(default_factory=dict)  # extra DMS options for the 40-step search
    xfail: dict[str, str] = field(default_factory=dict)  # check (or 'searchable-<dim>') -> reason
    uniform: dict[str, Any] | None = None  # DMS options for the uniform HF export (None: not describable)


ALL = ("heads", "ffn", "hidden", "layers")
CASES = [
    Case("bert", H.bert, ALL, uniform={}),
    Case("roberta", H.roberta, ALL, uniform={}),
    Case("distilbert", H.distilbert, ALL, uniform={}),
    # T5 and BART return the encoder's last hidden state: the hidden size is a model output, not searched
    Case("t5", H.t5, ("heads", "ffn", "layers"), uniform={"prune_heads": False}),
    Case("phi3", H.phi3, ALL, causal=True, uniform={}),
    # Gemma scales embeddings by sqrt(hidden_size): a config with a pruned hidden size would rebuild another scale
    Case("gemma2", H.gemma2, ALL, causal=True,
         uniform={"exclude": ["model.embed_tokens"]}),
    Case("mistral", H.mistral, ALL, causal=True, uniform={}),
    Case("qwen2_moe", H.qwen2_moe, ALL, causal=True, uniform={}),
    Case("opt", H.opt, ALL, causal=True, uniform={}),
    Case("gpt_neox", H.gpt_neox, ALL, causal=True, uniform={}),
    Case("swin", H.swin, ALL),
    Case("efficientnet", H.efficientnet, ("ffn", "hidden", "layers")),
    Case("convnextv2", H.convnextv2, ("ffn", "hidden", "layers")),
    Case("convnext", H.convnext, ("ffn", "hidden", "layers")),
    Case("dinov2", H.dinov2, ALL),
    Case("clip_vision", H.clip_vision, ("heads", "ffn", "layers"),
         uniform={"prune_heads": False}),
    # beyond the list: families that reuse the same patterns
    Case("llama", H.llama, ALL, causal=True, uniform={}),
    Case("qwen2", H.qwen2, ALL, causal=True, uniform={}),
    Case("qwen3", H.qwen3, ALL, causal=True, uniform={}),
    Case("gemma", H.gemma, ALL, causal=True, uniform={"exclude": ["model.embed_tokens"]}),
    Case("gpt2", H.gpt2, ALL, causal=True, uniform={}),
    Case("gptj", H.gptj, ALL, causal=True, uniform={}),
    Case("falcon", H.falcon, ALL, causal=True),
    Case("falcon_grouped", H.falcon_grouped, ALL, causal=True),
    # with ALiBi the rotary table is computed but unused: its buffer-only dim would be a group of its own
    Case("falcon_alibi", H.falcon_alibi, ("ffn", "hidden", "layers"), causal=True,
         search={"exclude": ["transformer.rotary_emb"]}),
    Case("bloom", H.bloom, ("ffn", "hidden", "layers"), causal=True),
    Case("mpt", H.mpt, ("ffn", "hidden", "layers"), causal=True),
    Case("mixtral", H.mixtral, ALL, causal=True, uniform={}),
    Case("qwen3_moe", H.qwen3_moe, ALL, causal=True, uniform={}),
    Case("olmoe", H.olmoe, ALL, causal=True, uniform={}),
    Case("electra", H.electra, ALL, uniform={}),
    Case("xlm_roberta", H.xlm_roberta, ALL, uniform={}),
    Case("vit", H.vit, ALL, uniform={}),
    Case("vit_mae", H.vit_mae, ("heads", "ffn", "layers")),
    Case("whisper_encoder", H.whisper_encoder, ALL),
    Case("bart", H.bart, ("heads", "ffn", "layers")),
    Case("segformer", H.segformer, ALL),
    Case("mobilevit", H.mobilevit, ALL),
    Case("swinv2", H.swinv2, ALL),
    Case("deit", H.deit, ALL, uniform={}),
    Case("beit", H.beit, ALL, uniform={}),
    Case("stablelm", H.stablelm, ALL, causal=True, uniform={}),
    # no family file: the generic fallback (size attributes by value) covers them
    Case("regnet", H.regnet, ("hidden", "layers")),
    # heads folded into the batch dim (view(-1, seq, head_dim)) before a bmm: the matmul rule tags them heads
    Case("deberta_v2", H.deberta_v2, ALL, uniform={}),
    Case("deberta_v3", H.deberta_v3, ALL, uniform={}),
    Case("deberta", H.deberta, ALL, uniform={}),
    Case("mobilebert", H.mobilebert, ALL),
]
BY_NAME = {c.name: c for c in CASES}
TARGET = dmscale.Target(flops=0.5)


def _first(out: Any) -> torch.Tensor:
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if hasattr(out, "to_tuple"):
        out = out.to_tuple()
    return out[0] if isinstance(out, (tuple, list)) else out


def _outputs(model, args, kwargs) -> list[torch.Tensor]:
    out = model(*args, **kwargs)
    flat = out.to_tuple() if hasattr(out, "to_tuple") else out
    flat = flat if isinstance(flat, (tuple, list)) else (flat,)
    return [t for t in flat if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _dms(case: Case, **options) -> tuple[dmscale.DMS, tuple, dict]:
    model, args, kwargs = H.build(case.build)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # unsupported-op and fixed-expert-count notes are tested elsewhere
        dms = dmscale.DMS(model, args, TARGET, total_steps=40, example_kwargs=kwargs, **options)
    return dms, args, kwargs


@functools.lru_cache(maxsize=None)
def searched(name: str) -> dict[str, Any]:
    """40 steps of DMS (Adam on structure and weights), projection onto the budget, export."""
    case = BY_NAME[name]
    dms, args, kwargs = _dms(case, **case.search)
    with torch.no_grad():
        target = _first(dms.model(*args, **kwargs)).detach()
    target = torch.randn(target.shape, generator=torch.Generator().manual_seed(5))
    opt = torch.optim.Adam([{"params": dms.weight_parameters(), "lr": 1e-3},
                            {"params": dms.structure_parameters(), "lr": 0.05}])
    for _ in range(40):
        loss = torch.nn.functional.mse_loss(_first(dms.model(*args, **kwargs)), target)
        opt.zero_grad()
        dms.loss(loss).backward()
        opt.step()
        dms.step()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proj = project(dms)
    exported = dms.export()
    return {"dms": dms, "exported": exported, "projection": proj, "args": args, "kwargs": kwargs}


def _params(check: str, cases=CASES, extra=()):
    out = []
    for c in cases:
        for suffix in extra or ("",):
            key = f"{check}-{suffix}" if suffix else check
            marks = [pytest.mark.xfail(strict=True, reason=c.xfail[key])] if key in c.xfail else []
            out.append(pytest.param(c.name, *((suffix,) if suffix else ()), marks=marks,
                                    id=f"{c.name}-{suffix}" if suffix else c.name))
    return out


# ------------------------------------------------------------------ the checks
@pytest.mark.parametrize("name", _params("export"))
def test_export_equals_hard_masked_supernet(name):
    r = searched(name)
    dms, ex = r["dms"], r["exported"]
    assert type(ex) is dms.model_class
    with torch.no_grad(), dms.hard():
        ref = _outputs(dms.model, r["args"], r["kwargs"])
    got = _outputs(ex, r["args"], r["kwargs"])
    assert len(ref) == len(got)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, atol=1e-4 * max(1.0, float(a.abs().max())), rtol=1e-4)
    assert sum(p.numel() for p in ex.parameters()) < sum(p.numel() for p in dms.model.parameters())


@pytest.mark.parametrize("name", _params("budget"))
def test_budget_met_within_one_percent(name):
    """Within 1% of the target; a tiny config whose coarsest step is larger (one head of four is ~10% of
    the FLOPs) is reported as an expected miss when no point of the projection's path is closer (checked
    by :func:`test_projection_is_the_nearest_feasible_point`)."""
    proj = searched(name)["projection"]
    assert proj.after <= TARGET.fraction * (1 + 1e-9), str(proj)
    if abs(proj.error) > 0.01:
        pytest.xfail(f"tiny config too coarse for 1%: {proj} (the next step of the common offset exceeds the "
                     "target; budget part of issue 11)")


@pytest.mark.parametrize("name", [c.name for c in CASES])
def test_projection_is_the_nearest_feasible_point(name):
    """Never above the target; a slightly larger common offset would go over it (nothing closer on its path)."""
    r = searched(name)
    dms, proj = r["dms"], r["projection"]
    assert proj.after <= TARGET.fraction * (1 + 1e-9), str(proj)
    gs = [g for g in dms.groups if g.kind != "depth"]
    if not gs:
        return
    from dmscale.budget import hard_fraction

    saved = {g.key: dms.space.ratio(g).detach().clone() for g in gs}
    try:
        with torch.no_grad():
            for g in gs:
                dms.space.ratio(g).copy_(torch.clamp(saved[g.key] + 1e-3, g.min_ratio(), g.bounds.max_ratio))
            up = hard_fraction(dms, TARGET.kind)
        assert up > TARGET.fraction or up == proj.after or all(float(saved[g.key]) >= g.bounds.max_ratio for g in gs)
    finally:
        with torch.no_grad():
            for g in gs:
                dms.space.ratio(g).copy_(saved[g.key])


@pytest.mark.parametrize("name", _params("counted"))
def test_export_is_counted_as_projected(name):
    """``dmscale.count`` of the export is the hard resource the projection aimed at."""
    r = searched(name)
    counted = dmscale.count(r["exported"], r["args"], r["kwargs"])["flops"] / r["dms"].resources.full["flops"]
    assert counted == pytest.approx(r["projection"].after, rel=0.01, abs=1e-3)


def _groups_for(dms, dim: str) -> list:
    if dim == "heads":
        return [g for g in dms.groups if g.kind == "heads"]
    if dim == "layers":
        return [g for g in dms.groups if g.kind == "depth"]
    pat = FFN if dim == "ffn" else HIDDEN
    return [g for g in dms.groups if g.kind == "width" and re.search(pat, g.name)
            and not (dim == "hidden" and re.search(FFN, g.name))]


@pytest.mark.parametrize("name,dim", [p for c in CASES for p in _params("searchable", [c], c.dims)])
def test_dimension_is_searchable_and_exports_exactly(name, dim):
    case = BY_NAME[name]
    dms, args, kwargs = _dms(case, **({} if dim == "hidden" else case.search))
    groups = _groups_for(dms, dim)
    assert groups, f"no {dim} group among {[g.name for g in dms.groups]}"
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for g in dms.groups:
            dms.space.importance(g).add_(torch.rand(g.size, generator=gen))
            dms.space.ratio(g).fill_(0.5 if g in groups else 1.0)
    ex = dms.export()  # checked against the hard-masked supernet
    kept = dms.kept()
    # half of one block rounds to that block: a stage of one block (MobileViT's first) keeps it
    assert all(kept[g.name][1] < g.size for g in groups if g.size > 1)
    assert any(kept[g.name][1] < g.size for g in groups)
    assert sum(p.numel() for p in ex.parameters()) < sum(p.numel() for p in dms.model.parameters()) or dim == "layers"


@pytest.mark.parametrize("name", _params("roundtrip"))
def test_save_load_round_trip_is_exact(name, tmp_path):
    r = searched(name)
    ex = r["exported"]
    dmscale.save(ex, tmp_path / "m")
    loaded = dmscale.load(tmp_path / "m")
    assert type(loaded) is type(ex)
    with torch.no_grad():
        for a, b in zip(_outputs(ex, r["args"], r["kwargs"]), _outputs(loaded, r["args"], r["kwargs"])):
            assert torch.equal(a, b)


def _generate(model, ids, use_cache: bool, n: int = 6):
    model.generation_config.eos_token_id = None  # decode all n tokens
    return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0,
                          attention_mask=torch.ones_like(ids))


@pytest.mark.parametrize("name", _params("generate", [c for c in CASES if c.causal]))
def test_generation_with_kv_cache_equals_without(name):
    r = searched(name)
    ex, ids = r["exported"], r["args"][0]
    with torch.no_grad():
        cached = _generate(ex, ids, True)
        plain = _generate(ex, ids, False)
    assert cached.shape == (ids.shape[0], ids.shape[1] + 6)
    assert torch.equal(cached, plain)


@pytest.mark.parametrize("name", _params("config"))
def test_exported_config_loads(name):
    ex = searched(name)["exported"]
    cfg = ex.config
    again = type(cfg).from_dict(cfg.to_dict())
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("name", _params("uniform", [c for c in CASES if c.uniform is not None]))
def test_uniform_export_round_trips_through_save_pretrained(name, tmp_path):
    case = BY_NAME[name]
    dms, args, kwargs = _dms(case, **case.uniform)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():  # the same ratio in every layer: the same kept counts, which a config can hold
        for g in dms.groups:
            dms.space.importance(g).add_(torch.rand(g.size, generator=gen))
            dms.space.ratio(g).fill_(0.5)
    H.assert_pretrained_round_trip(dms.export(), args, kwargs, tmp_path)
