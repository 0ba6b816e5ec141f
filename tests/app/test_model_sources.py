"""--model sources: module:factory with kwargs, dmscale.save / run directories, hf: checkpoints; their errors."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import dmscale
from dmscale.app.models import ModelSpecError, load_model, model_kind, parse_model_kwargs

FACTORY_SRC = '''
import torch.nn as nn

class Net(nn.Module):
    def __init__(self, width=8, classes=3):
        super().__init__()
        self.fc1 = nn.Linear(4, width)
        self.fc2 = nn.Linear(width, classes)

    def forward(self, x):
        return self.fc2(self.fc1(x).relu())

def build(width=8, classes=3):
    return Net(width, classes)

class Zoo:
    @staticmethod
    def small():
        return Net(2, 2)

def not_a_model():
    return 42

NUMBER = 7
'''


@pytest.fixture
def user_pkg(tmp_path, monkeypatch):
    """An importable user package ``userpkg.nets`` (and one that fails to import)."""
    pkg = tmp_path / "userpkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(FACTORY_SRC))
    (pkg / "broken.py").write_text("import a_module_that_does_not_exist_anywhere\n")
    (pkg / "raises.py").write_text("raise RuntimeError('boom at import')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "userpkg"
    for m in [m for m in sys.modules if m == "userpkg" or m.startswith("userpkg.")]:
        del sys.modules[m]


def test_factory_with_kwargs(user_pkg):
    m = load_model("userpkg.nets:build", {"width": 5, "classes": 7})
    assert m.fc1.out_features == 5 and m.fc2.out_features == 7
    m = load_model("userpkg.nets:Net", '{"width": 3}')  # a class, JSON kwargs
    assert m.fc1.out_features == 3 and m.fc2.out_features == 3
    m = load_model("userpkg.nets:Zoo.small")  # a dotted attribute
    assert m.fc2.out_features == 2
    assert model_kind("userpkg.nets:build") == "factory"


def test_factory_errors_name_the_problem(user_pkg):
    with pytest.raises(ModelSpecError, match="module 'userpkg.nope' is not importable"):
        load_model("userpkg.nope:build")
    with pytest.raises(ModelSpecError, match="importing 'userpkg.broken' failed: ModuleNotFoundError"):
        load_model("userpkg.broken:build")
    with pytest.raises(ModelSpecError, match="importing 'userpkg.raises' failed: RuntimeError: boom at import"):
        load_model("userpkg.raises:build")
    with pytest.raises(ModelSpecError, match="has no attribute 'biuld'; did you mean build"):
        load_model("userpkg.nets:biuld")
    with pytest.raises(ModelSpecError, match="returned a int, not a torch.nn.Module"):
        load_model("userpkg.nets:not_a_model")
    with pytest.raises(ModelSpecError, match="NUMBER is a int, not a callable"):
        load_model("userpkg.nets:NUMBER")
    with pytest.raises(ModelSpecError, match=r"calling build\(width=8, classes=3\) with --model-kwargs"):
        load_model("userpkg.nets:build", {"depth": 3})
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        load_model("userpkg.nets:build", "{width: 3}")
    with pytest.raises(ModelSpecError, match="expected a JSON object, got list"):
        parse_model_kwargs("[1, 2]")
    with pytest.raises(ModelSpecError, match="not of the form"):
        load_model("no_colon_and_no_such_path")


def test_dmscale_save_and_run_directory(user_pkg, tmp_path):
    torch.manual_seed(0)
    net = load_model("userpkg.nets:build", {"width": 6}).eval()
    dmscale.save(net, tmp_path / "saved")
    x = torch.randn(5, 4)
    back = load_model(tmp_path / "saved", trust=["userpkg"])
    assert model_kind(str(tmp_path / "saved")) == "dmscale"
    torch.testing.assert_close(back(x), net(x))
    run = tmp_path / "run"
    run.mkdir()
    dmscale.save(net, run / "model")
    torch.testing.assert_close(load_model(str(run), trust=["userpkg"])(x), net(x))  # a run directory's model/
    with pytest.raises(ModelSpecError, match="--model-kwargs apply to"):
        load_model(tmp_path / "saved", {"width": 3})


def test_directory_that_is_not_a_model(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="not a model directory: no structure.json"):
        load_model(tmp_path / "empty")
    (tmp_path / "hfish").mkdir()
    (tmp_path / "hfish" / "config.json").write_text("{}")
    with pytest.raises(ModelSpecError, match="write it as hf:"):
        load_model(tmp_path / "hfish")
    with pytest.raises(ModelSpecError, match="not a Hugging Face checkpoint: no config.json"):
        load_model(f"hf:{tmp_path / 'empty'}")
    (tmp_path / "g").mkdir()
    (tmp_path / "g" / "m.gguf").write_bytes(b"GGUF")
    with pytest.raises(ModelSpecError, match="gguf_file"):
        load_model(f"hf:{tmp_path / 'g'}")


def _tiny_llama(tmp_path: Path) -> tuple[nn.Module, Path]:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = transformers.LlamaForCausalLM(cfg).eval()
    model.save_pretrained(tmp_path / "llama")
    return model, tmp_path / "llama"


def test_hf_checkpoint(tmp_path):
    model, path = _tiny_llama(tmp_path)
    got = load_model(f"hf:{path}")
    assert type(got).__name__ == "LlamaForCausalLM"
    ids = torch.randint(0, 64, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, model(ids).logits)
    base = load_model(f"hf:{path}", task="base")
    assert type(base).__name__ == "LlamaModel"
    half = load_model(f"hf:{path}", '{"dtype": "bfloat16"}')
    assert next(half.parameters()).dtype == torch.bfloat16
    with pytest.raises(ModelSpecError, match="task 'translation' unknown"):
        load_model(f"hf:{path}", task="translation")
    with pytest.raises(ModelSpecError, match="trust_remote_code is refused"):
        load_model(f"hf:{path}", {"trust_remote_code": True})
    cfg = json.loads((path / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.Evil"}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ModelSpecError, match="needs its own Python code"):
        load_model(f"hf:{path}")
    with pytest.raises(ModelSpecError, match="cannot read a Hugging Face config.*no such local directory"):
        load_model("hf:nobody-org/no-such-model-offline")


def test_hf_image_classifier(tmp_path):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=1, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    vit = transformers.ViTForImageClassification(cfg).eval()
    vit.save_pretrained(tmp_path / "vit")
    got = load_model(f"hf:{tmp_path / 'vit'}")
    assert type(got).__name__ == "ViTForImageClassification"
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(got(x).logits, vit(x).logits)
