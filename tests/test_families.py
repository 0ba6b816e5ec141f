"""Model families (``dmscale.families``): attributes by meaning, config edits and checks, per-family fixes."""

from __future__ import annotations

import warnings

import pytest
import torch

import dmscale
import hf_models as H
from dmscale.families import (Family, config_describes_model, family_for, register_family, registered_families,
                              unregister_family)
from dmscale.families.common import llama_like

transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.usefixtures("one_thread")


def _dms(model, args, kwargs=None, target=0.6, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return dmscale.DMS(model, args, dmscale.Target(flops=target), total_steps=10, example_kwargs=kwargs or {},
                           **kw)


@torch.no_grad()
def _force(dms, ratios: dict[str, float] | None = None, default: float = 1.0, seed: int = 2):
    """Random importance; ratio per group (by name prefix match), ``default`` for the others."""
    gen = torch.Generator().manual_seed(seed)
    for g in dms.groups:
        dms.space.importance(g).add_(torch.rand(g.size, generator=gen))
        r = next((v for k, v in (ratios or {}).items() if g.name.startswith(k) or k == g.kind), default)
        dms.space.ratio(g).fill_(r)


def _greedy(model, ids, use_cache, n=5):
    model.generation_config.eos_token_id = None
    return model.generate(ids, max_new_tokens=n, do_sample=False, use_cache=use_cache, pad_token_id=0,
                          attention_mask=torch.ones_like(ids))


# ------------------------------------------------------------------ registry
def test_registry_and_lookup():
    fams = registered_families()
    for t in ("llama", "bert", "t5", "phi3", "qwen2_moe", "gpt_neox", "swin", "clip_vision_model", "xlm-roberta"):
        assert t in fams and isinstance(fams[t], Family) and fams[t].describe()
    model, _, _ = H.build(H.llama)
    assert family_for(model) is fams["llama"]
    assert family_for(torch.nn.Linear(2, 2)) is None
    with pytest.raises(ValueError, match="already has a family"):
        register_family(llama_like("llama"))
    with pytest.raises(ValueError, match="model_types is empty"):
        register_family(Family())
    with pytest.raises(TypeError):
        register_family(object())


def test_a_new_family_is_one_registration():
    """A model type dmscale does not know, Llama-shaped: one ``register_family`` call covers it."""
    from transformers import LlamaConfig, LlamaForCausalLM

    class TinyConfig(LlamaConfig):
        model_type = "tiny_llama_test"

    class TinyForCausalLM(LlamaForCausalLM):
        config_class = TinyConfig

    torch.manual_seed(0)
    model = TinyForCausalLM(TinyConfig(vocab_size=H.VOCAB, **H.DECODER)).eval()
    assert family_for(model) is None
    register_family(llama_like("tiny_llama_test"))
    try:
        dms = _dms(model, (H.ids(),))
        _force(dms, {"heads": 0.5, "model.layers.0.mlp": 0.5, "model.layers.1.mlp": 0.5})
        ex = dms.export()
        attn = ex.model.layers[0].self_attn
        assert (attn.num_key_value_groups, attn.head_dim) == (2, 8)
        assert (ex.config.num_attention_heads, ex.config.num_key_value_heads, ex.config.intermediate_size) == (2, 1, 32)
        assert config_describes_model(ex)
    finally:
        unregister_family("tiny_llama_test")
    assert "tiny_llama_test" not in registered_families()


# ------------------------------------------------------------------ attributes by meaning
def test_rotary_dim_equal_to_head_count_is_not_rewritten():
    """GPT-NeoX with rotary_ndims == num_heads == 4: pruning heads changes head counts, never rotary_ndims."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(vocab_size=H.VOCAB, hidden_size=64, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, rotary_pct=0.25,
                                             max_position_embeddings=32)).eval()
    assert model.gpt_neox.layers[0].attention.rotary_ndims == 4
    dms = _dms(model, (H.ids(),))
    _force(dms, {"heads": 0.5})
    ex = dms.export()
    attn = ex.gpt_neox.layers[0].attention
    assert attn.rotary_ndims == 4 and attn.head_size == 16
    assert attn.query_key_value.out_features == 2 * 3 * 16
    assert not config_describes_model(ex) and "head_dim" in ex.config.dmscale_inexact
    assert ex.config.num_attention_heads == 4  # the config keeps the supernet's value: it still loads
    with torch.no_grad():
        assert torch.equal(_greedy(ex, H.ids(1, 8), True), _greedy(ex, H.ids(1, 8), False))


def test_bert_all_head_size_follows_the_kept_heads(tmp_path):
    model, args, kw = H.build(H.bert)
    dms = _dms(model, args)
    _force(dms, {"heads": 0.5})
    ex = dms.export()
    att = ex.bert.encoder.layer[0].attention.self
    assert (att.num_attention_heads, att.attention_head_size, att.all_head_size) == (2, 8, 16)
    assert att.query.out_features == 16
    sizes = ex.config.dmscale_layer_sizes
    assert [s["num_attention_heads"] for s in sizes] == [2, 2]
    dmscale.save(ex, tmp_path / "m")
    loaded = dmscale.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(*args).logits, ex(*args).logits)


# ------------------------------------------------------------------ config checks
def test_config_the_class_rejects_keeps_the_supernet_key_and_is_marked_inexact(tmp_path):
    """Llama validates hidden_size % num_attention_heads: 30 hidden channels with 4 heads cannot be a config.
    The export is still exact; its config keeps hidden_size=32, says why, and a warning suggests a divisor."""
    model, args, _ = H.build(H.llama)
    dms = _dms(model, args)
    _force(dms, {"model.embed_tokens": 30 / 32})
    assert dms.kept()["model.embed_tokens"] == (32, 30)
    with pytest.warns(UserWarning, match=r"hidden_size=30(.|\n)*dmscale.save(.|\n)*divisor"):
        ex = dms.export()
    assert ex.config.hidden_size == 32
    assert "hidden_size=30" in ex.config.dmscale_inexact
    assert not config_describes_model(ex)
    type(ex.config).from_dict(ex.config.to_dict())
    with torch.no_grad(), dms.hard():
        ref = dms.model(*args).logits
    torch.testing.assert_close(ex(*args).logits, ref, atol=1e-5, rtol=1e-5)
    dmscale.save(ex, tmp_path / "m")
    loaded = dmscale.load(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(*args).logits, ex(*args).logits)


def test_divisor_bound_keeps_the_config_exact():
    model, args, _ = H.build(H.llama)
    dms = _dms(model, args, bounds={"model.embed_tokens": {"divisor": 4}})
    _force(dms, {"model.embed_tokens": 30 / 32})
    assert dms.kept()["model.embed_tokens"][1] % 4 == 0
    ex = dms.export()
    assert ex.config.hidden_size == dms.kept()["model.embed_tokens"][1]
    assert not getattr(ex.config, "dmscale_inexact", None)


def test_uniform_sizes_describe_the_export_and_nonuniform_ones_are_listed():
    model, args, _ = H.build(H.qwen2)
    dms = _dms(model, args)
    _force(dms, {"model.layers.0.mlp": 0.5, "model.layers.1.mlp": 0.25, "model.layers[depth]": 1.0})
    ex = dms.export()
    assert not config_describes_model(ex)
    assert "intermediate_size" in ex.config.dmscale_inexact
    assert [s["intermediate_size"] for s in ex.config.dmscale_layer_sizes] == [32, 16]
    assert ex.config.intermediate_size == 64  # the supernet's value: the config still loads
    type(ex.config).from_dict(ex.config.to_dict())


def test_sliced_rotary_frequencies_make_the_config_inexact():
    """Pruned head dims (prune_head_dim) slice the rotary frequencies, which a config would recompute."""
    model, args, _ = H.build(H.llama)
    dms = _dms(model, args, target=0.95, prune_head_dim=True, prune_heads=False, prune_width=False,
               prune_depth=False)
    assert [g.kind for g in dms.groups] == ["head_dim"]  # one head dim for all layers (shared rotary table)
    _force(dms, {"head_dim": 0.5})
    ex = dms.export()
    assert ex.model.rotary_emb.inv_freq.numel() == 2 and ex.model.layers[0].self_attn.head_dim == 4
    assert not config_describes_model(ex) and "inv_freq" in ex.config.dmscale_inexact
    with torch.no_grad():
        assert torch.equal(_greedy(ex, H.ids(1, 8), True), _greedy(ex, H.ids(1, 8), False))


# ------------------------------------------------------------------ family specifics
def test_phi3_per_layer_heads_get_their_own_config(tmp_path):
    """Phi-3 reads num_attention_heads from its config at run time: layers that differ get their own copy."""
    model, args, _ = H.build(H.phi3)
    dms = _dms(model, args)
    _force(dms, {"model.layers.0.self_attn": 0.5, "model.layers.0.mlp": 0.5, "model.layers.1.mlp": 0.75})
    ex = dms.export()
    a0, a1 = ex.model.layers[0].self_attn, ex.model.layers[1].self_attn
    assert a0.config is not ex.config and a0.config.num_attention_heads == 2 and a0.config.num_key_value_heads == 1
    assert a1.config is ex.config and ex.config.num_attention_heads == 4
    assert [s["num_attention_heads"] for s in ex.config.dmscale_layer_sizes] == [2, 4]
    assert ex.model.layers[0].mlp.gate_up_proj.out_features == 2 * 32
    dmscale.save(ex, tmp_path / "m")
    loaded = dmscale.load(tmp_path / "m")
    ids = H.ids(1, 8)
    with torch.no_grad():
        assert torch.equal(_greedy(loaded, ids, True), _greedy(ex, ids, False))


def test_t5_first_block_removed_hands_its_position_bias_to_the_next():
    model, args, kw = H.build(H.t5)
    dms = _dms(model, args, kw)
    depth = [g for g in dms.groups if g.kind == "depth"]
    assert sorted(g.name for g in depth) == ["decoder.block[depth]", "encoder.block[depth]"]  # whole T5Blocks
    with torch.no_grad():
        for g in depth:
            dms.space.importance(g).copy_(torch.tensor([0.0, 1.0]))  # drop block 0 of both stacks
            dms.space.ratio(g).fill_(0.5)
    ex = dms.export()  # exact: the kept block computes the removed block's relative position bias
    for stack in (ex.encoder, ex.decoder):
        assert len(stack.block) == 1 and stack.block[0].layer[0].SelfAttention.has_relative_attention_bias
    assert (ex.config.num_layers, ex.config.num_decoder_layers) == (1, 1)
    ids = H.ids(1, 6)
    with torch.no_grad():
        a = ex.generate(ids, max_new_tokens=4, do_sample=False, use_cache=True)
        b = ex.generate(ids, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_t5_self_attention_heads_are_shared_by_the_stack_and_follow_the_bias():
    model, args, kw = H.build(H.t5)
    dms = _dms(model, args, kw)
    heads = [g for g in dms.groups if g.kind == "heads"]
    assert sorted(g.name for g in heads) == ["decoder.block.0.layer.0.SelfAttention.q[heads]",
                                             "decoder.block.0.layer.1.EncDecAttention.q[heads]",
                                             "encoder.block.0.layer.0.SelfAttention.q[heads]"]
    _force(dms, {"heads": 0.5})
    ex = dms.export()
    bias = ex.encoder.block[0].layer[0].SelfAttention.relative_attention_bias
    assert bias.weight.shape[1] == 2 and ex.encoder.block[1].layer[0].SelfAttention.n_heads == 2
    assert ex.decoder.block[1].layer[1].EncDecAttention.n_heads == 2  # its zero bias is made from n_heads


def test_moe_expert_width_is_searched_and_the_expert_count_is_named():
    model, args, _ = H.build(H.qwen2_moe)
    with pytest.warns(UserWarning, match=r"number of experts of Qwen2MoeExperts \(4\) is kept fixed"):
        dms = dmscale.DMS(model, args, dmscale.Target(flops=0.6), total_steps=10)
    names = [g.name for g in dms.groups]
    assert "model.layers.0.mlp.experts" in names and "model.layers.0.mlp.shared_expert.gate_proj" in names
    _force(dms, {"model.layers.0.mlp.experts": 0.5, "model.layers.1.mlp.experts": 0.5})
    ex = dms.export()
    experts = ex.model.layers[0].mlp.experts
    assert experts.gate_up_proj.shape == (4, 32, 32) and experts.down_proj.shape == (4, 32, 16)
    assert experts.intermediate_dim == 16 and ex.config.moe_intermediate_size == 16
    assert config_describes_model(ex)


def test_fused_experts_keep_widths_the_grouped_matmul_accepts():
    """HF runs fused experts with a grouped matmul that needs 16-byte strides: the expert FFN and the hidden
    size are searched in steps of 8, even at ratios that would otherwise keep an odd count, and export runs."""
    model, args, _ = H.build(H.qwen2_moe)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dms = dmscale.DMS(model, args, dmscale.Target(flops=0.6), total_steps=10, bounds={"model.layers.1": {"divisor": 3}})
    by = {g.name: g for g in dms.groups}
    assert by["model.layers.0.mlp.experts"].bounds.divisor == 8
    assert by["model.layers.1.mlp.experts"].bounds.divisor == 24  # a user's divisor of 3 too: their lcm
    hidden = next(g for g in dms.groups if any("embed_tokens" in m for m in g.members))
    assert hidden.bounds.divisor == 8
    assert by["model.layers.0.mlp.shared_expert.gate_proj"].bounds.divisor == 1  # plain linears: any width
    _force(dms, {"model.layers.0.mlp.experts": 13 / 32, "model.embed_tokens": 27 / 32})
    kept = dms.kept()
    assert kept["model.layers.0.mlp.experts"][1] % 8 == 0 and kept[hidden.name][1] % 8 == 0
    ex = dms.export()  # runs the exported model on the example inputs (the grouped matmul included)
    with torch.no_grad(), dms.hard():
        ref = dms.model(*args).logits
    torch.testing.assert_close(ex(*args).logits, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("build", [H.bloom, H.mpt, H.falcon_alibi])
def test_alibi_heads_are_tied_to_the_bias_and_stay_fixed(build):
    model, args, _ = H.build(build)
    dms = _dms(model, args)
    assert not any(g.kind == "heads" for g in dms.groups)
    assert any(g.kind == "width" and "embed" in g.name or "wte" in g.name for g in dms.groups)


def test_falcon_alibi_keeps_the_hidden_size_its_forward_reads():
    model, args, _ = H.build(H.falcon_alibi)
    dms = _dms(model, args, exclude=["transformer.rotary_emb"])
    _force(dms, {"transformer.word_embeddings": 0.75})
    ex = dms.export()
    assert ex.config.hidden_size == 32 and "ALiBi" in ex.config.dmscale_inexact
    assert ex.transformer.word_embeddings.embedding_dim == 24


def test_swin_relative_position_bias_follows_the_heads():
    model, args, _ = H.build(H.swin)
    dms = _dms(model, args)
    heads = [g for g in dms.groups if g.kind == "heads"]
    assert len(heads) == 4
    _force(dms, {"heads": 0.5})
    ex = dms.export()
    blk = ex.swin.encoder.layers[1].blocks[0].attention
    assert blk.num_attention_heads == 2 and blk.relative_position_bias.relative_position_bias_table.shape[1] == 2
    assert [s["num_heads"] for s in ex.config.dmscale_layer_sizes] == [1, 1, 2, 2]
    assert "derives head_dim" in ex.config.dmscale_inexact  # Swin's config: head_dim = stage width / heads
    model, args, _ = H.build(H.swin)
    dms = _dms(model, args)
    _force(dms, {"swin.encoder.layers.1.blocks[depth]": 0.5})
    ex = dms.export()
    assert ex.config.depths == [2, 1] and config_describes_model(ex)


def test_model_without_family_uses_the_generic_fallback():
    """OLMo (Llama-shaped, no family file): by-value attribute updates and the generic config edits."""
    from transformers import OlmoConfig, OlmoForCausalLM

    torch.manual_seed(0)
    model = OlmoForCausalLM(OlmoConfig(vocab_size=H.VOCAB, **H.DECODER)).eval()
    assert family_for(model) is None
    dms = _dms(model, (H.ids(),))
    _force(dms, {"heads": 0.5, "model.layers.0.mlp": 0.5, "model.layers.1.mlp": 0.5, "model.layers[depth]": 0.5})
    ex = dms.export()
    assert ex.config.num_hidden_layers == 1 and ex.config.intermediate_size == 32
    assert config_describes_model(ex)
    with torch.no_grad():
        assert torch.equal(_greedy(ex, H.ids(1, 8), True), _greedy(ex, H.ids(1, 8), False))


def test_adapters_path_is_a_deprecated_shim():
    import importlib
    import sys

    sys.modules.pop("dmscale.adapters.hf_llm", None)
    with pytest.warns(DeprecationWarning, match="dmscale.families"):
        mod = importlib.import_module("dmscale.adapters.hf_llm")
    from dmscale.families import uniform_sizes

    assert mod.uniform_sizes is uniform_sizes
    from dmscale import adapters

    seen = []
    with pytest.warns(DeprecationWarning, match="register_family"):
        adapters.register_post_export(lambda m: True, lambda dms, ex: seen.append(type(ex).__name__))
    try:
        model, args, _ = H.build(H.llama)
        dms = _dms(model, args)
        _force(dms, {"model.layers.0.mlp": 0.5})
        dms.export()
        assert seen == ["LlamaForCausalLM"]
    finally:
        adapters._FIXUPS.clear()


def _toy_hf_model():
    """A tiny PreTrainedModel of a model type with no family: an attention keeping ``heads`` and ``inner`` (heads x
    head_dim) in attributes. The generic fallback updates ``heads`` (it sized the split of a pruned dim) but not
    ``inner``, which only sizes a merge: the export check fails."""
    from transformers import PretrainedConfig, PreTrainedModel

    class ToyConfig(PretrainedConfig):
        model_type = "dmscale_toy_attention"

        def __init__(self, width=8, heads=4, **kw):
            self.width, self.heads = width, heads
            super().__init__(**kw)

    class Attention(torch.nn.Module):
        def __init__(self, width, heads):
            super().__init__()
            self.heads, self.head_dim, self.inner = heads, width // heads, width
            self.q, self.k, self.v, self.o = (torch.nn.Linear(width, width) for _ in range(4))

        def forward(self, x):
            b, t, _ = x.shape
            q, k, v = (p(x).view(b, t, self.heads, self.head_dim).transpose(1, 2) for p in (self.q, self.k, self.v))
            y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            return self.o(y.transpose(1, 2).reshape(b, t, self.inner))

    class ToyModel(PreTrainedModel):
        config_class = ToyConfig

        def __init__(self, config):
            super().__init__(config)
            self.attn = Attention(config.width, config.heads)
            self.hidden = torch.nn.Linear(config.width, 16)
            self.out = torch.nn.Linear(16, 3)

        def forward(self, x):
            return self.out(self.hidden(self.attn(x)).relu())

    torch.manual_seed(0)
    return ToyModel(ToyConfig()).eval()


def test_generic_fallback_failure_names_the_model_type_and_the_guess():
    model = _toy_hf_model()
    assert family_for(model) is None
    x = torch.randn(2, 8, 8, generator=torch.Generator().manual_seed(1))
    dms = _dms(model, (x,))
    _force(dms, {"heads": 0.5})
    with pytest.raises(dmscale.ExportError, match="failed to run") as err:
        dms.export()
    msg = str(err.value)
    assert "'dmscale_toy_attention' has no dmscale family" in msg and "by value" in msg
    assert "it set attn.heads 4 -> 2" in msg
    assert "docs/extending.md#a-hugging-face-model-family" in msg and "exclude=['attn']" in msg
    # the suggested workaround works
    dms = _dms(_toy_hf_model(), (x,), target=0.9, exclude=["attn"])
    assert [g.name for g in dms.groups] == ["hidden"]
    _force(dms, default=0.5)
    with torch.no_grad(), dms.hard():
        ref = dms.model(x)
    torch.testing.assert_close(dms.export()(x), ref)


def test_a_family_model_type_gets_no_fallback_hint():
    """The hint is only for model types without a family: a registered one (MobileViT, unregistered for a
    moment, falls back and fails by value on its all_head_size) gets it, the registered one exports."""
    fam = registered_families()["mobilevit"]
    model, args, _ = H.build(H.mobilevit)
    dms = _dms(model, args)
    _force(dms, {"heads": 0.5})
    unregister_family("mobilevit")
    try:
        with pytest.raises(dmscale.ExportError, match="'mobilevit' has no dmscale family") as err:
            dms.export()
        assert "exclude=[...]" in str(err.value)  # it guessed nothing: all_head_size only sizes a merge
    finally:
        register_family(fam)
    ex = dms.export()
    assert ex.mobilevit.encoder.layer[2].transformer.layer[0].attention.attention.num_attention_heads == 2


def test_segformer_stage_sizes_follow_the_export():
    """Per-stage config lists follow the export (the classifier reads hidden_sizes[-1] in its forward); a stage
    whose attention reduces keys/values keeps its width, with the reason named."""
    model, args, _ = H.build(H.segformer)
    dms = _dms(model, args)
    lost = "\n".join(str(x) for x in dms.trace.lost)
    assert "segformer.stages.0" in lost and "SegformerSequenceReduction" in lost
    assert not any(g.name.startswith("segformer.stages.0.patch_embeddings") for g in dms.groups)
    _force(dms, {"segformer.stages.1.patch_embeddings": 0.5, "heads": 0.5})
    ex = dms.export()
    assert ex.config.hidden_sizes == [16, 16] and ex.classifier.in_features == 16
    attn = ex.segformer.stages[1].blocks[0].attention
    assert (attn.num_attention_heads, attn.head_dim) == (1, 16)
    sizes = ex.config.dmscale_layer_sizes
    assert [(s["num_attention_heads"], s["mlp_ratios"]) for s in sizes] == [(1, 2), (1, 4), (1, 4)]
    assert "1 heads of 8 in a width of 16" in ex.config.dmscale_inexact  # stage 0: head_dim != width / heads
    # the FFN and the blocks of the last stage: a config that rebuilds the export
    model, args, _ = H.build(H.segformer)
    dms = _dms(model, args)
    _force(dms, {"segformer.stages.1.blocks.0.mlp": 0.5, "segformer.stages.1.blocks.1.mlp": 0.5,
                 "segformer.stages.1.blocks[depth]": 0.5})
    ex = dms.export()
    assert ex.config.depths == [1, 1] and ex.config.mlp_ratios == [2, 1] and config_describes_model(ex)


def test_mobilevit_sizes_by_meaning():
    model, args, _ = H.build(H.mobilevit)
    dms = _dms(model, args)
    _force(dms, {"heads": 0.5, "mobilevit.encoder.layer.4.conv_1x1": 0.5, "mobilevit.conv_stem": 0.5})
    ex = dms.export()
    for stage in ex.mobilevit.encoder.layer[2:]:
        for layer in stage.transformer.layer:
            a = layer.attention.attention
            assert a.num_attention_heads == 2 and a.all_head_size == 2 * a.attention_head_size
    assert ex.config.hidden_sizes == [16, 24, 16] and ex.config.neck_hidden_sizes[0] == 4
    assert {s["num_attention_heads"] for s in ex.config.dmscale_layer_sizes} == {2}
    assert "derives head_dim" in ex.config.dmscale_inexact  # 2 heads of 4 in a width of 16 (stage 0)
    model, args, _ = H.build(H.mobilevit)
    dms = _dms(model, args)
    _force(dms, {"mobilevit.encoder.layer.3.transformer.layer[depth]": 0.5})
    ex = dms.export()
    assert len(ex.mobilevit.encoder.layer[3].transformer.layer) == 2
    assert "fixes the number of blocks per stage" in ex.config.dmscale_inexact


@pytest.mark.parametrize("name,options", [
    ("roformer", {}), ("rembert", {"exclude": ["rembert.embeddings"]}), ("mpnet", {}),
    # BigBird's attention keeps its layer index as a seed and ESM's unused contact head reads layers x heads:
    # a config with fewer layers (ESM: or heads) would rebuild other values
    ("big_bird", {"prune_depth": False}),
    ("esm", {"prune_depth": False, "prune_heads": False, "exclude": ["esm.embeddings", "classifier"]})])
def test_bert_like_encoders_round_trip_through_save_pretrained(name, options, tmp_path):
    """BERT-layout encoders registered with ``bert_like``: attributes and config keys by meaning, so a uniform
    export's config rebuilds it (a plain ``save_pretrained`` / ``from_pretrained``)."""
    model, args, _ = H.build(getattr(H, name))
    assert family_for(model) is not None
    dms = _dms(model, args, **options)
    assert {g.kind for g in dms.groups} >= {"width"} | ({"heads"} if options.get("prune_heads", True) else set())
    _force(dms, default=0.5)
    ex = dms.export()
    assert sum(p.numel() for p in ex.parameters()) < sum(p.numel() for p in model.parameters())
    H.assert_pretrained_round_trip(ex, args, {}, tmp_path)


def test_deberta_pooler_narrower_than_the_model_is_named_and_embedding_size_follows_the_hidden_size():
    """DeBERTa's ContextPooler is ``pooler_hidden_size`` wide in and out: a pooler pruned alone cannot be described;
    a pruned hidden size moves the embeddings' ``embedding_size`` attribute with it."""
    model, args, _ = H.build(H.deberta_v2)
    dms = _dms(model, args)
    _force(dms, {"pooler.dense": 0.5})
    ex = dms.export()
    assert "pooler_hidden_size" in ex.config.dmscale_inexact and not config_describes_model(ex)
    model, args, _ = H.build(H.deberta_v2)
    dms = _dms(model, args)
    _force(dms, {"pooler.dense": 0.5, "deberta.embeddings.word_embeddings": 0.5, "heads": 0.5})  # head_dim stays 8
    ex = dms.export()
    assert ex.deberta.embeddings.embedding_size == ex.config.hidden_size == ex.config.pooler_hidden_size == 16
    assert config_describes_model(ex) and "embedding_size" not in ex.config.to_dict()
