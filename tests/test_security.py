"""Loading never runs code from the files loaded; saving never destroys what dmscale did not create.

Crafted save directories (a module shipped in the directory, ``$ref`` walks to ``os.system`` through an
allowed package, ``$object`` / ``$enum`` of disallowed classes, swapped layer classes, size attributes
that disagree with the weights, FIFOs, malformed tags and safetensors headers) must each raise
``dmscale.LoadError`` at ``load``, and a marker file proves that no code of theirs ran. Most edits
recompute the structure checksum, as a deliberate attacker would, so the defence behind the
checksum is tested too. Then the data-safety rules (markers, locks, stale temp dirs, SIGKILL during
save) and a hypothesis fuzz test of ``structure.json``.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from torch import nn

import dmscale
from dmscale.serialization import dirs
from dmscale.serialization import format as fmt
from dmscale.serialization.allowlist import DEFAULT_CLASS_PREFIXES, function_names, module_allowed
from dmscale.serialization.errors import DirLockedError, ForeignDirectoryError, LoadError
from dmscale.serialization.sizes import expected_size_attrs

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ helpers
def _model() -> nn.Module:
    """A plain torch model (no trust= needed) with linear, conv, norm, embedding and a partial activation."""
    torch.manual_seed(0)
    m = nn.Sequential(
        nn.Linear(6, 8),
        nn.ReLU(),
        nn.LayerNorm(8),
        nn.Linear(8, 4),
    )
    m.act = functools.partial(torch.nn.functional.gelu, approximate="tanh")
    return m.eval()


@pytest.fixture()
def saved(tmp_path: Path) -> Path:
    path = tmp_path / "m"
    dmscale.save(_model(), path)
    dmscale.load(path)  # loads cleanly before tampering
    return path


def _edit(path: Path, fn: Any, rechecksum: bool = True) -> None:
    """Edit structure.json; by default recompute its checksum so the edit passes the integrity check."""
    f = path / "structure.json"
    s = json.loads(f.read_text())
    fn(s)
    if rechecksum:
        s["checksum"] = {"sha256": fmt.structure_checksum(s)}
    f.write_text(json.dumps(s))


def _no_hang(fn: Any, limit: float = 120.0) -> Any:
    """Run ``fn`` in a thread; fail (instead of hanging the suite) if it never returns. A hang guard, not a timing test."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(limit)
    assert not t.is_alive(), "the call blocked (it must refuse a FIFO at once)"
    if "error" in box:
        raise box["error"]
    return box.get("value")


# ------------------------------------------------------------------------------------------------ code never runs
def test_module_shipped_in_the_directory_is_never_imported(saved: Path, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "PWNED"
    code = f"open({str(marker)!r}, 'w').write('ran')\nimport torch.nn\nclass Linear(torch.nn.Linear):\n    pass\n"
    (saved / "payload.py").write_text(code)
    (saved / "evilpkg").mkdir()
    (saved / "evilpkg" / "__init__.py").write_text(code)
    monkeypatch.syspath_prepend(str(saved))  # as with `python -c` or a notebook started in that directory
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(saved)
    for spec in ("payload:Linear", "m.payload:Linear", "evilpkg:Linear"):
        _edit(saved, lambda s: s["module"]["children"]["0"].update({"class": spec}))
        with pytest.raises(LoadError, match=rf"{spec}.*not in the load allowlist.*was not imported"):
            dmscale.load(saved)
    # even a package the caller trusts is refused when it would come from inside the loaded directory
    with pytest.raises(LoadError, match="'evilpkg' would be imported from inside the directory being loaded"):
        dmscale.load(saved, trust=["evilpkg"])
    assert not marker.exists()
    assert not {"payload", "m.payload", "evilpkg"} & set(sys.modules)


def test_package_shadowed_from_the_directory_in_a_fresh_interpreter(tmp_path: Path) -> None:
    """`python -c "import dmscale; dmscale.load('.')"` run inside a directory that ships its own `transformers/`."""
    transformers = pytest.importorskip("transformers")
    path = tmp_path / "m"
    dmscale.save(transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,
                                                                n_positions=8)), path)
    marker = tmp_path / "PWNED"
    (path / "transformers").mkdir()
    (path / "transformers" / "__init__.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    script = "import dmscale\ntry:\n    dmscale.load('.')\nexcept dmscale.LoadError as e:\n    print(e)\n"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, "-c", script], cwd=path, capture_output=True, text=True, timeout=600, env=env)
    assert "package 'transformers' would be imported from inside the directory being loaded" in out.stdout, out.stderr
    assert not marker.exists()


@pytest.mark.parametrize("ref", ["torch:os.system", "torch.serialization:pickle.loads", "torch.nn:os.system",
                                 "torch.nn.functional:torch.load", "os:system", "builtins:eval", "builtins:exec",
                                 "builtins:__import__", "subprocess:run", "torch:load", "torch.hub:load"])
@pytest.mark.parametrize("where", ["forward", "attribute", "partial"])
def test_function_refs_only_from_the_allowlist(saved: Path, tmp_path: Path, ref: str, where: str) -> None:
    marker = tmp_path / "PWNED"

    def edit(s: dict[str, Any]) -> None:
        attrs = s["module"]["attributes"]
        if where == "forward":
            attrs["forward"] = {"$ref": ref}
        elif where == "attribute":
            attrs["act"] = {"$ref": ref}
        else:
            attrs["act"] = {"$partial": {"func": ref, "args": [f"touch {marker}"], "keywords": {}}}
    _edit(saved, edit)
    with pytest.raises(LoadError, match=r"forward.*would replace the method|not in the (load )?allowlist|walks through"):
        m = dmscale.load(saved)
        m(torch.randn(2, 6))  # never reached
    assert not marker.exists()


def test_no_method_or_hook_is_restored_from_the_file(saved: Path) -> None:
    original = (saved / "structure.json").read_text()
    for name, value in (("forward", {"$ref": "torch.nn.functional:relu"}), ("__call__", {"$ref": "torch:relu"}),
                        ("_call_impl", {"$ref": "torch:relu"}), ("_forward_hooks", {}), ("__class__", "x"),
                        ("register_forward_hook", 1), ("state_dict", {"$ref": "torch:relu"})):
        (saved / "structure.json").write_text(original)
        _edit(saved, lambda s: s["module"]["attributes"].update({name: value}))
        with pytest.raises(LoadError, match=rf"{name}.*(reserved|would replace the method)"):
            dmscale.load(saved)


def test_save_refuses_a_monkeypatched_method(tmp_path: Path) -> None:
    m = _model()
    m.forward = torch.relu  # a method replaced by an instance attribute: a saved file may not carry that
    with pytest.raises(TypeError, match="attribute 'forward': replaces the method"):
        dmscale.save(m, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("spec", ["subprocess:Popen", "os:system", "builtins:eval",
                                  "torch.nn.modules.linear:Linear", "torch.serialization:pickle.Unpickler"])
def test_object_of_a_disallowed_class(saved: Path, tmp_path: Path, spec: str) -> None:
    marker = tmp_path / "PWNED"

    def edit(s: dict[str, Any]) -> None:
        s["objects"].append({"class": spec, "kind": "hf_config", "data": {"args": ["touch", str(marker)]},
                             "private": {}})
        s["module"]["attributes"]["config"] = {"$object": len(s["objects"]) - 1}
    _edit(saved, edit)
    with pytest.raises(LoadError, match=rf"{spec.replace('.', '[.]')}.*(not in the load allowlist|not a Hugging Face "
                                        "config class|walks through)"):
        dmscale.load(saved)
    assert not marker.exists()


@pytest.mark.parametrize("spec", ["subprocess:Popen", "signal:Signals", "torch.nn.modules.linear:Linear"])
def test_enum_of_a_disallowed_class(saved: Path, spec: str) -> None:
    _edit(saved, lambda s: s["module"]["attributes"].update(mode={"$enum": spec, "member": "SIGKILL"}))
    with pytest.raises(LoadError, match=rf"{spec}.*(not in the load allowlist|not an Enum)"):
        dmscale.load(saved)


def test_swapped_layer_class_is_refused(saved: Path) -> None:
    swap = "torch.nn.modules.linear:Identity"
    _edit(saved, lambda s: s["module"]["children"]["1"].update({"class": swap}), rechecksum=False)
    with pytest.raises(LoadError, match="structure.json.*modified or is corrupted"):
        dmscale.load(saved)
    # with a recomputed checksum, a class that does not match the layer's weights fails the size check
    _edit(saved, lambda s: s["module"]["children"]["0"].update({"class": "torch.nn.modules.conv:Conv1d"}))
    with pytest.raises(LoadError, match=r"module '0' \(Conv1d\): its size attributes cannot be derived"):
        dmscale.load(saved)


def test_swapped_weights_of_same_size_are_refused(saved: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    dmscale.save(_model().apply(lambda m: [nn.init.zeros_(p) for p in m.parameters(recurse=False)]), other)
    (saved / "model.safetensors").write_bytes((other / "model.safetensors").read_bytes())
    with pytest.raises(LoadError, match="SHA-256"):
        dmscale.load(saved)


@pytest.mark.parametrize("child,attr,value,match", [
    ("0", "out_features", 9, "out_features=9 but its weights imply out_features=8"),
    ("0", "in_features", 6.0, "in_features=6.0 but its weights imply in_features=6"),
    ("0", "in_features", True, "in_features=True"),
    ("2", "normalized_shape", {"$tuple": [9]}, r"normalized_shape=\(9,\)"),
    ("3", "out_features", None, "out_features=None"),
])
def test_size_attribute_disagreeing_with_weights(saved: Path, child: str, attr: str, value: Any, match: str) -> None:
    _edit(saved, lambda s: s["module"]["children"][child]["attributes"].update({attr: value}))
    with pytest.raises(LoadError, match=match):
        dmscale.load(saved)


def test_missing_size_attribute(saved: Path) -> None:
    _edit(saved, lambda s: s["module"]["children"]["0"]["attributes"].pop("out_features"))
    with pytest.raises(LoadError, match="size attribute 'out_features' is missing"):
        dmscale.load(saved)


@pytest.mark.parametrize("make,attr,value,match", [
    (lambda: nn.Conv2d(4, 6, 3, groups=2), "groups", 3, "in_channels=4 but its weights imply in_channels=6"),
    (lambda: nn.Conv2d(4, 6, 3), "kernel_size", {"$tuple": [5, 5]}, "kernel_size"),
    (lambda: nn.ConvTranspose2d(4, 6, 3, groups=2), "out_channels", 3, "out_channels"),
    (lambda: nn.BatchNorm2d(5), "num_features", 4, "num_features"),
    (lambda: nn.GroupNorm(2, 6), "num_groups", 4, "divisible by num_groups=4"),
    (lambda: nn.Embedding(10, 4, padding_idx=1), "padding_idx", 12, "padding_idx"),
    (lambda: nn.MultiheadAttention(8, 2), "num_heads", 3, "num_heads|head_dim"),
    (lambda: nn.LSTM(4, 6, 2), "hidden_size", 5, "hidden_size"),
    (lambda: nn.LSTM(4, 6, 2), "num_layers", 1, "num_layers"),
    (lambda: nn.PReLU(3), "num_parameters", 1, "num_parameters"),
])
def test_size_rules_of_more_layers(tmp_path: Path, make: Any, attr: str, value: Any, match: str) -> None:
    path = tmp_path / "m"
    dmscale.save(make(), path)
    dmscale.load(path)
    _edit(path, lambda s: s["module"]["attributes"].update({attr: value}))
    with pytest.raises(LoadError, match=match):
        dmscale.load(path)


def test_hf_config_cannot_name_a_hub_kernel(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    m = transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16, n_positions=8))
    path = tmp_path / "m"
    dmscale.save(m, path)
    assert dmscale.load(path).config._attn_implementation == m.config._attn_implementation

    def edit(s: dict[str, Any]) -> None:
        s["objects"][0]["private"]["_attn_implementation_internal"] = "someone/evil-kernel"
    _edit(path, edit)
    with pytest.raises(LoadError, match="_attn_implementation_internal='someone/evil-kernel' is not a built-in"):
        dmscale.load(path)


def test_hf_conv1d_size_attributes(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    path = tmp_path / "m"
    dmscale.save(Conv1D(5, 3), path)
    assert expected_size_attrs(dmscale.load(path))["nf"] == 5
    _edit(path, lambda s: s["module"]["attributes"].update(nf=4))
    with pytest.raises(LoadError, match="nf=4 but its weights imply nf=5"):
        dmscale.load(path)
    del transformers


# ------------------------------------------------------------------------------------------------ special files
def test_fifo_structure_never_hangs_load_or_save(saved: Path, tmp_path: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this platform")
    (saved / "structure.json").unlink()
    os.mkfifo(saved / "structure.json")
    with pytest.raises(LoadError, match="structure file .* is a FIFO, not a regular file"):
        _no_hang(lambda: dmscale.load(saved))
    with pytest.raises(ForeignDirectoryError, match=r"structure.json \(FIFO\)"):
        _no_hang(lambda: dmscale.save(_model(), saved))
    assert (saved / "structure.json").is_fifo()  # left untouched


def test_fifo_or_device_as_weights(saved: Path) -> None:
    w = saved / "model.safetensors"
    w.unlink()
    os.mkfifo(w)
    with pytest.raises(LoadError, match="weights file .* is a FIFO"):
        _no_hang(lambda: dmscale.load(saved))
    w.unlink()
    w.symlink_to("/dev/zero")
    with pytest.raises(LoadError, match="weights file .* is a character device"):
        _no_hang(lambda: dmscale.load(saved))


def test_directory_as_structure(saved: Path) -> None:
    (saved / "structure.json").unlink()
    (saved / "structure.json").mkdir()
    with pytest.raises(LoadError, match="is a directory, not a regular file"):
        dmscale.load(saved)


# ------------------------------------------------------------------------------------------------ malformed files
@pytest.mark.parametrize("value", [
    {"$tuple": 5}, {"$set": [[1]]}, {"$size": [-1]}, {"$size": "x"}, {"$dict": [[1]]}, {"$dict": [[[1], 2]]},
    {"$float": "1e400"}, {"$dtype": "nn"}, {"$dtype": "_inductor"}, {"$device": 5}, {"$device": "qpu:99"},
    {"$module": "nope"}, {"$tensor": "nope"}, {"$object": 99}, {"$object": "0"}, {"$unknown": 1},
    {"$tuple": [], "extra": 1}, {"$enum": "torch.nn.modules.linear:Linear"}, {"$partial": {"func": "torch:relu"}},
    {"$partial": {"func": "torch:relu", "args": [{"$ref": "torch:relu"}], "keywords": {}}},
    {"$partial": {"func": "torch:relu", "args": 1, "keywords": {}}}, {"$ref": 5}, {"$ref": "a:b:c"},
    {"$ref": "torch:re lu"},
])
def test_malformed_tags(saved: Path, value: Any) -> None:
    _edit(saved, lambda s: s["module"]["attributes"].update(bad=value))
    with pytest.raises(LoadError, match=r"module '<root>' attribute 'bad'|invalid|malformed|unknown"):
        dmscale.load(saved)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["module"]["children"]["0"].update(parameters=[1]), "'parameters' must be an object"),
    (lambda s: s["module"]["children"]["0"]["parameters"].update({"a.b": None}), "invalid parameter name 'a.b'"),
    (lambda s: s["module"]["children"].update({"4": {"alias": ""}}), "aliases its own ancestor"),
    (lambda s: s["module"]["children"].update({"4": {"alias": "9"}}), "aliases unknown module path"),
    (lambda s: s["module"].update(training="yes"), "'training' must be true or false"),
    (lambda s: s.update(num_parameters="5"), "num_parameters"),
    (lambda s: s["tensors"]["0.weight"].update(dtype="float64"), "dtype"),
    (lambda s: s["tensors"]["0.weight"].update(kind="evil"), "invalid kind"),
    (lambda s: s["weights"].update(file="../../etc/passwd"), "invalid weights file name"),
    (lambda s: s.update(module=[]), "missing or invalid 'module' section"),
    (lambda s: s["module"].update({"class": None}), "invalid class/function name None"),
])
def test_malformed_structure(saved: Path, edit: Any, match: str) -> None:
    _edit(saved, edit)
    with pytest.raises(LoadError, match=match):
        dmscale.load(saved)


@pytest.mark.parametrize("text,match", [
    ('{"format": NaN}', "not valid JSON"), ("[" * 100000 + "]" * 100000, "not valid JSON"),
    ('{"format": 1e999}', "not valid JSON"), ("\xff\xfe", "not valid JSON"), ("[]", "not a dmscale model"),
])
def test_garbage_structure_files(saved: Path, text: str, match: str) -> None:
    (saved / "structure.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(LoadError, match=match):
        dmscale.load(saved)


def _safetensors_with_header(header: dict[str, Any], data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize("header,data,match", [
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, "b": {"dtype": "F32", "shape": [1],
      "data_offsets": [4, 8]}}, b"\0" * 8, "overlaps"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, b"\0" * 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not hold shape"),
    ({"a": {"dtype": "PY_OBJECT", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8, "unsupported dtype"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 99]}}, b"\0" * 8, "outside the data"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 8, "bytes after the last tensor"),
    ({"a": {"dtype": "BOOL", "shape": [2], "data_offsets": [0, 2]}}, b"\x00\x07", "bool tensor"),
])
def test_malformed_safetensors(tmp_path: Path, header: dict[str, Any], data: bytes, match: str) -> None:
    from dmscale.serialization.weights import parse_safetensors

    with pytest.raises(LoadError, match=match):
        parse_safetensors(bytearray(_safetensors_with_header(header, data)), where="w")
    with pytest.raises(LoadError, match="invalid safetensors header length"):
        parse_safetensors(bytearray(b"\xff" * 16), where="w")


def test_trust_argument_is_checked(saved: Path) -> None:
    for bad in (["os"], ["builtins"], ["subprocess.run"], [""], ["a b"], [5]):
        with pytest.raises((ValueError, TypeError), match="trust"):
            dmscale.load(saved, trust=bad)
    assert isinstance(dmscale.load(saved, trust="mypkg.models"), nn.Sequential)


def test_allowlists_are_what_the_docs_say() -> None:
    assert DEFAULT_CLASS_PREFIXES[:2] == ("torch.nn", "transformers.models") and "dmscale" in DEFAULT_CLASS_PREFIXES
    fns = function_names()
    assert fns["torch.nn.functional:gelu"] is torch.nn.functional.gelu
    for spelling in fns:  # nothing that can reach the interpreter, the file system or pickle
        mod = spelling.split(":")[0]
        assert mod.split(".")[0] in ("torch", "math", "operator", "_operator", "builtins"), spelling
        assert not any(w in spelling for w in ("eval", "exec", "open", "import", "load", "system", "compile"))
    assert module_allowed("torch.nn.modules.linear", DEFAULT_CLASS_PREFIXES)
    assert not module_allowed("torch.nnx", DEFAULT_CLASS_PREFIXES) and not module_allowed("dmscalex", ["dmscale"])


# ------------------------------------------------------------------------------------------------ data safety
def test_save_over_user_files_is_refused(tmp_path: Path) -> None:
    d = tmp_path / "m"
    dmscale.save(_model(), d)
    (d / "notes.txt").write_text("mine")
    with pytest.raises(ForeignDirectoryError, match=r"holds files dmscale did not write: notes\.txt"):
        dmscale.save(_model(), d)
    assert (d / "notes.txt").read_text() == "mine" and dmscale.load(d) is not None
    u = tmp_path / "user"
    u.mkdir()
    (u / "structure.json").write_text('{"format": "dmscale.module"}')  # looks like a save, plus a user file
    (u / "thesis.tex").write_text("x")
    with pytest.raises(ForeignDirectoryError):
        dmscale.save(_model(), u)
    assert sorted(p.name for p in u.iterdir()) == ["structure.json", "thesis.tex"]
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ForeignDirectoryError, match="regular file, not a directory"):
        dmscale.save(_model(), f)
    link = tmp_path / "link"
    link.symlink_to(d)
    with pytest.raises(ForeignDirectoryError, match="symbolic link"):
        dmscale.save(_model(), link)
    other = tmp_path / "run"
    dirs.claim_dir(other, "run")
    with pytest.raises(ForeignDirectoryError, match="not created by dmscale"):
        dmscale.save(_model(), other)  # a run directory is not a model directory


def test_user_file_appearing_during_save_is_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file the user drops into the old directory while it is being replaced survives (with a warning)."""
    d = tmp_path / "m"
    dmscale.save(_model(), d)
    real = dirs.rename_exchange

    def exchange_then_user_writes(a: Path, b: Path) -> bool:
        ok = real(a, b)
        (a if ok else b).joinpath("late.txt").write_text("mine")  # `a` now holds the old contents
        return ok
    monkeypatch.setattr(dirs, "rename_exchange", exchange_then_user_writes)
    with pytest.warns(UserWarning, match="files dmscale did not write appeared"):
        dmscale.save(_model(), d)
    kept = [p for p in tmp_path.iterdir() if (p / "late.txt").exists()]
    assert len(kept) == 1 and (kept[0] / "late.txt").read_text() == "mine"
    assert dmscale.load(d) is not None


def test_stale_temp_dirs_are_cleaned_live_ones_kept(tmp_path: Path) -> None:
    d = tmp_path / "m"
    stale = tmp_path / ".m.tmp-abcd1234"  # what a killed save leaves: marked, unlocked
    dirs.claim_dir(stale, "model")
    (stale / "model.safetensors").write_bytes(b"partial")
    live = tmp_path / ".m.tmp-live5678"  # a concurrent save in progress: marked and locked
    dirs.claim_dir(live, "model")
    fd = os.open(live, os.O_RDONLY)
    foreign = tmp_path / ".m.tmp-users000"  # the same name pattern without a marker: not dmscale's
    foreign.mkdir()
    (foreign / "data.txt").write_text("x")
    try:
        import fcntl

        fcntl.flock(fd, fcntl.LOCK_EX)
        dmscale.save(_model(), d)
        assert not stale.exists() and live.exists() and (foreign / "data.txt").exists()
    finally:
        os.close(fd)
    dmscale.save(_model(), d)  # the writer of `live` is gone now
    assert not live.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".m.tmp-users000", "m"]


_KILL_WORKER = """
import sys, time, os
from pathlib import Path
import torch, dmscale
path = Path(sys.argv[1])
model = torch.nn.Sequential(torch.nn.Linear(64, 64))
with torch.no_grad():
    model[0].weight.fill_(2.0)
orig = Path.write_text
def stall(self, *a, **k):  # called for structure.json inside the temp dir: the weights are already written
    print("inside", flush=True)
    time.sleep(600)
Path.write_text = stall
dmscale.save(model, path)
"""


def test_sigkill_during_save_keeps_old_model_and_next_save_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "m"
    old = nn.Sequential(nn.Linear(64, 64))
    dmscale.save(old, path)
    proc = subprocess.Popen([sys.executable, "-c", _KILL_WORKER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get(
                                "PYTHONPATH", "")])})
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "inside"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    leftovers = [p for p in tmp_path.iterdir() if p.name.startswith(".m.tmp-")]
    assert len(leftovers) == 1  # the killed save's temp dir
    torch.testing.assert_close(dmscale.load(path)[0].weight, old[0].weight, rtol=0, atol=0)  # the complete old one
    new = nn.Sequential(nn.Linear(64, 64))
    dmscale.save(new, path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    torch.testing.assert_close(dmscale.load(path)[0].weight, new[0].weight, rtol=0, atol=0)


_LOCK_HOLDER = """
import sys, time
from dmscale.serialization.dirs import lock_dir
lock = lock_dir(sys.argv[1])
print("locked", flush=True)
time.sleep(600)
"""


def _hold_lock(path: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", _LOCK_HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get(
                                "PYTHONPATH", "")])})
    assert proc.stdout is not None and proc.stdout.readline().strip() == "locked"
    return proc


def test_lock_refuses_a_second_holder_naming_its_pid(tmp_path: Path) -> None:
    d = tmp_path / "run"
    proc = _hold_lock(d)
    try:
        with pytest.raises(DirLockedError, match=rf"in use by another dmscale process \(PID {proc.pid}\)") as ei:
            dirs.lock_dir(d)
        assert ei.value.pid == proc.pid
        dirs.claim_dir(d, "run")
        with pytest.raises(DirLockedError):
            dirs.remove_dmscale_dir(d, "run")  # never deletes a directory another command is using
        assert d.exists()
    finally:
        proc.kill()
        proc.wait()
    with dirs.lock_dir(d) as lock:  # released when the holder died
        assert lock.held
        with dirs.lock_dir(d):  # re-entrant within one process
            pass
        assert lock.held
    assert not lock.held


def test_lock_taken_non_reentrant_refuses_a_second_holder_in_this_process(tmp_path: Path) -> None:
    d = tmp_path / "run"
    with dirs.lock_dir(d, what="run directory", reentrant=False):
        for kw in ({}, {"reentrant": False}):
            with pytest.raises(DirLockedError, match=rf"run directory .* in use .*\(PID {os.getpid()}\)") as ei:
                dirs.lock_dir(d, what="run directory", **kw)
            assert ei.value.pid == os.getpid()
        with pytest.raises(DirLockedError):
            dirs.remove_dmscale_dir(dirs.claim_dir(d, "run"), "run")
    with dirs.lock_dir(d):  # a shared hold refuses an exclusive one, too
        with pytest.raises(DirLockedError):
            dirs.lock_dir(d, reentrant=False)
    with dirs.lock_dir(d, reentrant=False) as lock:  # all released: free again
        assert lock.held


def test_markers(tmp_path: Path) -> None:
    d = tmp_path / "a"
    assert dirs.dir_kind(d) is None and not dirs.is_dmscale_dir(d)
    dirs.claim_dir(d, "run")
    assert dirs.dir_kind(d) == "run" and dirs.is_dmscale_dir(d, "run") and not dirs.is_dmscale_dir(d, "model")
    assert dirs.enclosing_dmscale_dir(d / "x" / "y", "run") == d.absolute()
    with pytest.raises(ForeignDirectoryError, match="is a dmscale run directory, not a model directory"):
        dirs.claim_dir(d, "model")
    f = tmp_path / "fifo"
    f.mkdir()
    os.mkfifo(f / dirs.MARKER_FILE)
    assert _no_hang(lambda: dirs.dir_kind(f)) is None  # a FIFO marker is no marker, and never blocks
    with pytest.raises(ForeignDirectoryError, match="not created by dmscale"):
        dirs.remove_dmscale_dir(tmp_path / "fifo", "run")
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.yaml").write_text("run: {}\n")
    with pytest.raises(ForeignDirectoryError, match="not created by dmscale as a run directory"):
        dirs.remove_dmscale_dir(plain, "run")
    assert (plain / "config.yaml").exists()
    dirs.remove_dmscale_dir(d, "run")
    assert not d.exists()


def test_atomic_write_cleans_stale_temp_files(tmp_path: Path) -> None:
    from dmscale.serialization.atomic import atomic_write_text

    target = tmp_path / "state.json"
    stale = tmp_path / ".state.json.tmp-ab12cd34"
    stale.write_text("half")
    empty = tmp_path / ".state.json.tmp-zz99zz99"  # created, not yet written by a live writer: kept
    empty.write_text("")
    atomic_write_text(target, "{}")
    assert not stale.exists() and empty.exists() and target.read_text() == "{}"


# ------------------------------------------------------------------------------------------------ fuzz
_FUZZ_MODEL = _model()
_CLASS_CHOICES = ["torch.nn.modules.linear:Linear", "torch.nn.modules.linear:Identity", "torch.nn.modules.conv:Conv1d",
                  "torch.nn.modules.container:Sequential", "torch.nn.modules.normalization:LayerNorm",
                  "torch.nn.modules.activation:ReLU", "torch.nn.modules.sparse:Embedding", "os:system",
                  "torch:os.system", "subprocess:Popen", "dmscale.app.cli:main", "torch.nn:Linear", "x", ""]
_TAGS = ["$tuple", "$set", "$frozenset", "$dict", "$odict", "$float", "$dtype", "$size", "$device", "$module",
         "$tensor", "$object", "$ref", "$partial", "$enum", "$nope"]
_json_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 70), st.floats(allow_nan=False, allow_infinity=False),
                          st.sampled_from(_CLASS_CHOICES), st.text(max_size=4))
_json_values = st.recursive(
    _json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3),
                            st.dictionaries(st.sampled_from(_TAGS + ["a", "class", "alias", "key"]), inner, max_size=2)),
    max_leaves=6,
)


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, prefix + (i,))
    return out


def _get(node: Any, path: tuple[Any, ...]) -> Any:
    for p in path:
        node = node[p]
    return node


def _assert_safe_model(m: nn.Module) -> None:
    """What a loaded model guarantees even when the file was rewritten by an attacker with a valid checksum."""
    allowed_fns = {id(f) for f in function_names().values()}
    for name, mod in m.named_modules():
        assert module_allowed(type(mod).__module__, DEFAULT_CLASS_PREFIXES), (name, type(mod))
        for k, want in expected_size_attrs(mod).items():
            assert mod.__dict__.get(k) == want, (name, k)
        for k, v in mod.__dict__.items():
            f = v.func if isinstance(v, functools.partial) else v
            if callable(f) and not isinstance(f, (nn.Module, type)):
                assert id(f) in allowed_fns, (name, k, f)


@pytest.fixture(scope="module")
def fuzz_templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Saved models the fuzz test edits: plain torch layers with a partial activation, and a tiny HF GPT-2
    (Conv1D, configs as objects, allowlisted activation classes)."""
    out = {}
    root = tmp_path_factory.mktemp("fuzz-templates")
    dmscale.save(_FUZZ_MODEL, root / "torch")
    out["torch"] = root / "torch"
    try:
        import transformers
    except ImportError:  # pragma: no cover - transformers is a test dependency
        return out
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=8, n_head=2, vocab_size=16,
                                                                n_positions=8, bos_token_id=0, eos_token_id=0))
    dmscale.save(gpt2.eval(), root / "gpt2")
    out["gpt2"] = root / "gpt2"
    return out


@settings(max_examples=int(os.environ.get("DMSCALE_HYPOTHESIS_EXAMPLES", "150")), deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_structure_load_is_equal_or_load_error(tmp_path_factory: pytest.TempPathFactory,
                                                    fuzz_templates: dict[str, Path], data: Any) -> None:
    """Random edits to classes, sizes, tags and types: LoadError or a model; never another exception or a hang."""
    import shutil

    name = data.draw(st.sampled_from(sorted(fuzz_templates)), label="model")
    path = tmp_path_factory.mktemp("fuzz") / "m"
    shutil.copytree(fuzz_templates[name], path)
    original = json.loads((path / "structure.json").read_text())
    s = copy.deepcopy(original)
    targets = [p for p in _paths(s["module"], ("module",)) + _paths(s["tensors"], ("tensors",))
               + _paths(s["objects"], ("objects",)) if p]
    path_ = data.draw(st.sampled_from(targets), label="path")
    parent, key = _get(s, path_[:-1]), path_[-1]
    kind = data.draw(st.sampled_from(["replace", "delete", "bump", "class", "retype"]), label="kind")
    old = parent[key]
    if kind == "delete" and isinstance(parent, dict):
        del parent[key]
    elif kind == "bump" and type(old) is int:
        parent[key] = old + data.draw(st.sampled_from([-1, 1, 7]))
    elif kind == "class":
        parent[key] = data.draw(st.sampled_from(_CLASS_CHOICES))
    elif kind == "retype":
        parent[key] = data.draw(st.sampled_from([str(old), [old], {"$tuple": [old]}, float(len(str(old))), None, True]))
    else:
        parent[key] = data.draw(_json_values, label="value")
    rechecksum = data.draw(st.booleans(), label="rechecksum")
    if rechecksum:
        try:
            s["checksum"] = {"sha256": fmt.structure_checksum(s)}
        except ValueError:
            rechecksum = False
    (path / "structure.json").write_text(json.dumps(s))
    try:
        m = dmscale.load(path)
    except LoadError as exc:
        msg = str(exc)
        # every refusal comes from a named check, not from load's last-resort wrapper of unexpected exceptions
        assert "cannot load this model" not in msg, msg
        event("LoadError: checksum" if "checksum" in msg else "LoadError: a specific check")
        return
    event("loaded (no-op edit)" if s == original else "loaded an edited model")
    if s == original:  # a no-op edit: the very same model
        ref = dmscale.load(fuzz_templates[name]).state_dict()
        got = m.state_dict()
        assert list(ref) == list(got) and all(torch.equal(ref[k], got[k]) for k in ref)
        return
    assert rechecksum, "an edit without a recomputed checksum must be refused"
    _assert_safe_model(m)


def test_fuzz_runs_in_a_subprocess_without_hanging(tmp_path: Path) -> None:
    """A handful of crafted files loaded by a separate interpreter: each returns (an error or a model) promptly."""
    script = textwrap.dedent("""
        import json, sys, dmscale
        from dmscale.serialization import format as fmt
        path = sys.argv[1]
        s = json.loads(open(path + "/structure.json").read())
        s["module"]["children"]["0"]["attributes"]["in_features"] = {"$tuple": [[[[[[]]]]]]}
        s["checksum"] = {"sha256": fmt.structure_checksum(s)}
        open(path + "/structure.json", "w").write(json.dumps(s))
        try:
            dmscale.load(path)
        except dmscale.LoadError as e:
            print("LoadError")
    """)
    path = tmp_path / "m"
    dmscale.save(_model(), path)
    out = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                           os.environ.get("PYTHONPATH", "")])})
    assert out.stdout.strip() == "LoadError", out.stderr
