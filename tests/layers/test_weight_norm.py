"""Weight-normalised layers (``torch.nn.utils.parametrizations.weight_norm`` and the legacy hook form
``torch.nn.utils.weight_norm``) are searched like the layers without weight norm: ``_weight_norm`` labels W with
v's dims and ties g to v's normalised dim. The masked supernet uses W as it is; export slices g and v and rescales
g so that the smaller, still weight-normalised layer computes the kept part of W (``dmscale.layers.weightnorm``).
"""

import warnings

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm
from torch.nn.utils import weight_norm as legacy_weight_norm

import dmscale
from dmscale.layers.weightnorm import weight_norm_of
from dmscale.trace.tracer import trace
from prunetools import load_trusting, prune_and_export, search_to_budget


def legacy(mod, dim=0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # deprecated in favour of the parametrization
        return legacy_weight_norm(mod, dim=dim)


FORMS = {"parametrized": weight_norm, "legacy": legacy}


class NormedMLP(nn.Module):
    def __init__(self, wn, dim=0):
        super().__init__()
        self.a = wn(nn.Linear(8, 32), dim=dim)
        self.b = wn(nn.Linear(32, 24), dim=dim)
        self.c = nn.Linear(24, 4)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


class ConvNet(nn.Module):
    def __init__(self, wn, dim=0):
        super().__init__()
        self.a = wn(nn.Conv2d(3, 16, 3, padding=1), dim=dim)
        self.b = wn(nn.Conv1d(16, 12, 3), dim=dim)
        self.c = wn(nn.Linear(12, 4), dim=dim)

    def forward(self, x):
        h = torch.relu(self.a(x)).flatten(2)
        return self.c(torch.relu(self.b(h)).mean(-1))


MODELS = {"mlp": (NormedMLP, (5, 8)), "conv": (ConvNet, (2, 3, 6, 6))}


@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(MODELS))
def test_weight_normed_widths_are_groups(name, form):
    cls, shape = MODELS[name]
    model = cls(FORMS[form])
    tr = trace(model, (torch.randn(*shape),))
    assert tr.unsupported == {} and tr.lost == []
    assert {"a", "b"} <= set(tr.layers)
    for lname in ("a", "b"):
        g, v = (tr.params[n] for n in weight_norm_of(getattr(model, lname), "weight").qualified(lname))
        assert not g.raw and not v.raw  # accounted for by the layer: never masked as raw parameters
        assert g.dims[0].find() is v.dims[0].find() is tr.layers[lname].out_dims[-1 if name == "mlp" else
                                                                                  {"a": -3, "b": -2}[lname]].find()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "could be searched but are fixed" warning
        dms = dmscale.DMS(model, (torch.randn(*shape),), dmscale.Target(flops=0.5), total_steps=10)
    assert sorted(g.size for g in dms.groups if g.kind == "width") == sorted([32, 24] if name == "mlp" else [16, 12])


@pytest.mark.parametrize("dim", [0, None, 1])
@pytest.mark.parametrize("form", list(FORMS))
@pytest.mark.parametrize("name", list(MODELS))
def test_export_equals_hard_masked_supernet(name, form, dim):
    cls, shape = MODELS[name]
    torch.manual_seed(0)
    model = cls(FORMS[form], dim)
    x = torch.randn(*shape)
    dms, small = prune_and_export(model, x, ratio=0.55)  # assert_close against the hard-masked supernet inside
    for lname in ("a", "b"):
        layer, full = getattr(small, lname), getattr(model, lname)
        wn = weight_norm_of(layer, "weight")
        assert wn is not None and wn.legacy == (form == "legacy")  # still weight-normalised
        g, v = wn.tensors(layer)
        assert v.shape[0] < wn.tensors(full)[1].shape[0]
        torch.testing.assert_close(layer.weight, torch._weight_norm(v, g, wn.dim))
    # a forward after export (the legacy hook recomputes W from g, v) still matches
    small.eval()
    with torch.no_grad(), dms.hard():
        ref = model.eval()(x)
    torch.testing.assert_close(small(x), ref, atol=1e-5, rtol=1e-5)


def test_output_mask_values_fold_into_g():
    """The surviving soft mask values of a weight-normalised Linear end up in g (v keeps its direction and norm)."""
    torch.manual_seed(1)
    model = NormedMLP(weight_norm)
    x = torch.randn(5, 8)
    dms, small = prune_and_export(model, x, ratio=0.5)
    keep = dms.masker.keep_for(dms.trace.layers["a"].out_dims[-1])
    v_full = model.a.parametrizations.weight.original1.detach()
    v_small = small.a.parametrizations.weight.original1.detach()
    # input of 'a' is the model input (not pruned): v's kept rows are the supernet's, unscaled
    torch.testing.assert_close(v_small, v_full[keep])


@pytest.mark.parametrize("form", list(FORMS))
def test_search_and_export_land_on_flops_budget(form):
    torch.manual_seed(2)
    model = ConvNet(FORMS[form])
    x = torch.randn(4, 3, 6, 6)
    search_to_budget(model, x, lambda y: y.pow(2).mean(), steps=8)


class NormedKernel(nn.Module):
    """A weight-normalised parameter used by a bare matmul (no layer dmscale knows)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Module()
        self.proj.kernel = nn.Parameter(torch.randn(16, 8))
        weight_norm(self.proj, name="kernel")
        self.out = nn.Linear(16, 2)

    def forward(self, x):
        return self.out(torch.relu(x @ self.proj.kernel.T))


def test_weight_norm_outside_a_known_layer_stays_fixed_and_named():
    model = NormedKernel()
    tr = trace(model, (torch.randn(3, 8),))
    lost = [d for d in tr.lost if "weight_norm of 'kernel'" in " ".join(d.reasons)]
    assert lost and lost[0].size == 16
    assert not any(r.raw and any(not s.find().fixed for s in r.dims) for n, r in tr.params.items() if "kernel" in n
                   or "original" in n)


def test_save_refuses_a_weight_normed_export_and_says_how_to_bake_it_in(tmp_path):
    """``dmscale.save`` cannot store a parametrized class or a forward pre-hook (loading never runs code): the error
    names the module and the fix; after ``remove_parametrizations`` the export saves and loads bit-identically."""
    from torch.nn.utils import parametrize

    torch.manual_seed(0)
    model = NormedMLP(weight_norm)
    x = torch.randn(4, 8)
    _, small = prune_and_export(model, x)
    with pytest.raises(TypeError, match=r"module 'a'.*remove_parametrizations"):
        dmscale.save(small, tmp_path / "wn")
    assert not (tmp_path / "wn").exists()
    want = small(x)
    for name in ("a", "b"):
        parametrize.remove_parametrizations(getattr(small, name), "weight")
    dmscale.save(small, tmp_path / "plain")
    torch.testing.assert_close(load_trusting(tmp_path / "plain", __name__)(x), want, rtol=0, atol=0)
