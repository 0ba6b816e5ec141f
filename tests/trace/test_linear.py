"""``linear`` couples x[-1] with weight[1] and bias[0] with weight[0]; out[-1] is weight[0]; fixes nothing.
``embedding`` fixes the vocabulary (weight[0]); out[-1] is weight[1]."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from dmscale.trace.tracer import trace
from ruletools import free, run_op, same


def test_linear_couples_input_with_weight_and_gives_output_the_weight_rows():
    tr, (x, w, b), out = run_op(F.linear, torch.randn(2, 5, 8), torch.randn(6, 8), torch.randn(6))
    xd, wd, bd, od = tr.get(x), tr.get(w), tr.get(b), tr.get(out)
    assert same(xd[-1], wd[1]) and same(bd[0], wd[0]) and same(od[-1], wd[0])
    assert same(od[0], xd[0]) and same(od[1], xd[1])
    assert not same(wd[0], wd[1])
    assert all(free(s) for s in xd + wd + od)
    (op,) = tr.ops
    assert op.name == "linear" and op.flops == 2 * 2 * 5 * 8 * 6
    assert [s.find().size for s in op.dims] == [2, 5, 6, 8]


def test_linear_without_bias_and_with_keyword_arguments():
    tr, (x, w), out = run_op(lambda x, w: F.linear(input=x, weight=w), torch.randn(3, 4), torch.randn(5, 4))
    assert same(tr.get(x)[-1], tr.get(w)[1]) and same(tr.get(out)[-1], tr.get(w)[0])


def test_two_linears_in_a_row_couple_the_hidden_dim():
    tr, (x, w1, w2), out = run_op(lambda x, a, b: F.linear(F.linear(x, a), b), torch.randn(2, 4), torch.randn(7, 4),
                                  torch.randn(3, 7))
    assert same(tr.get(w1)[0], tr.get(w2)[1])
    assert not same(tr.get(w1)[0], tr.get(x)[-1])


def test_embedding_fixes_vocabulary_and_passes_index_dims():
    ids = torch.randint(0, 10, (2, 3))
    tr, (i, w), out = run_op(F.embedding, ids, torch.randn(10, 4))
    wd, od = tr.get(w), tr.get(out)
    assert wd[0].find().fixed and "vocabulary" in wd[0].find().fix_reasons[0]
    assert same(od[-1], wd[1]) and free(wd[1])
    assert same(od[0], tr.get(i)[0]) and same(od[1], tr.get(i)[1])


def test_linear_layer_record_in_a_traced_model():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    res = trace(model, (torch.randn(3, 4),))
    assert res.layers["0"].kind == "linear" and list(res.layers["0"].out_dims) == [-1]
    assert same(res.params["0.weight"].dims[0], res.params["2.weight"].dims[1])
    assert not res.params["0.weight"].dims[0].find().fixed
    assert res.params["2.weight"].dims[0].find().fixed  # the model output
    assert res.params["0.weight"].dims[1].find().fixed  # the model input
