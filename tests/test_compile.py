"""torch.compile: exported models compile (inductor, CPU) and compute the same outputs.

The masked supernet also compiles, with graph breaks: every forward recomputes the masks, and
the hard kept count is a Python int (``.item()``), so dynamo splits the graph there and runs the
mask bookkeeping eagerly. Outputs, ratio gradients and importance updates match eager mode.
"""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import dmscale
from zoo import MLP, ResNetCNN

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None and shutil.which("cc") is None,
                                reason="inductor on CPU needs a C compiler")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _searched(build, x):
    torch.manual_seed(0)
    model = build()
    dms = dmscale.DMS(model, (x,), dmscale.Target(flops=0.5), total_steps=5)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for grp in dms.groups:
            dms.space.ratio(grp).fill_(0.5)
            dms.space.importance(grp).copy_(torch.rand(grp.size, generator=g))
    return model, dms


def _check_export_compiles(build, x):
    model, dms = _searched(build, x)
    small = dms.export().eval()
    assert any(k < f for f, k in dms.kept().values())
    compiled = torch.compile(small)
    with torch.no_grad():
        ref = small(x)
        got = compiled(x)
        got2 = compiled(x * 2)  # second call: cached graph, no recompilation needed for same shapes
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got2, small(x * 2), atol=1e-5, rtol=1e-5)


def test_compile_exported_mlp():
    _check_export_compiles(MLP, torch.randn(4, 16))


@pytest.mark.slow
def test_compile_exported_cnn():
    _check_export_compiles(ResNetCNN, torch.randn(2, 3, 8, 8))


def _check_supernet_compiles(build, x, y):
    model, dms = _searched(build, x)
    model.eval()
    compiled = torch.compile(model)
    with torch.no_grad():
        with dms.hard():
            ref = model(x)
            got = compiled(x)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # a soft training step through the compiled supernet: same ratio gradients and importance as eager
    results = []
    for use_compiled in (False, True):
        m2, d2 = _searched(build, x)
        m2.train()
        net = torch.compile(m2) if use_compiled else m2
        before = {g.name: d2.space.importance(g).clone() for g in d2.groups}
        d2.loss(F.cross_entropy(net(x), y)).backward()
        assert d2.importance.updates > 0
        results.append(({g.name: d2.space.importance(g).clone() for g in d2.groups},
                        [p.grad.clone() for p in d2.structure_parameters()]))
        assert any(not torch.equal(before[k], v) for k, v in results[-1][0].items())
    (imp_e, grad_e), (imp_c, grad_c) = results
    for k in imp_e:
        torch.testing.assert_close(imp_c[k], imp_e[k], atol=1e-6, rtol=1e-4)
    for a, b in zip(grad_c, grad_e):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_compile_masked_supernet_mlp():
    _check_supernet_compiles(MLP, torch.randn(4, 16), torch.randint(0, 5, (4,)))


@pytest.mark.slow
def test_compile_masked_supernet_cnn():
    _check_supernet_compiles(ResNetCNN, torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,)))
