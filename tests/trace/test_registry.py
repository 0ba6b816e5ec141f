"""The op-rule table: registration, overriding, user rules, and what happens to ops without a rule."""

import pytest
import torch
import torch.nn as nn

from dmscale.trace import op_rule, registered_ops, rule_for, unregister_op_rule
from dmscale.trace.tracer import trace
from dmscale.trace.spaces import fix


class FlipMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        _ = torch.arange(5).flip(0)  # an unsupported op on data no parameter lives in
        return self.b(h.flip(0))  # flips the batch dim only


def _hidden_fixed(res):
    return res.params["a.weight"].dims[0].find().fixed


def test_every_builtin_family_is_registered():
    table = registered_ops()
    for name, module in [("linear", "linear"), ("conv2d", "conv"), ("layer_norm", "norm"), ("bmm", "matmul"),
                         ("scaled_dot_product_attention", "attention"), ("add", "elementwise"), ("view", "shape"),
                         ("mean", "reduce"), ("avg_pool2d", "pool"), ("arange", "creation"), ("size", "metadata"),
                         ("embedding", "embedding"), ("get:T", "shape")]:
        assert table[name].__module__ == f"dmscale.trace.rules.{module}", name
    assert "__matmul_placeholder__" not in table
    assert rule_for("no_such_op") is None


def test_unknown_op_fixes_what_it_touches_and_is_reported():
    res = trace(FlipMLP(), (torch.randn(2, 4),))
    assert _hidden_fixed(res)
    assert list(res.unsupported) == ["flip"]  # the flip of arange touched no parameter dim: not reported
    reasons = res.params["a.weight"].dims[0].find().fix_reasons
    assert any("unsupported op 'flip'" in r for r in reasons)


def test_user_rule_makes_the_op_searchable():
    @op_rule("flip")
    def flip(tr, c):
        """Flipped dims are fixed; every other dim passes through."""
        x = c.args[0]
        dims = c.arg(1, "dims")
        dims = (dims,) if isinstance(dims, int) else dims
        xd = list(tr.get(x))
        for d in dims:
            fix(xd[d], f"flip in {tr.current_module()}")
        tr.set(c.out, xd)

    try:
        res = trace(FlipMLP(), (torch.randn(2, 4),))
        assert not _hidden_fixed(res) and not res.unsupported
        assert res.params["a.weight"].dims[0].find() is res.params["b.weight"].dims[1].find()
    finally:
        unregister_op_rule("flip")
    assert rule_for("flip") is None


def test_duplicate_registration_needs_replace():
    original = rule_for("relu")
    with pytest.raises(ValueError, match="'relu' already has a rule"):
        op_rule("relu")(lambda tr, c: None)
    calls = []

    def counting(tr, c):
        calls.append(c.name)
        original(tr, c)

    try:
        op_rule("relu", replace=True)(counting)
        trace(FlipMLP(), (torch.randn(2, 4),))
        assert calls == ["relu"]
    finally:
        op_rule("relu", replace=True)(original)
    assert rule_for("relu") is original


def test_bad_registrations():
    with pytest.raises(ValueError, match="non-empty op names"):
        op_rule()
    with pytest.raises(ValueError, match="non-empty op names"):
        op_rule("")
    with pytest.raises(TypeError, match="decorates a function"):
        op_rule("my_op")(3)
    with pytest.raises(KeyError, match="no_such_op"):
        unregister_op_rule("no_such_op")


def test_a_failing_rule_costs_freedom_not_correctness():
    @op_rule("flip")
    def broken(tr, c):
        raise IndexError("boom")

    try:
        res = trace(FlipMLP(), (torch.randn(2, 4),))
        assert _hidden_fixed(res)
        assert any("rule error: boom" in r for r in res.params["a.weight"].dims[0].find().fix_reasons)
    finally:
        unregister_op_rule("flip")
