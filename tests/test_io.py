"""Round-trip, integrity and atomicity tests for dmscale.io (save/load without constructors)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import dmscale
import zoo
from dmscale.serialization import dirs
from dmscale.serialization import format as dio
from dmscale.serialization.errors import ForeignDirectoryError, LoadError, ModelNotFoundError

TRUST = ["zoo"]  # the test models' own package: loading them needs the caller's trust


def prune_linear(lin: nn.Linear, keep_out: torch.Tensor | None = None, keep_in: torch.Tensor | None = None) -> nn.Linear:
    """A smaller ``nn.Linear`` with the selected output rows / input columns (what an export produces)."""
    w = lin.weight.detach()
    b = lin.bias.detach() if lin.bias is not None else None
    if keep_out is not None:
        w = w[keep_out]
        b = b[keep_out] if b is not None else None
    if keep_in is not None:
        w = w[:, keep_in]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


def prune_block(block: zoo.TransformerBlock, heads: int, hidden: int) -> None:
    """Physically shrink a TransformerBlock: keep the first ``heads`` heads and ``hidden`` MLP units."""
    attn = block.attn
    keep = torch.arange(heads * attn.head_dim)
    attn.q = prune_linear(attn.q, keep_out=keep)
    attn.k = prune_linear(attn.k, keep_out=keep)
    attn.v = prune_linear(attn.v, keep_out=keep)
    attn.o = prune_linear(attn.o, keep_in=keep)
    attn.num_heads = heads
    attn.meta = {"heads": (heads,), 3: [1.5, None], "$odd": {"x"}}
    units = torch.arange(hidden)
    block.fc1 = prune_linear(block.fc1, keep_out=units)
    block.fc2 = prune_linear(block.fc2, keep_in=units)


def _load(path: Path, **kw: Any) -> nn.Module:
    return dio.load(path, trust=TRUST, **kw)


def _roundtrip(model: nn.Module, path: Path, *inputs: Any, **kw: Any) -> nn.Module:
    """Save, load and check that outputs and state are identical; returns the loaded model."""
    dio.save(model, path, meta={"note": "test"})
    loaded = _load(path)
    assert type(loaded) is type(model)
    assert loaded is not model
    sd0, sd1 = model.state_dict(), loaded.state_dict()
    assert list(sd0) == list(sd1)
    for k in sd0:
        torch.testing.assert_close(sd0[k], sd1[k], rtol=0, atol=0)
    with torch.no_grad():
        out0 = model(*inputs, **kw)
        out1 = loaded(*inputs, **kw)
    if hasattr(out0, "logits"):
        out0, out1 = out0.logits, out1.logits
    torch.testing.assert_close(out0, out1, rtol=0, atol=0)
    return loaded


def _assert_same_tree(a: nn.Module, b: nn.Module) -> None:
    """Same classes and training flags at every path."""
    ma, mb = dict(a.named_modules()), dict(b.named_modules())
    assert list(ma) == list(mb)
    for k in ma:
        assert type(ma[k]) is type(mb[k]), k
        assert ma[k].training == mb[k].training, k


# ------------------------------------------------------------------------------------------------ round trips


def test_mlp_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = zoo.AttrMLP().eval()
    m2 = _roundtrip(m, tmp_path / "mlp", torch.randn(3, 8))
    assert m2.act is torch.nn.functional.gelu
    assert m2.fc2.bias is None and "bias" in m2.fc2._parameters
    info = dio.read_structure(tmp_path / "mlp")
    assert info["format"] == dio.FORMAT_NAME and info["meta"] == {"note": "test"}
    assert info["root_class"] == "zoo:AttrMLP"
    assert info["tensors"]["fc1.weight"]["shape"] == [16, 8]
    assert info["num_parameters"] == sum(p.numel() for p in m.parameters())


def test_cnn_batchnorm_residual_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = zoo.SmallCNN()
    m.train()
    with torch.no_grad():
        for _ in range(3):  # populate running stats
            m(torch.randn(4, 3, 8, 8))
    m.eval()
    m2 = _roundtrip(m, tmp_path / "cnn", torch.randn(2, 3, 8, 8))
    _assert_same_tree(m, m2)
    assert m2.blocks[1].bn1.num_batches_tracked.item() == 3
    assert m2.blocks[1].conv1.out_channels == 5


def test_pruned_custom_attention_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = zoo.TinyTransformer()
    prune_block(m.blocks[0], heads=3, hidden=23)
    prune_block(m.blocks[1], heads=1, hidden=40)
    m.eval()
    ids = torch.randint(0, 50, (2, 7))
    m2 = _roundtrip(m, tmp_path / "tt", ids)
    _assert_same_tree(m, m2)
    assert m2.blocks[0].attn.num_heads == 3 and m2.blocks[1].attn.num_heads == 1
    assert m2.blocks[0].fc1.out_features == 23 and tuple(m2.blocks[0].fc1.weight.shape) == (23, 32)
    assert m2.blocks[0].attn.mode is zoo.Mode.EXACT and m2.blocks[0].attn.dtype_hint is torch.float32
    assert m2.blocks[0].attn.meta == {"heads": (3,), 3: [1.5, None], "$odd": {"x"}}
    # ties, shared modules and module references survive by identity
    assert m2.head.weight is m2.embed.weight
    assert m2.final_norm is m2.norm and m2.block_list[0] is m2.blocks[0]
    assert torch.equal(m2.index, m.index)
    # non-persistent buffers are rebuilt and stay non-persistent
    assert "pos_scale" in m2.blocks[0]._non_persistent_buffers_set
    assert "blocks.0.pos_scale" not in m2.state_dict()
    # a tied model stores the weight once
    assert len(dio.read_structure(tmp_path / "tt")["tensors"]) == len(
        {id(t) for t in list(m.parameters()) + list(m.buffers())}
    ) + 1  # + the plain tensor attribute


def test_training_flags_and_requires_grad_kept(tmp_path: Path) -> None:
    m = zoo.SmallCNN().train()
    m.blocks[0].eval()
    m.head.bias.requires_grad_(False)
    dio.save(m, tmp_path / "m")
    m2 = _load(tmp_path / "m")
    _assert_same_tree(m, m2)
    assert m2.training and not m2.blocks[0].training
    assert not m2.head.bias.requires_grad and m2.head.weight.requires_grad
    assert isinstance(m2.head.weight, nn.Parameter)


def test_overwrite_existing_save(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "m"
    dio.save(zoo.AttrMLP(hidden=16), path)
    assert dirs.dir_kind(path) == "model"
    dio.save(zoo.AttrMLP(hidden=9), path)
    assert _load(path).fc1.out_features == 9
    monkeypatch.setattr(dirs, "rename_exchange", lambda a, b: False)  # two-rename fallback path
    dio.save(zoo.AttrMLP(hidden=7), path)
    assert _load(path).fc1.out_features == 7
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    assert sorted(p.name for p in path.iterdir()) == [".dmscale", "model.safetensors", "structure.json"]


def test_refuses_to_replace_foreign_directory(tmp_path: Path) -> None:
    d = tmp_path / "precious"
    d.mkdir()
    (d / "thesis.txt").write_text("do not delete")
    with pytest.raises(ForeignDirectoryError, match="precious.*not created by dmscale"):
        dio.save(zoo.AttrMLP(), d)
    assert (d / "thesis.txt").read_text() == "do not delete"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


def test_replaces_a_format_1_save_without_marker(tmp_path: Path) -> None:
    """Directories saved before markers existed (structure.json + weights only) are still dmscale's."""
    path = tmp_path / "m"
    dio.save(zoo.AttrMLP(hidden=5), path)
    (path / dirs.MARKER_FILE).unlink()
    dio.save(zoo.AttrMLP(hidden=6), path)
    assert _load(path).fc1.out_features == 6


# ------------------------------------------------------------------------------------------------ fidelity


def test_loaded_tensors_are_fresh_aligned_allocations(tmp_path: Path) -> None:
    """Tensors are copied out of the file into torch's own (64-byte aligned) memory: never views of a mapped file."""
    torch.manual_seed(0)
    m = zoo.OddSizes().eval()
    path = tmp_path / "odd"
    dio.save(m, path)
    header_len = int.from_bytes((path / dio.WEIGHTS_FILE).read_bytes()[:8], "little")
    offsets = json.loads((path / dio.WEIGHTS_FILE).read_bytes()[8:8 + header_len])
    assert any((8 + header_len + v["data_offsets"][0]) % 64 for k, v in offsets.items() if k != "__metadata__")
    m2 = _load(path)
    storages = set()
    for t in list(m2.parameters()) + list(m2.buffers()):
        assert t.data_ptr() % 64 == 0 and t.is_contiguous()
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()  # owns exactly its data
        storages.add(t.untyped_storage().data_ptr())
    assert len(storages) == len(list(m2.parameters())) + len(list(m2.buffers()))
    x = torch.randn(9, 37)
    with torch.no_grad():
        assert torch.equal(m(x), m2(x))


@pytest.mark.parametrize("make,inputs", [
    (lambda: zoo.OddSizes(), lambda: (torch.randn(33, 37),)),
    (lambda: zoo.SmallCNN(), lambda: (torch.randn(4, 3, 8, 8),)),
    (lambda: zoo.TinyTransformer(), lambda: (torch.randint(0, 50, (3, 9)),)),
    (lambda: zoo.RecurrentClassifier(), lambda: (torch.randn(4, 7, 6),)),
    (lambda: zoo.PartialActs(), lambda: (torch.randn(4, 5),)),
    (lambda: nn.TransformerEncoder(nn.TransformerEncoderLayer(16, 4, 40, batch_first=True), 2,
                                   enable_nested_tensor=False), lambda: (torch.randn(2, 5, 16),)),
    (lambda: zoo.OddSizes().double(), lambda: (torch.randn(5, 37, dtype=torch.float64),)),
    (lambda: zoo.OddSizes().bfloat16(), lambda: (torch.randn(5, 37).bfloat16(),)),
])
def test_bit_identical_outputs(tmp_path: Path, make: Any, inputs: Any) -> None:
    torch.manual_seed(0)
    m = make().eval()
    x = inputs()
    dio.save(m, tmp_path / "m")
    m2 = _load(tmp_path / "m")
    with torch.no_grad():
        a, b = m(*x), m2(*x)
    assert torch.equal(a, b), (a - b).abs().max()
    _assert_same_tree(m, m2)


def test_partial_activations_roundtrip(tmp_path: Path) -> None:
    import functools

    m = zoo.PartialActs().eval()
    m2 = _roundtrip(m, tmp_path / "p", torch.randn(3, 5))
    assert isinstance(m2.gelu, functools.partial) and m2.gelu.func is torch.nn.functional.gelu
    assert m2.gelu.keywords == {"approximate": "tanh"} and m2.softmax.keywords == {"dim": -1}
    assert m2.scale.func is zoo.local_scale  # a function of the trusted package
    s = dio.read_structure(tmp_path / "p")
    assert s["module"]["attributes"]["gelu"] == {"$partial": {"func": "torch.nn.functional:gelu", "args": [],
                                                              "keywords": {"approximate": "tanh"}}}
    m.bad = functools.partial(torch.nn.functional.gelu, approximate=torch.ones(1))
    with pytest.raises(TypeError, match="'bad'.*partial arguments must be plain data"):
        dio.save(m, tmp_path / "q")
    del m.bad
    m.bad = functools.partial(lambda x: x)
    with pytest.raises(TypeError, match="'bad'.*not importable"):
        dio.save(m, tmp_path / "q")
    assert not (tmp_path / "q").exists()


def test_registered_layer_sizes_are_checked_at_load(tmp_path: Path) -> None:
    """A user's layer registered with dmscale.register_layer(size_attrs=...) has its sizes checked by load too."""
    from dmscale.layers import LayerSpec, unregister_layer

    path = tmp_path / "e"
    dio.save(zoo.EinsumDense(3, 5), path)
    _edit(path, lambda s: s["module"]["attributes"].update(n_out=6))
    assert _load(path).n_out == 6  # unknown layer: nothing to compare with
    dmscale.register_layer(zoo.EinsumDense, LayerSpec("einsum_dense", out_dims={"kernel": 1, "b": 0},
                                                      params=("kernel", "b"),
                                                      size_attrs=lambda m: {"n_in": m.kernel.shape[0],
                                                                            "n_out": m.kernel.shape[1]}))
    try:
        with pytest.raises(LoadError, match=r"\(EinsumDense\): has n_out=6 but its weights imply n_out=5"):
            _load(path)
    finally:
        unregister_layer(zoo.EinsumDense)


# ------------------------------------------------------------------------------------------------ Hugging Face

transformers = pytest.importorskip("transformers")


def test_hf_vit_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        image_size=16, patch_size=8, num_labels=3,
    )
    m = transformers.ViTForImageClassification(cfg).eval()
    m2 = _roundtrip(m, tmp_path / "vit", pixel_values=torch.randn(2, 3, 16, 16))
    _assert_same_tree(m, m2)
    assert m2.config.to_dict() == m.config.to_dict()


def test_hf_resnet_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1], num_labels=3)
    m = transformers.ResNetForImageClassification(cfg).eval()
    _roundtrip(m, tmp_path / "resnet", pixel_values=torch.randn(2, 3, 32, 32))


def test_hf_gpt2_tied_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    m = transformers.GPT2LMHeadModel(cfg).eval()
    assert m.lm_head.weight is m.transformer.wte.weight
    m2 = _roundtrip(m, tmp_path / "gpt2", input_ids=torch.randint(0, 64, (2, 9)))
    assert m2.lm_head.weight is m2.transformer.wte.weight
    assert m2.config is m2.transformer.config  # config shared by identity
    info = dio.read_structure(tmp_path / "gpt2")
    assert "lm_head.weight" not in info["tensors"] and len(info["objects"]) == 2  # config + generation config


def test_hf_llama_pruned_nonuniform_roundtrip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=64, bos_token_id=0, eos_token_id=0,
    )
    m = transformers.LlamaForCausalLM(cfg)
    # simulate an exported model: non-uniform MLP widths and a layer with fewer heads
    for layer, width in zip(m.model.layers, (40, 24)):
        keep = torch.arange(width)
        layer.mlp.gate_proj = prune_linear(layer.mlp.gate_proj, keep_out=keep)
        layer.mlp.up_proj = prune_linear(layer.mlp.up_proj, keep_out=keep)
        layer.mlp.down_proj = prune_linear(layer.mlp.down_proj, keep_in=keep)
        layer.mlp.intermediate_size = width
    attn = m.model.layers[0].self_attn
    attn.q_proj = prune_linear(attn.q_proj, keep_out=torch.arange(16))  # 2 query heads
    attn.k_proj = prune_linear(attn.k_proj, keep_out=torch.arange(8))  # 1 kv head
    attn.v_proj = prune_linear(attn.v_proj, keep_out=torch.arange(8))
    attn.o_proj = prune_linear(attn.o_proj, keep_in=torch.arange(16))
    m.config.intermediate_size = 40  # edited config
    m.eval()
    m2 = _roundtrip(m, tmp_path / "llama", input_ids=torch.randint(0, 64, (2, 9)))
    assert m2.model.layers[1].mlp.down_proj.in_features == 24
    assert m2.config.intermediate_size == 40
    assert m2.config._attn_implementation == m.config._attn_implementation
    assert "inv_freq" in m2.model.rotary_emb._non_persistent_buffers_set
    torch.testing.assert_close(m2.model.rotary_emb.inv_freq, m.model.rotary_emb.inv_freq, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ integrity errors


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    """A saved small model."""
    path = tmp_path / "m"
    dio.save(zoo.AttrMLP(), path)
    return path


def _edit(path: Path, fn: Any, rechecksum: bool = True) -> None:
    """Edit structure.json; with ``rechecksum`` also recompute its checksum (as a deliberate tamperer would)."""
    f = path / dio.STRUCTURE_FILE
    s = json.loads(f.read_text())
    fn(s)
    if rechecksum:
        s["checksum"] = {"sha256": dio.structure_checksum(s)}
    f.write_text(json.dumps(s))


def test_flipped_byte_rejected(saved: Path) -> None:
    w = saved / dio.WEIGHTS_FILE
    data = bytearray(w.read_bytes())
    data[-5] ^= 0x01
    w.write_bytes(bytes(data))
    with pytest.raises(LoadError, match="corrupted or was modified"):
        _load(saved)


def test_truncated_file_rejected(saved: Path) -> None:
    w = saved / dio.WEIGHTS_FILE
    w.write_bytes(w.read_bytes()[:-16])
    with pytest.raises(LoadError, match="truncated"):
        _load(saved)


def test_any_structure_edit_breaks_its_checksum(saved: Path) -> None:
    _edit(saved, lambda s: s["meta"].update(note="x"), rechecksum=False)
    with pytest.raises(LoadError, match=r"structure.json.*modified or is corrupted.*checksum"):
        _load(saved)
    _load(saved, verify=False)  # the caller may skip the checks for a file it trusts


def test_edited_shape_rejected(saved: Path) -> None:
    _edit(saved, lambda s: s["tensors"]["fc1.weight"].update(shape=[15, 8]))
    with pytest.raises(LoadError, match=r"fc1\.weight.*\[15, 8\].*\[16, 8\]"):
        _load(saved)


def test_missing_weights_file(saved: Path) -> None:
    (saved / dio.WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        _load(saved)
    with pytest.raises(LoadError):
        _load(saved)


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="nowhere"):
        _load(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="structure.json"):
        dio.read_structure(tmp_path)


def test_bad_class_path_rejected(saved: Path) -> None:
    def set_class(spec: str) -> None:
        _edit(saved, lambda s: s["module"]["children"]["fc1"].update({"class": spec}))

    set_class("zoo:NotAModule")
    with pytest.raises(LoadError, match="zoo:NotAModule.*not a subclass of torch.nn.Module"):
        _load(saved)
    set_class("os:system")
    with pytest.raises(LoadError, match="'os:system' is not in the load allowlist"):
        _load(saved)
    set_class("no_such_pkg_xyz:Thing")
    with pytest.raises(LoadError, match="no_such_pkg_xyz.*not in the load allowlist"):
        _load(saved)
    set_class("zoo:torch.load")  # a walk through a module attribute of an allowed module
    with pytest.raises(LoadError, match="only nested classes may be named"):
        _load(saved)
    set_class("torch.nn.modules.linear:Linear.forward")  # a method, not a class
    with pytest.raises(LoadError, match="not a subclass of torch.nn.Module"):
        _load(saved)
    set_class("torch.nn:Linear")  # re-exported alias: names must be exact
    with pytest.raises(LoadError, match="alias of torch.nn.modules.linear:Linear"):
        _load(saved)


def test_untrusted_function_reference_rejected(saved: Path) -> None:
    s = json.loads((saved / dio.STRUCTURE_FILE).read_text())
    assert s["module"]["attributes"]["act"] == {"$ref": "torch.nn.functional:gelu"}
    for ref in ("os:system", "zoo:zoo_helper_that_does_not_exist", "torch:load", "builtins:eval",
                "torch.nn.functional:_canonical_mask"):
        _edit(saved, lambda s: s["module"]["attributes"].update(act={"$ref": ref}))
        with pytest.raises(LoadError, match=ref.replace(".", r"\.")):
            _load(saved)  # trusting zoo allows its functions, nothing else beyond the explicit list


def test_old_function_spelling_still_loads(saved: Path) -> None:
    """Saves of format 1 wrote F.gelu as torch._C._nn:gelu: the allowlist knows both spellings."""
    _edit(saved, lambda s: s["module"]["attributes"].update(act={"$ref": "torch._C._nn:gelu"}))
    assert _load(saved).act is torch.nn.functional.gelu


def test_unknown_format_version(saved: Path) -> None:
    _edit(saved, lambda s: s.update(format_version=99))
    with pytest.raises(LoadError, match="unsupported format_version 99"):
        _load(saved)


def test_format_1_needs_verify_false(saved: Path) -> None:
    def downgrade(s: dict[str, Any]) -> None:
        s["format_version"] = 1
        s.pop("checksum")
    _edit(saved, downgrade, rechecksum=False)
    with pytest.raises(LoadError, match="format 1.*no structure checksum.*verify=False"):
        _load(saved)
    assert _load(saved, verify=False).fc1.out_features == 16


# ------------------------------------------------------------------------------------------------ save-time errors


class _LambdaHolder(nn.Module):
    """Module with an attribute that cannot be saved."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.lin.fn = lambda x: x


def test_unsupported_attribute_names_module_and_attribute(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match=r"'lin'.*'fn'"):
        dio.save(_LambdaHolder(), tmp_path / "x")
    m = zoo.AttrMLP()
    m.fc1.handle = open(os.devnull)  # noqa: SIM115
    try:
        with pytest.raises(TypeError, match=r"'fc1'.*'handle'.*TextIOWrapper"):
            dio.save(m, tmp_path / "x")
    finally:
        m.fc1.handle.close()
    assert not (tmp_path / "x").exists()


def test_local_class_and_hooks_rejected(tmp_path: Path) -> None:
    class Local(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x

    with pytest.raises(TypeError, match="inside a function"):
        dio.save(Local(), tmp_path / "x")
    m = zoo.AttrMLP()
    m.fc1.register_forward_hook(lambda mod, i, o: o * 2)
    with pytest.raises(TypeError, match="fc1.*hooks"):
        dio.save(m, tmp_path / "x")


# ------------------------------------------------------------------------------------------------ atomicity


def test_failed_save_keeps_previous(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}

    def boom(*args: Any, **kwargs: Any) -> None:
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(Path, "write_text", boom)  # fails after the weights are written into the temp dir
    with pytest.raises(OSError, match="simulated"):
        dio.save(zoo.AttrMLP(hidden=3), saved)
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert _load(saved).fc1.out_features == 16
    assert sorted(p.name for p in saved.parent.iterdir()) == ["m"]  # no temp dirs left


def test_atomic_write_helpers(tmp_path: Path) -> None:
    p = tmp_path / "sub" / "a.txt"
    dio.atomic_write_text(p, "hello")
    dio.atomic_write_bytes(p, b"world")
    assert p.read_bytes() == b"world"
    assert sorted(x.name for x in p.parent.iterdir()) == ["a.txt"]
    assert p.stat().st_mode & 0o644 == 0o644 or os.name != "posix"


# ------------------------------------------------------------------------------------------------ odds and ends


def test_shared_storage_views_and_compile_wrapper(tmp_path: Path) -> None:
    m = zoo.SharedStorage().eval()
    m2 = _roundtrip(m, tmp_path / "views", torch.randn(3, 4))
    assert torch.equal(m2.b, m.b)
    wrapped = torch.compile(zoo.AttrMLP().eval())  # not run: only the wrapper is unwrapped on save
    dio.save(wrapped, tmp_path / "compiled")
    assert type(_load(tmp_path / "compiled")) is zoo.AttrMLP


_scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**62), 2**62), st.floats(allow_nan=False), st.text(max_size=5),
    st.sampled_from([torch.float16, torch.bfloat16, torch.int64, torch.Size([2, 3]), zoo.Mode.FAST]),
)
_values = st.recursive(
    _scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.lists(inner, max_size=3).map(tuple),
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 9)), inner, max_size=3),
        st.sets(st.one_of(st.integers(0, 9), st.text(max_size=3)), max_size=3),
    ),
    max_leaves=10,
)


@settings(max_examples=150, deadline=None)
@given(_values)
def test_attribute_encoding_roundtrips(value: Any) -> None:
    """Every supported attribute value survives encode -> JSON -> decode exactly (types included)."""
    enc = dio._Saver(nn.Module()).encode(value, "attr")
    dec = dio._Loader({"tensors": {}, "objects": []}, {}, dio.Allowlist(TRUST)).decode(json.loads(json.dumps(enc)), "attr")
    assert _same(dec, value)


def _same(a: Any, b: Any) -> bool:
    """Equal values of identical types, recursively (``1 == 1.0 == True`` is not enough)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(k, j) and _same(a[k], b[j]) for k, j in zip(a, b))
    return a == b


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2", "bert", "t5"])
def test_hf_bit_identical_after_reload(tmp_path: Path, name: str) -> None:
    """Several HF families, including Gemma2, whose GELUTanh holds a functools.partial activation."""
    torch.manual_seed(0)
    small = dict(num_hidden_layers=1, hidden_size=32, num_attention_heads=4, intermediate_size=48, vocab_size=64)
    if name == "gpt2":
        m = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64,
                                                                 n_positions=16, bos_token_id=0, eos_token_id=0))
    elif name == "llama":
        m = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, bos_token_id=0,
                                                                   eos_token_id=0, **small))
    elif name == "gemma2":
        m = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(num_key_value_heads=2, head_dim=8, bos_token_id=0,
                                                                     eos_token_id=0, pad_token_id=0, **small))
    elif name == "bert":
        m = transformers.BertModel(transformers.BertConfig(**small))
    else:
        m = transformers.T5ForConditionalGeneration(transformers.T5Config(num_layers=1, d_model=32, num_heads=4, d_kv=8,
                                                                          d_ff=48, vocab_size=64))
    m.eval()
    ids = torch.randint(0, 64, (2, 11))
    kw = {"input_ids": ids}
    if name == "t5":
        kw["decoder_input_ids"] = ids[:, :5]
    dio.save(m, tmp_path / name)
    m2 = dio.load(tmp_path / name)  # HF classes need no trust=
    with torch.no_grad():
        a, b = m(**kw), m2(**kw)
    a = a.logits if hasattr(a, "logits") else a.last_hidden_state
    b = b.logits if hasattr(b, "logits") else b.last_hidden_state
    assert torch.equal(a, b)
    if name == "gemma2":
        import functools

        act = m2.model.layers[0].mlp.act_fn
        assert type(act).__name__ == "GELUTanh" and isinstance(act.act, functools.partial)
