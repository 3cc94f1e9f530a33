"""CPU kernels of our own, compiled on first use with the system's C compiler.

One so far: `decode_gemm.c`, the few-row GEMM of a CPU decode step, fp32 arithmetic over fp32
or bf16 weights (why ours: see the file).
It is built once per source version into `$LALM_HOME/kernels` (default ~/.cache/lalm/kernels;
~0.5 s with gcc) and loaded with ctypes: no build step at install, no Python headers, a wheel
that stays pure Python. Where it cannot be had (a CPU without AVX2 and FMA, no C compiler, a
failed build, or `LALM_KERNELS=0`) `decode_gemm_fn()` is None and decode steps keep numpy's
OpenBLAS for fp32 and torch's own kernels for bf16: correct, only slower (2.5x at 2-4 rows in
fp32; 1.5-5x in bf16), and a row then rounds differently with other batch sizes.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("decode_gemm.c")
FLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC"]
# Up to 16 rows: beyond, each block of 8 rows streams the weights again and OpenBLAS is faster
# (24 rows: 210 vs 200 ms per mid-size step). One row runs a little faster than OpenBLAS, and one
# kernel for every size keeps a row's decode-step results independent of its batch.
MAX_ROWS = 16

_fn: list = []  # [{dtype: ctypes function} or None], resolved once per process
_lock = threading.Lock()
_threads = [1]  # OpenMP threads per call, set by decode_ops.decode_threads


def cache_dir() -> Path:
    return Path(os.environ.get("LALM_HOME") or Path.home() / ".cache" / "lalm").expanduser() / "kernels"


def decode_gemm_fn() -> dict | None:
    """{weight dtype: compiled function} (fp32 and bf16 weights), or None where the kernel cannot
    be had (module docstring)."""
    with _lock:
        if not _fn:
            _fn.append(_load())
        return _fn[0]


def _load() -> dict | None:
    if os.environ.get("LALM_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return None
    source = SOURCE.read_bytes()
    tag = hashlib.sha256(source + " ".join(FLAGS).encode()).hexdigest()[:16]
    try:
        # Inside the try: Path.home() raises RuntimeError where no home can be found (HOME
        # unset under a uid without a passwd entry, as containers run), and that must fall back.
        lib = cache_dir() / f"decode_gemm-{tag}.so"
        if not lib.exists():
            lib.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=lib.parent) as tmp:
                out = Path(tmp) / lib.name
                subprocess.run([os.environ.get("CC", "cc"), *FLAGS, str(SOURCE), "-o", str(out)],
                               check=True, capture_output=True, timeout=120)
                os.replace(out, lib)  # atomic: a concurrent process never loads a half-written file
        so = ctypes.CDLL(str(lib))
        fns = {torch.float32: so.lalm_decode_gemm_f32, torch.bfloat16: so.lalm_decode_gemm_bf16}
    except (OSError, AttributeError, RuntimeError, subprocess.SubprocessError) as e:
        # The compiler writes in its locale's encoding (not always UTF-8: a strict decode raised
        # here instead of falling back), and over several lines: one line in a log.
        detail = " ".join((getattr(e, "stderr", b"") or b"").decode(errors="replace").split())
        warnings.warn(f"lalm: the CPU decode kernel could not be built or loaded ({e} {detail[-300:]}); "
                      f"decode steps use numpy's OpenBLAS", stacklevel=2)
        return None
    for fn in fns.values():
        fn.argtypes = [ctypes.c_int] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
        fn.restype = None
    return fns


def set_threads(n: int) -> None:
    _threads[0] = max(1, n)


def version_of(w: torch.Tensor) -> int | None:
    """w's in-place write counter (torch's _version), or None where it has none: an inference
    tensor (a model loaded under torch.inference_mode), also after its `.data` was set to an
    ordinary tensor, where reading _version raises. Such a weight can change in place unseen (a
    load_state_dict under inference_mode), so no copy of it is ever fresh."""
    try:
        return w._version
    except RuntimeError:
        return None


@dataclass
class Panels:
    """A weight (N, K) packed for the kernel: data (ceil(N/8), K, 8), panels of 8 output columns
    (zero rows pad N), and what it was packed from, so a later in-place change of that weight (an
    optimizer step after generating) is seen and the stale copy is not used."""

    data: torch.Tensor
    n: int
    source_ptr: int
    source_version: int | None

    @classmethod
    def pack(cls, w: torch.Tensor) -> Panels:
        """w (N, K), any strides (e.g. the (in, out) view `use_decode_layout` makes, transposed)."""
        N, K = w.shape
        P = -(-N // 8)
        with torch.no_grad():
            padded = torch.cat([w, w.new_zeros(P * 8 - N, K)]) if P * 8 != N else w
            data = padded.reshape(P, 8, K).transpose(1, 2).contiguous()  # (P, K, 8)
        # _version is torch's in-place write counter, shared by a tensor and all its views.
        return cls(data, N, w.data_ptr(), version_of(w))

    def fresh(self, w: torch.Tensor) -> bool:
        version = version_of(w)
        return version is not None and w.data_ptr() == self.source_ptr and version == self.source_version


def decode_gemm(x: torch.Tensor, panels: Panels) -> torch.Tensor:
    """x (M, K) on CPU -> (M, N) = x @ W^T through the kernel, in x's dtype; fp32 arithmetic
    whatever the dtypes (fp32 or bf16 x and weights). decode_gemm_fn() must not be None."""
    dtype = x.dtype
    x = x.to(torch.float32).contiguous()
    M, K = x.shape
    P = panels.data.shape[0]
    y = torch.empty(M, P * 8, dtype=torch.float32)
    fn = decode_gemm_fn()[panels.data.dtype]
    fn(M, K, P * 8, x.data_ptr(), panels.data.data_ptr(), y.data_ptr(), _threads[0])
    y = y if P * 8 == panels.n else y[:, : panels.n].contiguous()
    return y if dtype == torch.float32 else y.to(dtype)
