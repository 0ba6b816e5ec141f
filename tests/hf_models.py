"""Tiny Hugging Face models for the coverage matrix (built offline from small configs).

Each builder returns ``(model, args, kwargs)``: the model in eval mode and example inputs. A module using these
runs on one thread with ``pytestmark = pytest.mark.usefixtures("one_thread")`` (``conftest.py``). The tiny models
of the other tests, the μpscaling ones on Hugging Face classes included, are in ``zoo.py``.
"""

from __future__ import annotations

from typing import Callable

import torch

VOCAB = 96


def ids(batch: int = 2, seq: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


def image(size: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _t():
    import transformers

    return transformers


def _lm(cfg_cls: str, model_cls: str, **cfg):
    t = _t()
    return getattr(t, model_cls)(getattr(t, cfg_cls)(vocab_size=VOCAB, **cfg)), (ids(),), {}


DECODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
ENCODER = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64)


def bert():
    return _lm("BertConfig", "BertForSequenceClassification", max_position_embeddings=32, **ENCODER)


def roberta():
    return _lm("RobertaConfig", "RobertaForSequenceClassification", max_position_embeddings=40, **ENCODER)


def xlm_roberta():
    return _lm("XLMRobertaConfig", "XLMRobertaForSequenceClassification", max_position_embeddings=40, **ENCODER)


def electra():
    return _lm("ElectraConfig", "ElectraForSequenceClassification", embedding_size=16, max_position_embeddings=32,
               **ENCODER)


def distilbert():
    return _lm("DistilBertConfig", "DistilBertForSequenceClassification", dim=32, n_layers=2, n_heads=4,
               hidden_dim=64, max_position_embeddings=32)


def t5():
    t = _t()
    model = t.T5ForConditionalGeneration(t.T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                                    num_heads=4, decoder_start_token_id=0, pad_token_id=0,
                                                    eos_token_id=1))
    return model, (ids(),), {"decoder_input_ids": ids(2, 6, seed=3)}


def phi3():
    return _lm("Phi3Config", "Phi3ForCausalLM", pad_token_id=0, eos_token_id=1, bos_token_id=1, **DECODER)


def gemma():
    return _lm("GemmaConfig", "GemmaForCausalLM", head_dim=8, **{**DECODER, "num_key_value_heads": 1})


def gemma2():
    return _lm("Gemma2Config", "Gemma2ForCausalLM", head_dim=8, sliding_window=4, **DECODER)


def mistral():
    """A sliding window (4) shorter than the example sequence (12)."""
    return _lm("MistralConfig", "MistralForCausalLM", sliding_window=4, **DECODER)


def llama():
    return _lm("LlamaConfig", "LlamaForCausalLM", **DECODER)


def qwen2():
    return _lm("Qwen2Config", "Qwen2ForCausalLM", use_sliding_window=True, sliding_window=4, max_window_layers=1,
               **DECODER)


def qwen3():
    return _lm("Qwen3Config", "Qwen3ForCausalLM", head_dim=8, **DECODER)


def qwen2_moe():
    return _lm("Qwen2MoeConfig", "Qwen2MoeForCausalLM", moe_intermediate_size=32, shared_expert_intermediate_size=32,
               num_experts=4, num_experts_per_tok=2, **DECODER)


def mixtral():
    return _lm("MixtralConfig", "MixtralForCausalLM", num_local_experts=4, num_experts_per_tok=2, **DECODER)


def qwen3_moe():
    return _lm("Qwen3MoeConfig", "Qwen3MoeForCausalLM", moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2,
               **DECODER)


def olmoe():
    return _lm("OlmoeConfig", "OlmoeForCausalLM", num_experts=4, num_experts_per_tok=2, **DECODER)


def opt():
    return _lm("OPTConfig", "OPTForCausalLM", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
               word_embed_proj_dim=32, max_position_embeddings=32)


def gpt_neox():
    return _lm("GPTNeoXConfig", "GPTNeoXForCausalLM", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, max_position_embeddings=32)


def gpt2():
    return _lm("GPT2Config", "GPT2LMHeadModel", n_embd=32, n_layer=2, n_head=4, n_positions=32)


def gptj():
    return _lm("GPTJConfig", "GPTJForCausalLM", n_embd=32, n_layer=2, n_head=4, rotary_dim=4, n_positions=32)


def falcon():
    """Multi-query attention (one key/value head) in a fused query_key_value."""
    return _lm("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               new_decoder_architecture=False, multi_query=True)


def falcon_grouped():
    """The new decoder architecture: query_key_value viewed as (kv heads, q per kv + 2, head_dim)."""
    return _lm("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               new_decoder_architecture=True, num_kv_heads=2)


def falcon_alibi():
    return _lm("FalconConfig", "FalconForCausalLM", hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
               alibi=True, multi_query=False)


def bloom():
    return _lm("BloomConfig", "BloomForCausalLM", hidden_size=32, n_layer=2, n_head=4)


def mpt():
    return _lm("MptConfig", "MptForCausalLM", d_model=32, n_layers=2, n_heads=4, max_seq_len=32)


def swin():
    t = _t()
    cfg = t.SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    return t.SwinForImageClassification(cfg), (image(),), {}


def swinv2():
    t = _t()
    cfg = t.Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=4)
    return t.Swinv2ForImageClassification(cfg), (image(),), {}


def efficientnet():
    t = _t()
    cfg = t.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.4, hidden_dim=320)
    return t.EfficientNetForImageClassification(cfg), (image(),), {}


def convnextv2():
    t = _t()
    cfg = t.ConvNextV2Config(num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], image_size=32)
    return t.ConvNextV2ForImageClassification(cfg), (image(),), {}


def convnext():
    t = _t()
    cfg = t.ConvNextConfig(num_stages=2, hidden_sizes=[8, 16], depths=[2, 2], image_size=32)
    return t.ConvNextForImageClassification(cfg), (image(),), {}


def dinov2():
    t = _t()
    cfg = t.Dinov2Config(image_size=32, patch_size=8, **ENCODER)
    return t.Dinov2ForImageClassification(cfg), (image(),), {}


def vit():
    t = _t()
    return t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, **ENCODER)), (image(),), {}


def vit_mae():
    """ViT-MAE masks patches with random noise: the noise is an input so that every run is the same."""
    t = _t()
    cfg = t.ViTMAEConfig(image_size=32, patch_size=8, mask_ratio=0.25, **ENCODER)
    noise = torch.rand(2, 16, generator=torch.Generator().manual_seed(4))
    return t.ViTMAEModel(cfg), (image(),), {"noise": noise}


def clip_vision():
    t = _t()
    cfg = t.CLIPVisionConfig(image_size=32, patch_size=8, **ENCODER)
    return t.CLIPVisionModel(cfg), (image(),), {}


def whisper_encoder():
    t = _t()
    cfg = t.WhisperConfig(num_mel_bins=16, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                          decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_source_positions=16,
                          vocab_size=VOCAB)
    return t.WhisperForAudioClassification(cfg), (torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(1)),), {}


def bart():
    t = _t()
    cfg = t.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                       decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=32)
    return t.BartForConditionalGeneration(cfg), (ids(),), {"decoder_input_ids": ids(2, 6, seed=3)}


def segformer():
    t = _t()
    cfg = t.SegformerConfig(num_encoder_blocks=2, depths=[1, 2], sr_ratios=[2, 1], hidden_sizes=[16, 32],
                            patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[2, 2], mlp_ratios=[2, 2],
                            num_labels=3)
    return t.SegformerForImageClassification(cfg), (image(),), {}


def mobilevit():
    t = _t()
    cfg = t.MobileViTConfig(image_size=32, patch_size=2, hidden_sizes=[16, 24, 32],
                            neck_hidden_sizes=[8, 8, 16, 16, 24, 24, 32], num_attention_heads=4, num_labels=3)
    return t.MobileViTForImageClassification(cfg), (image(),), {}


VISION = dict(image_size=32, patch_size=8, num_labels=3, **ENCODER)


def deit():
    t = _t()
    return t.DeiTForImageClassification(t.DeiTConfig(**VISION)), (image(),), {}


def beit():
    """With BEiT's relative position bias (a per-head table, like Swin's) in every layer."""
    t = _t()
    cfg = t.BeitConfig(use_relative_position_bias=True, **VISION)
    return t.BeitForImageClassification(cfg), (image(),), {}


def regnet():
    t = _t()
    cfg = t.RegNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 3], groups_width=4, num_labels=3)
    return t.RegNetForImageClassification(cfg), (image(),), {}


def stablelm():
    return _lm("StableLmConfig", "StableLmForCausalLM", **DECODER)


def deberta_v2():
    return _lm("DebertaV2Config", "DebertaV2ForSequenceClassification", max_position_embeddings=32, **ENCODER)


def deberta_v3():
    """DeBERTa-v3's layout: relative attention (content->position and position->content terms with keys
    shared with the content projections, log buckets) and a layer-normed relative embedding table."""
    return _lm("DebertaV2Config", "DebertaV2ForSequenceClassification", max_position_embeddings=32,
               relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=8, share_att_key=True,
               norm_rel_ebd="layer_norm", **ENCODER)


def deberta():
    """DeBERTa (v1) with relative attention: heads kept 4-D, a fused in_proj and separate position projections."""
    return _lm("DebertaConfig", "DebertaForSequenceClassification", max_position_embeddings=32,
               relative_attention=True, pos_att_type=["p2c", "c2p"], **ENCODER)


def mobilebert():
    return _lm("MobileBertConfig", "MobileBertForSequenceClassification", hidden_size=32, embedding_size=16,
               intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, intra_bottleneck_size=16,
               true_hidden_size=16)


def roformer():
    return _lm("RoFormerConfig", "RoFormerForSequenceClassification", embedding_size=32, **ENCODER)


def esm():
    return _lm("EsmConfig", "EsmForSequenceClassification", pad_token_id=1, position_embedding_type="rotary", **ENCODER)


def big_bird():
    """BigBird in its full attention mode (block-sparse attention is not covered)."""
    return _lm("BigBirdConfig", "BigBirdForSequenceClassification", attention_type="original_full", **ENCODER)


def rembert():
    return _lm("RemBertConfig", "RemBertForSequenceClassification", input_embedding_size=16, output_embedding_size=16,
               **ENCODER)


def mpnet():
    return _lm("MPNetConfig", "MPNetForSequenceClassification", **ENCODER)


def build(fn: Callable, seed: int = 0):
    torch.manual_seed(seed)
    model, args, kwargs = fn()
    return model.eval(), args, kwargs


def assert_pretrained_round_trip(ex, args, kwargs, path) -> None:
    """A plain ``save_pretrained`` / ``from_pretrained`` of the export rebuilds it: equal outputs."""
    import warnings

    from dmscale.families import config_describes_model

    assert config_describes_model(ex), getattr(ex.config, "dmscale_inexact", "")
    ex.save_pretrained(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        again = type(ex).from_pretrained(path).eval()
    with torch.no_grad():
        a, b = ex(*args, **kwargs), again(*args, **kwargs)
    a, b = (x.to_tuple() if hasattr(x, "to_tuple") else x for x in (a, b))
    a, b = ((x,) if isinstance(x, torch.Tensor) else x for x in (a, b))
    for u, v in zip(a, b):
        if isinstance(u, torch.Tensor) and u.is_floating_point():
            torch.testing.assert_close(v, u, atol=1e-6, rtol=1e-6)
