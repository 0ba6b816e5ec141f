"""The training commands on the user's own model and data: every --model form (module:factory, a dmscale.save
directory, hf:), every --data form (image folder, .npz, text, a built-in set), --loss, --distill, the uniform
baseline through masks, resume, and bad input (exit code 2 naming the flag and the value)."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import dmscale
from dmscale.app import pipelines
from dmscale.app.cli import main
from dmscale.app.config import load_config

from clitools import set_args

PKG = "dms_cli_userpkg"
NETS = '''
import torch
import torch.nn as nn
import torch.nn.functional as F


class SmallCNN(nn.Module):
    def __init__(self, width=8, classes=3, in_ch=1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.head(x.mean((2, 3)))


def build(width=8, classes=3, in_ch=1):
    return SmallCNN(width, classes, in_ch)


def margin_loss(model, batch):
    """A loss of the user's own: multi-class hinge, with a metric of its own."""
    x, y = batch
    out = model(x)
    return F.multi_margin_loss(out, y), {"margin_acc": float((out.argmax(1) == y).float().mean())}


def per_example_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="none")   # not a scalar


def not_a_tensor(model, batch):
    return 1.0
'''

TINY = ["run.checkpoint_every=2", "run.threads=1", "data.batch_size=16", "data.eval_batch_size=64",
        "search.steps=4", "retrain.steps=3", "pretrain.steps=3", "search.bn_recalibrate=2"]
TEXT = ["data.seq_len=32", "data.batch_size=4", "data.eval_batch_size=8"]


def sets(*extra: str) -> list[str]:
    return set_args(*TINY, *extra) + ["-q"]


pytestmark = pytest.mark.usefixtures("restore_threads")


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory):
    """The user's package (on sys.path), an image folder, an .npz file, a text file, a tiny Llama checkpoint."""
    root = tmp_path_factory.mktemp("user")
    pkg = root / "src" / PKG
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "nets.py").write_text(textwrap.dedent(NETS))
    sys.path.insert(0, str(root / "src"))
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(3):  # 3 classes of 8x8 gray images, told apart by a bright band
        (root / "imgs" / f"class{c}").mkdir(parents=True)
        for i in range(16):
            a = (rng.random((8, 8)) * 80).astype(np.uint8)
            a[:, 2 * c:2 * c + 3] += 150
            Image.fromarray(a).save(root / "imgs" / f"class{c}" / f"{i}.png")
    x = rng.random((60, 8, 8, 1)).astype(np.float32)  # NHWC, detected
    y = np.repeat(np.arange(3), 20)
    for c in range(3):
        x[y == c, 2 * c:2 * c + 3] += 1.0
    np.savez(root / "arrays.npz", x=x, y=y)
    text = (Path(dmscale.__file__).parent / "app" / "_data" / "tiny.txt").read_text("utf-8")
    (root / "corpus.txt").write_text(text, encoding="utf-8")
    (root / "blob.bin").write_bytes(b"\x00\x01\x02")
    paths = {"root": root, "imgs": root / "imgs", "npz": root / "arrays.npz", "text": root / "corpus.txt",
             "bin": root / "blob.bin"}
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    transformers.LlamaForCausalLM(cfg).save_pretrained(root / "llama")
    paths["llama"] = root / "llama"
    rcfg = transformers.ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8, 16], depths=[1, 1],
                                     layer_type="basic", num_labels=3, downsample_in_first_stage=False)
    transformers.ResNetForImageClassification(rcfg).save_pretrained(root / "hf-resnet")
    paths["hf-resnet"] = root / "hf-resnet"
    yield paths
    sys.path.remove(str(root / "src"))
    for m in [m for m in sys.modules if m == PKG or m.startswith(PKG + ".")]:
        del sys.modules[m]


def _summary(run: Path) -> dict:
    return json.loads((run / "summary.json").read_text())


def _row(summary: dict, name: str) -> dict:
    return next(r for r in summary["rows"] if r["name"] == name)


# ----------------------------------------------------------------------------------------- --model forms
def test_search_on_a_factory_model_and_an_image_folder(work, tmp_path: Path) -> None:
    """module:factory + --model-kwargs on an image folder; the supernet is the model widened x2 by upscale."""
    out = tmp_path / "run"
    assert main(["search", "--model", f"{PKG}.nets:build", "--model-kwargs", '{"width": 6}', "--data",
                 str(work["imgs"]), "--out", str(out), "--target", "0.6"]
                + sets("model.supernet_width_mult=2")) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.model.spec == f"{PKG}.nets:build" and cfg.model.kwargs == {"width": 6}
    assert cfg.data.name == str(work["imgs"])
    s = _summary(out)
    assert s["metric"]["key"] == "acc" and s["dataset"]["kind"] == "image" and s["dataset"]["classes"] == 3
    assert "widened x2 by dmscale.upscale" in s["search"]["enlargement"]
    base, sup, found = _row(s, "base (reference)"), _row(s, "supernet (full)"), _row(s, "found, retrained")
    assert sup["params"] > 3 * base["params"]  # conv widths 6 -> 12: ~4x the weights
    assert found["flops"] <= 0.6 * base["flops"] * 1.01 and found["acc"] is not None
    model = dmscale.load(out / "model", trust=[PKG])  # the user's class, exported smaller
    assert type(model).__name__ == "SmallCNN" and model.conv1.out_channels < 12
    x = torch.randn(2, 1, 8, 8)
    assert model.eval()(x).shape == (2, 3)
    assert "supernet: " in (out / "report.md").read_text()


def test_pretrain_then_prune_a_saved_model_on_npz_with_distillation(work, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """dmscale pretrain on a factory, then prune its dmscale.save directory (--trust) on .npz with --distill."""
    pre = tmp_path / "pre"
    assert main(["pretrain", "--model", f"{PKG}.nets:build", "--data", str(work["npz"]), "--out", str(pre)]
                + sets()) == 0
    saved = pre / "pretrained"
    assert (saved / "structure.json").is_file()
    # without --trust the user's class may not be loaded: exit 2 naming the flag, and no run directory is left
    bad = tmp_path / "bad"
    assert main(["prune", "--model", str(saved), "--data", str(work["npz"]), "--out", str(bad)] + sets()) == 2
    err = capsys.readouterr().err
    assert "--trust" in err and f"{PKG}.nets:SmallCNN" in err and not bad.exists()
    out = tmp_path / "p"
    assert main(["prune", "--model", str(saved), "--trust", PKG, "--data", str(work["npz"]), "--out", str(out),
                 "--distill", "0.5"] + sets()) == 0
    cfg = load_config(out / "config.yaml")
    assert cfg.model.trust == [PKG] and cfg.task.distill == 0.5 and cfg.model.spec == str(saved)
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    for phase in ("search", "retrain"):  # the KL to the unpruned model is in the loss of both phases
        steps = [r for r in recs if r["phase"] == phase and "kl" in r]
        assert len(steps) == (4 if phase == "search" else 3) and all(r["kl"] >= 0 for r in steps)
    s = _summary(out)
    pre_row, found = _row(s, "pretrained base"), _row(s, "found, retrained")
    assert found["flops"] <= 0.5 * pre_row["flops"] * 1.01
    # the baselines of a user model: uniform = one kept ratio through masks (re-initialised), l1 / taylor one-shot
    assert main(["baseline", "--out", str(out), "-q"]) == 0
    s = _summary(out)
    for m in ("uniform", "l1", "taylor"):
        row = _row(s, f"baseline: {m}")
        setting = json.loads((out / "baselines" / m / "setting.json").read_text())
        assert 0 < setting["ratio"] < 1 and row["flops"] <= 0.5 * pre_row["flops"] * 1.01, (m, row, setting)
        assert type(dmscale.load(out / "baselines" / m / "model", trust=[PKG])).__name__ == "SmallCNN"


def test_hf_causal_lm_on_a_text_file(work, tmp_path: Path) -> None:
    """hf: a tiny Llama saved with save_pretrained, on a plain text file (bytes: the checkpoint has no tokenizer);
    DMS_fast reports the held-out perplexity, and the export loads and runs."""
    out = tmp_path / "lm"
    assert main(["fast", "--model", f"hf:{work['llama']}", "--data", str(work["text"]), "--out", str(out),
                 "--target", "0.7"] + sets(*TEXT)) == 0
    s = _summary(out)
    assert s["metric"] == {"key": "ppl", "label": "test ppl", "higher_is_better": False}
    ds = s["dataset"]
    assert ds["kind"] == "text" and ds["seq_len"] == 32 and ds["tokenizer"] == "ByteTokenizer" and ds["test"] > 32
    pre, found = _row(s, "pretrained base"), _row(s, "exported")
    assert 1 < pre["ppl"] < 1e4 and 1 < found["ppl"] < 1e4
    assert found["flops"] <= 0.7 * pre["flops"] * 1.01
    assert {g["kind"] for g in s["groups"]} >= {"heads", "width"}
    model = dmscale.load(out / "model")
    ids = torch.randint(0, 256, (1, 16))
    assert model.eval()(ids).logits.shape == (1, 16, 256)
    assert "test ppl" in (out / "report.md").read_text()


def test_hf_image_classifier_on_an_image_folder(work, tmp_path: Path) -> None:
    """hf: an image classifier (AutoModelForImageClassification, outputs with .logits) pruned on an image folder."""
    out = tmp_path / "hf-img"
    assert main(["prune", "--model", f"hf:{work['hf-resnet']}", "--data", str(work["imgs"]), "--out", str(out)]
                + sets()) == 0
    s = _summary(out)
    pre, found = _row(s, "pretrained base"), _row(s, "found, retrained")
    assert s["metric"]["key"] == "acc" and found["flops"] <= 0.5 * pre["flops"] * 1.01
    model = dmscale.load(out / "model")
    assert type(model).__name__ == "ResNetForImageClassification"
    assert model.eval()(torch.randn(2, 1, 8, 8)).logits.shape == (2, 3)


def test_text_is_tokenized_with_the_checkpoints_tokenizer(work, tmp_path: Path) -> None:
    """A checkpoint with its own tokenizer: the run's text is encoded with it (bytes only when it has none)."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    d = tmp_path / "bpe-llama"
    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.train([str(work["text"])], trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    cfg = transformers.LlamaConfig(vocab_size=len(hf), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
    transformers.LlamaForCausalLM(cfg).save_pretrained(d)
    hf.save_pretrained(d)
    c = load_config(None, TEXT + [f"model.spec=hf:{d}", f"data.name={work['text']}", f"run.out={tmp_path / 'r'}",
                                  "run.threads=1"], pipeline="dms_fast")
    with pipelines.open_run(c) as run:
        assert run.state["dataset"]["tokenizer"] != "ByteTokenizer"  # the checkpoint's (a transformers class)
        ids = run.train_x
        assert ids.shape[1] == 32 and int(ids.max()) >= 256 and int(ids.max()) < len(hf)  # merged BPE tokens
        expect = torch.tensor(hf.encode(work["text"].read_text("utf-8")[:200], add_special_tokens=False))
        assert torch.equal(ids.reshape(-1)[:20], expect[:20])
        assert run.eval(run.base_model()) > 1


def test_hf_search_widens_the_checkpoint_as_its_supernet(work, tmp_path: Path) -> None:
    out = tmp_path / "lm-search"
    assert main(["search", "--model", f"hf:{work['llama']}", "--data", str(work["text"]), "--out", str(out),
                 "--target", "0.6"] + sets(*TEXT, "model.supernet_width_mult=2", "search.target_of=supernet")) == 0
    s = _summary(out)
    base, sup = _row(s, "base (reference)"), _row(s, "supernet (full)")
    assert sup["params"] > 2 * base["params"] and "widened x2" in s["search"]["enlargement"]
    assert _row(s, "found, retrained")["flops"] <= 0.6 * sup["flops"] * 1.01


# ----------------------------------------------------------------------------------------- --loss, built-in data
def test_user_loss_on_a_builtin_set(work, tmp_path: Path) -> None:
    """--loss module:function on digits (a built-in set) with a factory model: its loss trains, its metrics are
    logged, and the run reports the mean test loss."""
    out = tmp_path / "loss"
    assert main(["fast", "--model", f"{PKG}.nets:build", "--model-kwargs", '{"classes": 10}', "--data", "digits",
                 "--loss", f"{PKG}.nets:margin_loss", "--out", str(out)]
                + sets("data.limit_train=128", "data.limit_test=64")) == 0
    s = _summary(out)
    assert s["metric"]["key"] == "loss" and s["dataset"]["name"] == "digits"
    recs = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert any("margin_acc" in r for r in recs if r["phase"] == "search")
    assert _row(s, "exported")["loss"] >= 0


@pytest.mark.parametrize("fn, what", [("per_example_loss", "of shape (16,)"), ("not_a_tensor", "got float")])
def test_a_loss_that_is_not_a_scalar_tensor_is_named(work, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     fn: str, what: str) -> None:
    out = tmp_path / "r"
    assert main(["fast", "--model", f"{PKG}.nets:build", "--data", str(work["npz"]), "--loss", f"{PKG}.nets:{fn}",
                 "--out", str(out)] + sets()) == 2
    err = capsys.readouterr().err
    assert "--loss" in err and f"{PKG}.nets:{fn}" in err and "scalar tensor" in err and what in err
    assert not out.exists()  # checked before any phase: the same command runs again once fixed


# ----------------------------------------------------------------------------------------- resume
class _Crash(RuntimeError):
    pass


def test_resume_on_a_user_model_rebuilds_it_and_matches_an_unbroken_run(work, tmp_path: Path) -> None:
    extra = ["search.steps=5", "retrain.steps=4", "run.progress=false"]
    spec = [f"model.spec={PKG}.nets:build", 'model.kwargs={"width": 5}', f"data.name={work['imgs']}",
            "search.target=0.6"]
    ref = pipelines.run(load_config(None, TINY + extra + spec + [f"run.out={tmp_path / 'a'}"], pipeline="dms"))
    b = tmp_path / "b"

    def crash(phase: str, step: int) -> None:
        if phase == "search" and step == 3:
            raise _Crash("stop")

    with pytest.raises(_Crash):
        pipelines.run(load_config(None, TINY + extra + spec + [f"run.out={b}"], pipeline="dms"), callback=crash)
    assert (b / "checkpoints" / "search.pt").exists()
    sys.modules.pop(f"{PKG}.nets")  # a new process: the factory is imported again from the saved spec
    assert main(["search", "--resume", str(b), "-q"]) == 0
    got = _summary(b)
    assert got["groups"] == ref["groups"]
    assert [(r["name"], r["flops"], r["acc"]) for r in got["rows"]] == [(r["name"], r["flops"], r["acc"])
                                                                         for r in ref["rows"]]
    sa = dmscale.load(tmp_path / "a" / "model", trust=[PKG]).state_dict()
    sb = dmscale.load(b / "model", trust=[PKG]).state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert (tmp_path / "a" / "log.jsonl").read_text() == (b / "log.jsonl").read_text()


# ----------------------------------------------------------------------------------------- bad input
BAD = [
    (["search", "--model", "no_such_pkg_xyz.nets:build"], ["--model no_such_pkg_xyz.nets:build", "not importable"]),
    (["search", "--model", f"{PKG}.nets:biuld"], ["has no attribute 'biuld'", "did you mean build"]),
    (["search", "--model", f"{PKG}.nets:build", "--model-kwargs", "{width: 3}"], ["--model-kwargs", "not valid JSON"]),
    (["search", "--model", f"{PKG}.nets:build", "--model-kwargs", '{"depth": 3}'],
     ["--model-kwargs", '{"depth": 3}', "unexpected keyword"]),
    (["search", "--model", "hf:/no/such/checkpoint"], ["hf:/no/such/checkpoint"]),
    (["search", "--model", "not_a_spec"], ["model.spec", "not_a_spec", "module:factory"]),
    (["search", "--data", "/no/such/data/dir"], ["data.name='/no/such/data/dir' (--data)", "no such file"]),
    (["search", "--data", "{bin}"], ["(--data)", "cannot tell what kind"]),
    (["search", "--data", "{text}"], ["data.name", "text needs a language model", "--model"]),
    (["fast", "--model", f"{PKG}.nets:build", "--data", "{text}"], ["--model", "cannot train on --data", "{text}"]),
    (["fast", "--model", f"{PKG}.nets:build", "--data", "digits"], ["cannot train on --data digits",
                                                                     "out of bounds"]),
    (["fast", "--model", f"{PKG}.nets:build", "--loss", f"{PKG}.nets:nope"], ["--loss", "has no attribute 'nope'"]),
    (["fast", "--model", f"{PKG}.nets:build", "--loss", "justaname"], ["task.loss='justaname'", "module:function"]),
    (["search", "--model", f"{PKG}.nets:build", "--distill", "1"], ["task.distill", "prune, fast or baseline"]),
    (["fast", "--model", f"{PKG}.nets:build", "--distill", "1", "--loss", f"{PKG}.nets:margin_loss"],
     ["task.distill", "--loss"]),
    (["search", "--model", f"{PKG}.nets:build", "--set", "model.supernet_width_mult=1.5"],
     ["model.supernet_width_mult=1.5", "integer factor"]),
    (["search", "--model", f"{PKG}.nets:build", "--set", "model.supernet_depth_mult=2"],
     ["model.supernet_depth_mult=2.0", "supernet_kwargs"]),
    (["search", "--model", f"{PKG}.nets:build", "--trust", "os"], ["--trust", "'os'"]),
    (["search", "--model-kwargs", '{"width": 3}'], ["model.kwargs", "built-in family"]),
    (["prune", "--model", "{llama}", "--data", "{text}"], ["hf:{llama}"]),
]


@pytest.mark.parametrize("args, words", BAD, ids=[" ".join(a[1:3]) for a, _ in BAD])
def test_bad_input_exits_2_naming_the_flag_and_value(work, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                     args: list[str], words: list[str]) -> None:
    def fill(text: str) -> str:
        for k in ("npz", "text", "llama", "bin"):
            text = text.replace("{" + k + "}", str(work[k]))
        return text

    args = [fill(a) for a in args]
    if "--data" not in args:
        args += ["--data", str(work["npz"])]
    out = tmp_path / "run"
    assert main(args + ["--out", str(out)] + sets()) == 2
    err = capsys.readouterr().err
    assert err.startswith("dmscale: error: ") and "Traceback" not in err
    for w in words:
        assert fill(w) in err, (w, err)
    assert not out.exists()
