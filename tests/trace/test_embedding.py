"""``embedding_bag`` fixes the vocabulary (weight[0]); its output is (bags, weight[1]); with ``max_norm`` the
columns are fixed too (rows are renormalised over them). ``embedding`` is in test_linear.py."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import dmscale
from ruletools import fixed, free, run_op, same


def test_embedding_bag_output_columns_are_the_weight_columns():
    ids = torch.randint(0, 10, (3, 4))
    tr, (i, w), out = run_op(lambda i, w: F.embedding_bag(i, w, mode="mean"), ids, torch.randn(10, 6))
    wd, od = tr.get(w), tr.get(out)
    assert fixed(wd[0]) and same(od[-1], wd[1]) and free(wd[1]) and not tr.unsupported
    assert od[0].size == 3 and not same(od[0], tr.get(i)[0])


def test_embedding_bag_with_max_norm_fixes_the_columns():
    ids = torch.randint(0, 10, (3, 4))
    tr, (i, w), out = run_op(lambda i, w: F.embedding_bag(i, w, max_norm=1.0), ids, torch.randn(10, 6))
    assert fixed(tr.get(w)[1]) and "max_norm" in tr.get(w)[1].find().fix_reasons[-1]


class Bag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(40, 24, mode="sum")
        self.fc = nn.Linear(24, 16)
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(F.relu(self.fc(self.bag(x))))


def test_embedding_bag_width_is_searched_and_exported():
    torch.manual_seed(0)
    x = torch.randint(0, 40, (3, 5))
    dms = dmscale.DMS(Bag(), (x,), dmscale.Target(flops=0.5), total_steps=5, warn=False)
    assert sorted(g.name for g in dms.groups) == ["bag", "fc"]
    with torch.no_grad():
        for g in dms.groups:
            dms.space.ratio(g).fill_(0.5)
    ex = dms.export(project=False)
    assert ex.bag.embedding_dim == 12 and ex.bag.weight.shape == (40, 12) and ex.fc.in_features == 12
    with torch.no_grad(), dms.hard():
        ref = dms.model(x)
    torch.testing.assert_close(ex(x), ref, atol=1e-5, rtol=1e-5)
