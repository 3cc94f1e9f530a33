"""Training losses: masked next-token cross-entropy and DPO (Qwen2-Audio paper, Eq. 2).

Labels arrive already shifted (`Batch.labels[t]` is the target for position t, -100 where no
loss), so nothing here shifts again: position t's logits are scored against labels[t].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under the logits; 0 where the label is -100.

    logits (B, T, V), labels (B, T) -> (B, T) float32.
    """
    mask = labels != IGNORE_INDEX
    safe = labels.masked_fill(~mask, 0)
    # log_softmax in fp32: bf16 logits lose ~3 digits of the normaliser, enough to bias DPO.
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return picked * mask


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum of target-token log-probabilities per sequence: log P(y | x). (B, T, V) -> (B,)."""
    return token_logps(logits, labels).sum(-1)


def ce_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over target positions and their count.

    Returning the *sum* lets the loop normalise by the target count of the whole global
    batch (every micro-batch and every rank), so 1 process and N processes, with or without
    gradient accumulation, optimise exactly the same objective.
    """
    n = int((labels != IGNORE_INDEX).sum())
    loss = F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]),
        labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, n


def masked_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over target positions (the pre-training / SFT loss of one batch)."""
    total, n = ce_sum(logits, labels)
    return total / max(n, 1)


@dataclass
class DPOOutput:
    losses: torch.Tensor  # (P,) per-pair loss
    chosen_rewards: torch.Tensor  # (P,) beta * (log pi(y_w|x) - log ref(y_w|x)), detached
    rejected_rewards: torch.Tensor  # (P,)

    @property
    def margins(self) -> torch.Tensor:
        return self.chosen_rewards - self.rejected_rewards

    @property
    def accuracy(self) -> torch.Tensor:
        """Fraction of pairs whose chosen reward beats the rejected one (preference accuracy)."""
        return (self.margins > 0).float().mean()


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    ref_chosen: torch.Tensor,
    ref_rejected: torch.Tensor,
    beta: float = 0.1,
    rpo_alpha: float = 0.0,
    chosen_tokens: torch.Tensor | None = None,
) -> DPOOutput:
    """Eq. 2 of Qwen2-Audio (Rafailov et al.'s DPO), per pair, from sequence log-probs (P,).

    L = -log sigmoid( beta * [log pi(y_w|x) - log ref(y_w|x)] - beta * [log pi(y_l|x) - log ref(y_l|x)] )
    `logsigmoid` rather than `log(sigmoid(.))` keeps large negative margins finite.

    rpo_alpha > 0 adds rpo_alpha * the chosen answer's per-token NLL, -log pi(y_w|x) / |y_w|
    (chosen_tokens (P,) = |y_w|): RPO (Pang et al., 2024; TRL's and ms-swift's `rpo_alpha`). Plain
    DPO can lower the chosen answer's likelihood along with the rejected one's (it only needs the
    gap); the NLL term holds the chosen answer up. 0 = the paper's Eq. 2 alone.
    """
    chosen = policy_chosen - ref_chosen
    rejected = policy_rejected - ref_rejected
    losses = -F.logsigmoid(beta * chosen - beta * rejected)
    if rpo_alpha:
        if chosen_tokens is None:
            raise ValueError("rpo_alpha needs chosen_tokens, the length of each chosen answer")
        losses = losses - rpo_alpha * policy_chosen / chosen_tokens.clamp(min=1).to(policy_chosen)
    return DPOOutput(
        losses=losses,
        chosen_rewards=(beta * chosen).detach(),
        rejected_rewards=(beta * rejected).detach(),
    )


# --- row form: the trainer applies lm_head only at target positions ------------------------------
# With a 152k vocabulary the (B, T, V) logits of a whole batch dwarf the model's activations;
# audio and prompt positions carry no loss, so the loop computes logits for target rows only:
# logits (N, V), targets (N,), seq (N,) the sequence each row belongs to.


def rows_ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets, reduction="sum")


def rows_sequence_logps(logits: torch.Tensor, targets: torch.Tensor, seq: torch.Tensor, n_seq: int) -> torch.Tensor:
    """Per-sequence sum of target log-probs (n_seq,) from target rows."""
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return torch.zeros(n_seq, dtype=picked.dtype, device=picked.device).index_add(0, seq, picked)
