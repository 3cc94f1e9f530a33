"""lalm.kernels: the CPU decode GEMM of our own (compiled on first use), its packing, its
fallback, and that decoding through it keeps transformers' greedy ids."""

from __future__ import annotations

import shutil

import pytest
import torch

from lalm import kernels

needs_kernel = pytest.mark.skipif(
    torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512") or shutil.which("cc") is None,
    reason="the kernel needs an AVX2 + FMA CPU and a C compiler",
)


@needs_kernel
def test_builds_here():
    assert kernels.decode_gemm_fn() is not None  # where it can be built, it is: no silent fallback


@needs_kernel
@pytest.mark.parametrize("M", [1, 2, 3, 7, 8, 9, 16])
@pytest.mark.parametrize("N, K", [(40, 24), (37, 13), (8, 1)])  # N and K not multiples of 8 too
def test_equals_matmul(M, N, K):
    g = torch.Generator().manual_seed(M * 100 + N)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
    y = kernels.decode_gemm(x, kernels.Panels.pack(w))
    assert y.shape == (M, N) and y.is_contiguous()
    torch.testing.assert_close(y, x @ w.T, rtol=1e-5, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("M", [1, 3, 8, 16])
def test_bf16_weights_widen_exactly(M):
    """bf16 weights and activations: fp32 arithmetic over the exact bf16 values, one rounding to
    bf16 at the end."""
    g = torch.Generator().manual_seed(M)
    x, w = torch.randn(M, 72, generator=g).bfloat16(), torch.randn(44, 72, generator=g).bfloat16()
    p = kernels.Panels.pack(w)
    assert p.data.dtype == torch.bfloat16
    y = kernels.decode_gemm(x, p)
    assert y.dtype == torch.bfloat16 and y.shape == (M, 44)
    ref = x.float() @ w.float().T
    torch.testing.assert_close(y.float(), ref, rtol=8e-3, atol=1e-3)
    assert torch.equal(y, kernels.decode_gemm(x.float(), p).bfloat16())  # same fp32 sums, rounded once


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    """Each output is accumulated over k in one order whatever M is: bit-identical rows."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(8, 200, generator=g), torch.randn(64, 200, generator=g)
    p = kernels.Panels.pack(w)
    whole = kernels.decode_gemm(x, p)
    for i in range(7):
        assert torch.equal(kernels.decode_gemm(x[i: i + 2], p)[0], whole[i])
    assert torch.equal(kernels.decode_gemm(torch.cat([x, x]), p)[8:], whole)  # 16 rows: two passes


def test_panels_go_stale_when_the_weight_changes():
    w = torch.randn(16, 8)
    p = kernels.Panels.pack(w.t().t())  # any view of w
    assert p.fresh(w) and p.data.shape == (2, 8, 8)
    assert torch.equal(p.data[1, :, 3], w[11])  # panel 1, column 3 = output row 11
    with torch.no_grad():
        w.add_(1)  # as an optimizer step does
    assert not p.fresh(w) and not p.fresh(torch.randn(16, 8))


def test_no_compiler_falls_back_with_a_warning(monkeypatch, tmp_path):
    monkeypatch.setattr(kernels, "_fn", [])
    monkeypatch.setenv("LALM_HOME", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        with pytest.warns(UserWarning, match="could not be built"):
            assert kernels.decode_gemm_fn() is None
    monkeypatch.setattr(kernels, "_fn", [])
    monkeypatch.setenv("LALM_KERNELS", "0")
    assert kernels.decode_gemm_fn() is None


@needs_kernel
def test_decode_layout_packs_and_repacks(lalm_model):
    import copy

    model = copy.deepcopy(lalm_model("gqa"))
    with torch.inference_mode():
        model.use_decode_layout()
    attn, mlp = model.language_model.model.layers[0].self_attn, model.language_model.model.layers[0].mlp
    panels = [attn.qkv_panels, attn.o_panels, mlp.gate_up_panels, mlp.down_panels, model.language_model.head_panels]
    assert all(p is not None for p in panels)
    assert attn.qkv_panels.n == attn.q_proj.out_features + 2 * attn.k_proj.out_features
    assert torch.equal(attn.qkv_panels.data[0, :, 0], attn.q_proj.weight[0])
    with torch.inference_mode():
        model.use_decode_layout()  # unchanged weights: the same copies
    assert attn.qkv_panels is panels[0] and mlp.down_panels is panels[3]
    with torch.no_grad():
        mlp.down_proj.weight.mul_(2)  # a training step after generating
    with torch.inference_mode():
        model.use_decode_layout()
    assert mlp.down_panels is not panels[3] and torch.equal(mlp.down_panels.data[0, :, 1], mlp.down_proj.weight[1])
    assert attn.qkv_panels is panels[0]
