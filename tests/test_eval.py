"""Evaluation: sliding-window perplexity on known cases, multiple-choice scoring, JSONL items, CLI entry points."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn as nn

import dmscale
from dmscale.eval import eval_ppl_main, load_items, multiple_choice, perplexity, sliding_window_nll
from dmscale.eval.multiple_choice import eval_mc_main, normalize_item


class Uniform(nn.Module):
    """Logits all equal: every next token has probability 1/vocab."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab
        self.bias = nn.Parameter(torch.zeros(vocab))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(*ids.shape, self.vocab)


class Bigram(nn.Module):
    """Next-token log-probs depend only on the current token: a table, so any window gives the same scores."""

    def __init__(self, table: torch.Tensor) -> None:
        super().__init__()
        self.table = nn.Parameter(table.log_softmax(-1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[ids]


class Tok:
    """Word-level tokenizer over a fixed vocabulary (token i = word i)."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        self.bos_token_id = None

    def encode(self, text: str) -> list[int]:
        return [self.words.index(w) for w in text.split()]


def test_uniform_logits_perplexity_is_vocab_size() -> None:
    ids = torch.randint(0, 37, (300,))
    for max_length, stride in ((64, 32), (64, 64), (300, 300), (16, 1)):
        assert perplexity(Uniform(37), ids, max_length, stride) == pytest.approx(37.0, rel=1e-5)


def test_sliding_window_scores_each_token_once() -> None:
    ids = torch.randint(0, 11, (101,))
    _, count = sliding_window_nll(Uniform(11), ids, max_length=20, stride=7)
    assert count == 100  # every token but the first
    _, count = sliding_window_nll(Uniform(11), ids, max_length=20, stride=20)
    assert count == 100 - 5  # no overlap: each window's first token has no context (HF recipe)


def test_bigram_perplexity_exact() -> None:
    torch.manual_seed(0)
    table = torch.randn(9, 9)
    ids = torch.randint(0, 9, (200,))
    logp = table.log_softmax(-1)
    expected = math.exp(-float(logp[ids[:-1], ids[1:]].mean()))
    assert perplexity(Bigram(table), ids, 32, 16) == pytest.approx(expected, rel=1e-5)
    assert perplexity(Bigram(table), ids.tolist(), 200) == pytest.approx(expected, rel=1e-5)


def test_context_matters_with_overlap() -> None:
    """A model that copies the token 2 back: overlap gives it the context it needs, so ppl is lower."""

    class Copy2(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], 1)  # predicts ids[t+1] = ids[t-1]
            return nn.functional.one_hot(prev, 5).float() * 5.0 + self.w

    ids = torch.tensor([1, 2] * 50)
    assert perplexity(Copy2(), ids, 10, 5) < perplexity(Copy2(), ids, 10, 10)


def test_perplexity_errors() -> None:
    with pytest.raises(ValueError, match="stride"):
        perplexity(Uniform(5), torch.arange(5), 4, 8)
    with pytest.raises(ValueError, match="at least 2"):
        perplexity(Uniform(5), torch.tensor([1]), 4)


def test_multiple_choice_hand_built() -> None:
    words = ["the", "cat", "sat", "on", "mat", "dog", "ran", "away", "far"]
    tok = Tok(words)
    table = torch.full((9, 9), -5.0)
    table[0, 1] = 5.0  # the -> cat
    table[1, 2] = 5.0  # cat -> sat
    table[2, 3] = 5.0  # sat -> on
    table[0, 5] = 4.0  # the -> dog (second best)
    table[5, 6] = 0.0
    table[6, 7] = 5.0  # ran -> away
    table[7, 8] = 5.0  # away -> far
    model = Bigram(table)
    items = [
        {"context": "the", "choices": ["cat sat", "dog ran"], "label": 0},
        {"query": "the", "endings": ["mat", "cat"], "gold": 1},
        # long choice: lower total log-likelihood than "cat", but higher per character
        {"context": "the", "choices": ["cat", "dog ran away far"], "label": "B"},
    ]
    res = multiple_choice(model, tok, items)
    assert res["n"] == 3
    assert res["predictions"] == [0, 1, 0]
    assert res["predictions_norm"] == [0, 1, 1]
    assert res["acc"] == pytest.approx(2 / 3) and res["acc_norm"] == 1.0
    ll = res["loglikelihoods"][0]
    logp = table.log_softmax(-1)
    assert ll[0] == pytest.approx(float(logp[0, 1] + logp[1, 2]), rel=1e-5)
    assert ll[1] == pytest.approx(float(logp[0, 5] + logp[5, 6]), rel=1e-5)


def test_normalize_item_and_jsonl(tmp_path) -> None:
    assert normalize_item({"question": "q", "options": ["a", "b"], "answer": "b"})["label"] == 1
    assert normalize_item({"context": "q", "choices": ["a", "b"], "label": "1"})["label"] == 1
    with pytest.raises(ValueError, match="label"):
        normalize_item({"context": "q", "choices": ["a", "b"], "label": 5})
    with pytest.raises(ValueError, match="choices"):
        normalize_item({"context": "q", "choices": ["a"], "label": 0})
    p = tmp_path / "items.jsonl"
    p.write_text(json.dumps({"context": "x", "choices": ["a", "b"], "label": 0}) + "\n\n" +
                 json.dumps({"ctx": "y", "endings": ["c", "d"], "label": 1}) + "\n")
    assert [it["label"] for it in load_items(p)] == [0, 1]
    p.write_text("{not json}\n")
    with pytest.raises(ValueError, match=":1"):
        load_items(p)


def _tiny_lm(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    m = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, num_key_value_heads=1)).eval()
    dmscale.save(m, tmp_path / "model")
    return m


def test_eval_ppl_main_on_dmscale_dir(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    m = _tiny_lm(tmp_path)
    text = "To be, or not to be, that is the question. " * 6
    (tmp_path / "t.txt").write_text(text)
    rc = eval_ppl_main([str(tmp_path / "model"), "--text", str(tmp_path / "t.txt"), "--tokenizer", "bytes",
                        "--max-length", "64", "--stride", "32", "--json"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ids = torch.tensor(list(text.encode()))
    assert out["ppl"] == pytest.approx(perplexity(m, ids, 64, 32), rel=1e-5)
    assert out["scored"] == len(ids) - 1
    assert eval_ppl_main([str(tmp_path / "model"), "--text", str(tmp_path / "missing.txt")]) == 2


def test_eval_mc_main(tmp_path, capsys) -> None:
    pytest.importorskip("transformers")
    _tiny_lm(tmp_path)
    p = tmp_path / "items.jsonl"
    p.write_text("\n".join(json.dumps({"context": "Q: 1+1=", "choices": [" 2", " 3"], "label": 0})
                           for _ in range(2)))
    assert eval_mc_main([str(tmp_path / "model"), "--items", str(p), "--tokenizer", "bytes", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 2 and out["acc"] in (0.0, 1.0)


def test_dmscale_cli_eval_ppl_passthrough(tmp_path, capsys) -> None:
    """`dmscale eval-ppl ...` reaches eval_ppl_main with its own arguments."""
    pytest.importorskip("transformers")
    from dmscale.app.cli import main

    m = _tiny_lm(tmp_path)
    text = "Now is the winter of our discontent. " * 5
    (tmp_path / "t.txt").write_text(text)
    assert main(["eval-ppl", str(tmp_path / "model"), "--text", str(tmp_path / "t.txt"), "--tokenizer", "bytes",
                 "--max-length", "64", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["ppl"] == pytest.approx(perplexity(m, torch.tensor(list(text.encode())), 64, 32), rel=1e-5)
    assert main(["eval-ppl", str(tmp_path / "model"), "--text", str(tmp_path / "nope.txt")]) == 2
