"""Muon on the decoder's hidden matrices, AdamW on everything else, as one optimizer.

Muon (Jordan et al. 2024; "Muon is Scalable for LLM Training", Liu et al. 2025) replaces a 2-D
weight's update by the orthogonalised Nesterov momentum: five quintic Newton-Schulz iterations
push every singular value of the momentum towards 1, so the step moves all directions of the
matrix at the same rate instead of the few that dominate its gradient. Moonlight's scaling
0.2 * sqrt(max(rows, cols)) gives the update AdamW's RMS, so one schedule serves both halves.
Embeddings, the LM head, the projector, norms and biases stay on AdamW, as in both papers.

Why our own and not torch.optim.Muon plus a second AdamW:
- torch's Muon orthogonalises in bfloat16. On a CPU held to AVX2 (the demo pins it for results
  that are identical across hosts) a bfloat16 matmul has no kernel and is ~60x slower than float32
  (2.1 s against 33 ms a step for lalm-tiny's 14 matrices), and it rounds differently per ISA.
  Float32 costs ~60 ms a step there and is exact enough that the result does not depend on it.
- One optimizer keeps one state dict, so checkpoints save and resume as they do for AdamW: a Muon
  matrix has the slot "momentum_buffer", every other parameter "step", "exp_avg", "exp_avg_sq"
  (torch.optim.AdamW's names and arithmetic; tests/test_muon.py checks both against torch).

Not under FSDP: Newton-Schulz needs each matrix whole, and FSDP2 keeps row shards (TrainConfig
refuses the pair). Under DDP every rank holds the averaged gradient and takes the same step.
"""

from __future__ import annotations

import math

import torch

# Quintic Newton-Schulz coefficients (Jordan et al. 2024, as torch.optim.Muon): a fast climb of
# small singular values to ~[0.7, 1.2] rather than exact convergence to 1.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """~U V^T of g = U S V^T, in float32. g: (rows, cols) -> (rows, cols)."""
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    wide = x.shape[0] <= x.shape[1]
    x = x if wide else x.T  # iterate on the (small, small) Gram matrix: (m, n) with m <= n
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1: inside NS's basin
    for _ in range(steps):
        gram = x @ x.T  # (m, m)
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)  # a x + (b G + c G^2) x
    return (x if wide else x.T).to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """param_groups with "muon": True take Muon steps, the others AdamW steps. Every group has its
    own "lr" (the loop writes the schedule's value into each); a Muon group's step size is
    lr * lr_ratio * 0.2 * sqrt(max(rows, cols))."""

    def __init__(self, groups: list[dict], lr: float, weight_decay: float = 0.0, lr_ratio: float = 1.0,
                 momentum: float = 0.95, ns_steps: int = 5, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8):
        for g in groups:
            if g.get("muon") and any(p.dim() != 2 for p in g["params"]):
                raise ValueError("MuonAdamW: a muon group holds 2-D matrices only")
        defaults = {"lr": lr, "weight_decay": weight_decay, "muon": False, "lr_ratio": lr_ratio,
                    "momentum": momentum, "ns_steps": ns_steps, "betas": betas, "eps": eps}
        super().__init__(groups, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        if closure is not None:
            raise ValueError("MuonAdamW: no closure")
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    (self._muon if group["muon"] else self._adamw)(p, group)

    def _muon(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        if "momentum_buffer" not in state:
            if state:
                raise ValueError("MuonAdamW: a Muon matrix has AdamW state (a checkpoint of another optimizer?)")
            state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        buf, mu = state["momentum_buffer"], group["momentum"]
        buf.lerp_(p.grad, 1 - mu)
        update = orthogonalize(p.grad.lerp(buf, mu), group["ns_steps"])  # Nesterov: grad + mu (buf - grad)
        lr = group["lr"] * group["lr_ratio"]
        p.mul_(1 - lr * group["weight_decay"])
        p.add_(update, alpha=-lr * 0.2 * math.sqrt(max(p.shape)))

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor step (amsgrad off), slot for slot."""
        state = self.state[p]
        if "exp_avg" not in state:
            if state:
                raise ValueError("MuonAdamW: an AdamW parameter has Muon state (a checkpoint of another optimizer?)")
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        (beta1, beta2), lr = group["betas"], group["lr"]
        state["step"] += 1
        t = float(state["step"])
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(p.grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
        bias1, bias2_sqrt = 1 - beta1**t, math.sqrt(1 - beta2**t)
        denom = (state["exp_avg_sq"].sqrt() / bias2_sqrt).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / bias1)
