"""CUDA: search + export, AMP (bf16 autocast, fp16 + GradScaler) and FSDP2 on NCCL. Skipped without a GPU.

Run them with ``python -m pytest -m cuda tests/test_cuda.py`` (``scripts/gpu_check.py`` does, and
records the result). TF32 is switched off so that CUDA and CPU runs compare at float32 precision.

``DMSCALE_CUDA_TESTS_ON_CPU=1`` runs the same code on the CPU (gloo instead of NCCL): a dry run
of these tests for machines without a GPU; it proves nothing about CUDA.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import _fsdp_scenarios as S
import dmscale
from zoo import MLP, ResNetCNN, TinyViT

DRY_RUN = os.environ.get("DMSCALE_CUDA_TESTS_ON_CPU") == "1"
HAVE_CUDA = torch.cuda.is_available()
DEVICE = "cuda" if HAVE_CUDA and not DRY_RUN else "cpu"
N_GPU = torch.cuda.device_count() if DEVICE == "cuda" else 0

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAVE_CUDA and not DRY_RUN, reason="no CUDA device (torch.cuda.is_available())")]


@pytest.fixture(autouse=True)
def _no_tf32():
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


MODELS = {"mlp": (MLP, (8, 16), 5), "resnet": (ResNetCNN, (8, 3, 8, 8), 10), "vit": (TinyViT, (8, 3, 16, 16), 10)}


def _search(name: str, device: str, steps: int = 8, amp: torch.dtype | None = None, scaler: bool = False) -> dict:
    build, shape, n_cls = MODELS[name]
    torch.manual_seed(0)
    model = build().to(device)
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(*shape, generator=g).to(device) for _ in range(steps)]
    ys = [torch.randint(0, n_cls, (shape[0],), generator=g).to(device) for _ in range(steps)]
    dms = dmscale.DMS(model, (xs[0][:2],), dmscale.Target(flops=0.4), total_steps=steps)
    opt = torch.optim.SGD([{"params": dms.weight_parameters(), "lr": 0.05},
                           {"params": dms.structure_parameters(), "lr": 0.2, "weight_decay": 0.0}])
    gs = None
    if scaler:
        gs = torch.amp.GradScaler(device.split(":")[0], init_scale=2.0 ** 10)
        dms.attach_grad_scaler(gs)
    dtypes = set()
    for x, y in zip(xs, ys):
        with torch.autocast(device.split(":")[0], dtype=amp, enabled=amp is not None):
            out = model(x)
            dtypes.add(out.dtype)
            loss = dms.loss(F.cross_entropy(out.float(), y))
        opt.zero_grad()
        if gs is not None:
            gs.scale(loss).backward()
            gs.step(opt)
            gs.update()
        else:
            loss.backward()
            opt.step()
        dms.step()
    small = dms.export()
    small.eval()
    with torch.no_grad():
        probe = small(xs[0])
    return {"ratios": {k: v.detach().cpu() for k, v in dms.space.ratios.items()},
            "importance": {gr.name: dms.space.importance(gr).cpu() for gr in dms.groups},
            "importance_device": {str(dms.space.importance(gr).device) for gr in dms.groups},
            "importance_dtype": {dms.space.importance(gr).dtype for gr in dms.groups},
            "kept": dms.kept(), "export_devices": {str(p.device) for p in small.parameters()},
            "probe_device": str(probe.device), "out_dtypes": dtypes, "nonfinite": dms.nonfinite_steps,
            "skipped": dms.importance.skipped, "type_ok": type(small) is dms.model_class}


@pytest.mark.parametrize("name", list(MODELS))
def test_search_and_export_on_cuda(name):
    got = _search(name, DEVICE)
    assert got["importance_device"] == {str(torch.device(DEVICE, 0) if DEVICE == "cuda" else "cpu")}
    assert got["export_devices"] == got["importance_device"] and got["probe_device"] in got["importance_device"]
    assert got["type_ok"] and got["nonfinite"] == 0
    ref = _search(name, "cpu")  # the same search on the CPU: the same structure, close state
    assert any(k < f for f, k in ref["kept"].values()), "the search pruned nothing: test is vacuous"
    assert got["kept"] == ref["kept"]
    for k in ref["ratios"]:
        torch.testing.assert_close(got["ratios"][k], ref["ratios"][k], atol=1e-4, rtol=1e-3)
    for k in ref["importance"]:
        scale = float(ref["importance"][k].abs().max())
        torch.testing.assert_close(got["importance"][k], ref["importance"][k], atol=1e-3 * scale, rtol=1e-2)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_amp_bf16_search_on_cuda(name):
    got = _search(name, DEVICE, amp=torch.bfloat16)
    assert got["out_dtypes"] == {torch.bfloat16}  # autocast really ran the layers in bf16
    assert got["importance_dtype"] == {torch.float32}
    assert all(bool(torch.isfinite(v).all()) for v in got["importance"].values())
    assert any(float(v.sum()) > 0 for v in got["importance"].values())
    assert got["nonfinite"] == 0 and got["skipped"] == 0 and got["type_ok"]
    assert any(k < f for f, k in got["kept"].values())


def test_amp_fp16_grad_scaler_on_cuda():
    if DEVICE == "cpu" and not hasattr(torch.amp, "GradScaler"):
        pytest.skip("no torch.amp.GradScaler")
    got = _search("resnet", DEVICE, amp=torch.float16 if DEVICE == "cuda" else torch.bfloat16, scaler=True)
    assert got["importance_dtype"] == {torch.float32}
    assert all(bool(torch.isfinite(v).all()) for v in got["importance"].values())
    assert got["type_ok"] and any(k < f for f, k in got["kept"].values())
    # the importance is computed from unscaled gradients: one step with the scaler equals one without
    imps = []
    for scaled in (False, True):
        torch.manual_seed(0)
        model = MLP().to(DEVICE)
        x = torch.randn(8, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE)
        y = torch.randint(0, 5, (8,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
        dms = dmscale.DMS(model, (x[:2],), dmscale.Target(flops=0.4), total_steps=4)
        loss = F.cross_entropy(model(x), y)
        if scaled:
            gs = torch.amp.GradScaler(DEVICE, init_scale=2.0 ** 12)
            dms.attach_grad_scaler(gs)
            loss = gs.scale(loss)
        loss.backward()
        imps.append({gr.name: dms.space.importance(gr).cpu() for gr in dms.groups})
    for k in imps[0]:
        torch.testing.assert_close(imps[1][k], imps[0][k], rtol=1e-4, atol=1e-12)


def test_llm_search_export_generate_on_cuda():
    pytest.importorskip("transformers")
    from transformers import LlamaConfig, LlamaForCausalLM

    from dmscale.recipes.llm import build_llm_dms, lm_loss

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).to(DEVICE)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    dms = build_llm_dms(model, ids[:1, :16], dmscale.Target(params=0.6), 6, prune_depth=True)
    opt = torch.optim.Adam([{"params": dms.structure_parameters(), "lr": 0.1}])
    for p in dms.weight_parameters():
        p.requires_grad_(False)
    model.train()
    for _ in range(6):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            loss = dms.loss(lm_loss(model(ids).logits, ids))
        opt.zero_grad()
        loss.backward()
        opt.step()
        dms.step()
    assert any(k < f for f, k in dms.kept().values())
    small = dms.export().eval()
    assert {str(p.device) for p in small.parameters()} == {str(ids.device)}
    out = small.generate(ids[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12) and out.device == ids.device


# ---------------------------------------------------------------------------------------------- FSDP2
def _spawn(spawn_ranks, tmp_path, world: int, backend: str, names=("vit",), extras: bool = True) -> list[dict]:
    return spawn_ranks(S.worker, tmp_path, world, world, backend, DEVICE, names, extras)


def _check_fsdp(ranks: list[dict], names) -> None:
    for name in names:
        for r in ranks:
            assert r[name]["sharded"] and r[name]["dtensor_params"] > 0
            if DEVICE == "cuda":
                assert r[name]["export_device"].startswith("cuda")
        if len(ranks) > 1:
            S.assert_ranks_agree(ranks[0][name], ranks[1][name])
        if name == "vit" and "rank0_probe" in ranks[0][name]:  # gathered to host memory on rank 0
            assert ranks[0][name]["rank0_export_device"] == "cpu"
            torch.testing.assert_close(ranks[0][name]["rank0_probe"], ranks[0][name]["probe"], atol=1e-4, rtol=1e-4)
        single = S.run(name.partition("@")[0], device="cuda:0" if DEVICE == "cuda" else "cpu")
        assert any(k < f for f, k in single["kept"].values())
        S.assert_same_as_single(ranks[0][name], single, atol=1e-4)


@pytest.mark.skipif(N_GPU < 2, reason="needs 2 GPUs (one per rank)")
def test_fsdp_nccl_one_gpu_per_rank(tmp_path, spawn_ranks):
    names = ("vit", "llama") if _has_transformers() else ("vit",)
    ranks = _spawn(spawn_ranks, tmp_path, 2, "nccl", names)
    _check_fsdp(ranks, names)
    assert ranks[0]["conv_fallback"]["folded_after"] == 0
    S.assert_ranks_agree(ranks[0]["conv_fallback"], ranks[1]["conv_fallback"])


@pytest.mark.skipif(DEVICE == "cuda" and not dist.is_nccl_available(), reason="NCCL is not available")
def test_fsdp_nccl_single_rank(tmp_path, spawn_ranks):
    """FSDP2 over an NCCL group of one rank on GPU 0: sharding (DTensors), DMS's all-reduces and the export."""
    names = ("vit", "vit@cpu")  # vit@cpu: built on the CPU, search state moved, fully_shard moves the model
    ranks = _spawn(spawn_ranks, tmp_path, 1, "nccl" if DEVICE == "cuda" else "gloo", names, extras=False)
    _check_fsdp(ranks, names)


@pytest.mark.skipif(DEVICE == "cuda" and N_GPU != 1, reason="for a machine with exactly one GPU")
def test_fsdp_two_processes_share_one_gpu(tmp_path, spawn_ranks):
    """Two ranks on the one GPU. NCCL refuses two ranks on one device, so the group is gloo (CUDA tensors)."""
    ranks = _spawn(spawn_ranks, tmp_path, 2, "gloo", ("vit",), extras=False)
    _check_fsdp(ranks, ("vit",))


def _has_transformers() -> bool:
    try:
        import transformers  # noqa: F401
    except ImportError:
        return False
    return True
