"""How a decode step runs fast: thread pools, few-row GEMMs, fused weights.

The model (model.py) calls these on its decode path (one new token per row, no gradient); they
change how the arithmetic is done, never what it computes. On a CPU in fp32 a decode step is a
chain of GEMMs that stream every weight once for a few rows: `decode_threads` gives those GEMMs
the cores, `decode_gemm` sends them to our kernel (lalm.kernels) or numpy's OpenBLAS, and
`fused_weight` / `fused_bias` / `decode_panels` read the storage `use_decode_layout` prepared. On
CUDA, `decode_attention` keeps decode steps off cuDNN's attention.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from lalm import kernels

_numpy_openblas: list = []  # [numpy's OpenBLAS (a threadpoolctl controller) or None], found once


def numpy_openblas():
    """numpy's OpenBLAS, to size its thread pool at run time, or None when numpy links another
    BLAS. threadpoolctl is the maintained way to reach a loaded OpenBLAS's set_num_threads."""
    if not _numpy_openblas:
        from threadpoolctl import ThreadpoolController

        libs = ThreadpoolController().select(internal_api="openblas").lib_controllers
        libs = [lib for lib in libs if "numpy" in lib.filepath or "scipy_openblas" in lib.filepath]
        _numpy_openblas.append(libs[0] if libs else None)
    return _numpy_openblas[0]


@contextlib.contextmanager
def decode_threads(on: bool = True):
    """Threads for one CPU decode step (`cpu_decode_path`): torch's ops on one thread, the step's
    GEMMs (`decode_gemm`: our kernel's OpenMP threads, or numpy's OpenBLAS) on as many threads as
    torch had.

    Why: a decode step is ~95% few-row GEMMs that stream the weights; the rest (norms, RoPE,
    attention over B x S) is too small to gain from a second thread. With torch's OpenMP workers
    and OpenBLAS's threads both live, each pool spins while the other works, and a 2-thread step
    ran at half the one-thread speed; with torch on one thread and the GEMMs on OpenBLAS's two,
    a 24-layer 896-wide decoder decodes batch 1 at 5.6 tok/s and batch 8 at 27.0 (with the decode
    GEMMs left on MKL at 2 threads: 5.7 and 13.2; docs/benchmarks.md, runs G). Sizing OpenBLAS
    here also keeps a one-thread run (e.g. `lalm serve --threads 1`) on one core.
    """
    blas = numpy_openblas() if on else None
    if blas is None and not (on and kernels.decode_gemm_fn() is not None):
        yield False
        return
    n = torch.get_num_threads()
    if blas is not None and blas.num_threads != n:
        blas.set_num_threads(n)
    kernels.set_threads(n)  # our own few-row kernel (`decode_gemm` with panels)
    torch.set_num_threads(1)
    try:
        yield True
    finally:
        torch.set_num_threads(n)


def decode_attention(device: torch.device):
    """SDPA backends for a decode step: on CUDA, any but cuDNN's. cuDNN's fused attention (which
    torch prefers for bf16 on Hopper) plans each new key length, and a decode step's key length
    grows every token: on an H200 it took 3.2 ms of CPU per call, 71% of a bf16 decode step, the
    GPU idle meanwhile (torch 2.11; docs/benchmarks.md, run C1). Flash and memory-efficient
    attention launch in microseconds."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def decode_gemm(x: torch.Tensor, w: torch.Tensor, panels: kernels.Panels | None = None) -> torch.Tensor:
    """x (M, in) @ w (in, out) for a decode step on CPU inside `decode_threads`: our own kernel
    (`lalm.kernels`, fp32 or bf16) for up to 16 rows when `use_decode_layout` packed w into
    `panels`, else numpy's OpenBLAS for fp32; torch elsewhere.

    Why: the MKL inside torch's x86 wheel runs few-row fp32 GEMMs at a fraction of the pace of
    the OpenBLAS inside numpy's wheel on AMD CPUs (this project's: EPYC, AVX2). Streaming a
    24-layer, 896-wide decoder's 2 GB of weights for 8 rows took 630 ms with MKL and 258 ms with
    OpenBLAS at 2 threads (564 vs 383 ms at 1); one row about equal at 1 (bench/decode_gemm.py).
    The arrays share the tensors' memory: no copies. Only without gradients (decode steps).
    """
    cpu_decode = x.device.type == "cpu" and x.dtype == w.dtype and torch.get_num_threads() == 1
    if (cpu_decode and panels is not None and x.shape[0] <= kernels.MAX_ROWS
            and panels.fresh(w) and not torch.is_grad_enabled()):
        return kernels.decode_gemm(x, panels)  # fp32 or bf16
    if cpu_decode and x.dtype == torch.float32 and numpy_openblas() is not None:
        return torch.from_numpy(np.matmul(x.detach().numpy(), w.detach().numpy()))
    return x @ w


def decode_linear(layer: nn.Module, x: torch.Tensor, panels: kernels.Panels | None = None) -> torch.Tensor:
    """layer(x) for decode rows x (B, 1, in), through `decode_gemm` when layer is a plain Linear and
    no gradient is wanted; the layer's own call otherwise (LoRA wrappers, training)."""
    if type(layer) is not nn.Linear or torch.is_grad_enabled():
        return layer(x)
    y = decode_gemm(x.reshape(-1, x.shape[-1]), layer.weight.t(), panels)
    if layer.bias is not None:
        y += layer.bias
    return y.view(*x.shape[:-1], -1)


def cpu_decode_path(weight: torch.Tensor) -> bool:
    """Whether decode steps with this dtype and device take the CPU path (`decode_threads`,
    `decode_gemm`): fp32, or bf16 where our kernel is built (bf16 has no BLAS path of its own)."""
    return weight.device.type == "cpu" and (
        weight.dtype == torch.float32 or (weight.dtype == torch.bfloat16 and kernels.decode_gemm_fn() is not None))


def fused_weight(linears: tuple[nn.Module, ...]) -> torch.Tensor | None:
    """(in, sum of outs): these Linear weights side by side in one tensor, when
    `use_decode_layout` stored them that way and no gradient is wanted, so one GEMM computes all
    the projections of one input; None otherwise (another layout, a wrapper such as LoRA, training).
    """
    if torch.is_grad_enabled() or any(type(m) is not nn.Linear for m in linears):
        return None
    ws = [m.weight for m in linears]
    total, k = sum(w.shape[0] for w in ws), ws[0].shape[1]
    # fp32: column blocks of one (in, total) row-major tensor; bf16: row blocks of one (total, in).
    by_rows = ws[0].stride() == (k, 1)
    address, size = ws[0].data_ptr(), ws[0].element_size()
    storage = ws[0].untyped_storage().data_ptr()
    for w in ws:  # in order, end to end, in one storage (separate weights can be adjacent too)
        if (w.stride() != ((k, 1) if by_rows else (1, total)) or w.data_ptr() != address
                or w.untyped_storage().data_ptr() != storage):
            return None
        address += (w.numel() if by_rows else w.shape[0]) * size  # next rows / next columns
    return ws[0].detach().as_strided((k, total), (1, k) if by_rows else (total, 1))


def decode_panels(old: kernels.Panels | None, linears: tuple[nn.Module, ...]) -> kernels.Panels | None:
    """The decode kernel's copy of these Linears' weight (fused when `use_decode_layout` stored
    them side by side): `old` while it is still a copy of the current values, else a new one;
    None for a wrapper such as LoRA (its decode GEMMs stay on its own forward). Without gradients."""
    if any(type(m) is not nn.Linear for m in linears):
        return None
    # A weight without a version counter (loaded under torch.inference_mode: kernels.version_of)
    # gets no copy, as one could never be told stale; its GEMMs take the other path. Checked
    # first: fused_weight's view of such a weight raises here, outside inference mode.
    if any(kernels.version_of(m.weight) is None for m in linears):
        return None
    w = fused_weight(linears) if len(linears) > 1 else linears[0].weight.detach().t()  # (in, out)
    if w is None:
        return None
    return old if old is not None and old.fresh(w) else kernels.Panels.pack(w.t())


def fused_bias(linears: tuple[nn.Module, ...]) -> torch.Tensor:
    """(sum of outs,): these Linear biases end to end, as a view when `use_decode_layout` stored
    them in one tensor (no copy per decode step), else concatenated."""
    bs = [m.bias for m in linears]
    address, size = bs[0].data_ptr(), bs[0].element_size()
    for b in bs:
        if b.stride() != (1,) or b.data_ptr() != address:
            return torch.cat(bs)
        address += b.shape[0] * size
    return bs[0].detach().as_strided((sum(b.shape[0] for b in bs),), (1,))


def use_decode_layout(model: nn.Module) -> None:
    """Store the decoder's widening projections transposed in memory, q/k/v side by side and
    gate/up side by side, so a one-row decode step reads each weight fast and runs one GEMM
    per group (`fused_weight`). Same parameter names, shapes and values (the parameters become
    views); idempotent; CPU only; the LM head stays as stored when tied. In bf16 (where our
    decode kernel is built: lalm.kernels) the groups are stored row after row instead, each
    weight still contiguous (out, in), for the kernel's fused GEMMs; and in both dtypes the
    kernel gets its packed copies (`decode_panels`).

    Why: a decode step is one- to few-row GEMMs that stream every weight once, and on CPU (MKL,
    fp32) `x @ W.t()` reads W about 1.3x faster when W.t() is the contiguous operand (measured
    per row: gate 896->4864 1.5 vs 2.2 ms, LM head 47 vs 71 ms; 8 rows: 170 vs 236 ms), and
    one GEMM over gate|up (q|k|v) beats two (three): 2.4 vs 2.75 ms (0.41 vs 0.50 ms) per row.
    Decode steps now run these GEMMs through our kernel's packed copies or numpy's OpenBLAS
    (`decode_gemm`).
    down_proj stays as stored (faster so). bf16 is 5-6x *slower* with transposed storage
    (oneDNN converts it), hence fp32 only. Training and saving are unaffected (autograd does
    not care about strides; fused_weight is off with gradients; weights.save writes
    contiguous copies).
    """
    head = model.language_model.lm_head
    fp32 = head.weight.dtype == torch.float32
    if head.weight.device.type != "cpu" or not (fp32 or (
            head.weight.dtype == torch.bfloat16 and kernels.decode_gemm_fn() is not None)):
        return
    tied = head.weight is model.language_model.model.embed_tokens.weight
    groups = []
    for layer in model.language_model.model.layers:
        a, m = layer.self_attn, layer.mlp
        groups += [(a.q_proj, a.k_proj, a.v_proj), (a.o_proj,), (m.gate_proj, m.up_proj)]
    groups += [] if tied else [(head,)]
    # The new storage must be an ordinary tensor even when called under inference_mode,
    # or the model could no longer be trained afterwards.
    with torch.inference_mode(False), torch.no_grad():
        for group in groups:
            if any(type(m) is not nn.Linear for m in group):  # e.g. LoRA wrappers: leave as is
                continue
            # Inference tensors (the model loaded under torch.inference_mode): setting .data of one
            # to an ordinary tensor leaves a parameter that every later op, prefill's included,
            # rejects ("Inference tensors do not track version counter"): leave as stored.
            if any(kernels.version_of(m.weight) is None for m in group):
                continue
            if len(group) > 1 and fused_weight(group) is not None:
                continue
            if len(group) == 1 and (not fp32 or not group[0].weight.is_contiguous()):
                continue  # bf16: a single weight stays as stored
            if fp32:
                w = torch.cat([m.weight.t() for m in group], dim=1)  # (in, sum of outs), contiguous
            else:
                w = torch.cat([m.weight for m in group]).t()  # bf16: (sum of outs, in) storage
            b = torch.cat([m.bias for m in group]) if group[0].bias is not None else None
            start = 0
            for m in group:
                # fp32: (out, in), strides (1, total); bf16: contiguous rows of the one tensor
                m.weight.data = w[:, start: start + m.out_features].t()
                if b is not None:  # q|k|v biases end to end too (`fused_bias`)
                    m.bias.data = b[start: start + m.out_features]
                start += m.out_features
        if kernels.decode_gemm_fn() is None:
            return
        # Copies for our decode kernel (1-16 rows): one more copy of the decoder's weights
        # in memory, for GEMMs 1.1-2.5x faster than OpenBLAS at 1-16 rows (lalm.kernels).
        lm = model.language_model
        for layer in lm.model.layers:
            a, m = layer.self_attn, layer.mlp
            a.qkv_panels = decode_panels(a.qkv_panels, (a.q_proj, a.k_proj, a.v_proj))
            a.o_panels = decode_panels(a.o_panels, (a.o_proj,))
            m.gate_up_panels = decode_panels(m.gate_up_panels, (m.gate_proj, m.up_proj))
            m.down_panels = decode_panels(m.down_panels, (m.down_proj,))
        lm.head_panels = decode_panels(lm.head_panels, (head,))
