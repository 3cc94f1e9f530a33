"""Beam search: the `num_beams` most likely continuations of each prompt, as transformers keeps them.

Offline decoding (`LALM.generate`, `lalm generate`, `lalm eval --num-beams`); the serving engine
decodes one sequence per request. ASR decoders are usually read this way (Whisper decodes with
5 beams); for lalm-tiny 4 beams cut held-out WER by a few points (docs/lalm-tiny.md).

The same search as `transformers.GenerationMixin._beam_search` with its defaults
(`early_stopping=False`, `num_return_sequences=1`), so that token ids match it exactly
(tests/test_beam.py):

- Scores are summed log-probabilities: log-softmax of the logits, then the processors that
  apply to greedy decoding too (min-new-tokens and the repetition penalty on the log-probs, as
  transformers applies its logits processors there; `<|AUDIO|>` is never chosen).
- Each step takes the top `max(2, 1 + n_stop) * K` continuations of a row's K beams. Those
  that end (a stop token, or the row's last allowed token) and rank among the first K enter
  the row's finished list with score `sum / length ** length_penalty` (length = generated
  tokens, the stop token included); the best K that do not end continue.
- A row stops improving once its best running beam, scored at the current length, cannot
  beat the worst of K finished ones (transformers' heuristic for `early_stopping=False`);
  the search ends when no row can improve or every candidate has ended.

Cache: one preallocated KVCache of B*K slots (row b's beams at b*K .. b*K+K-1); the prompt is
prefilled once per row and copied to its K slots; after each step the slots are reordered to
follow their parent beams (only the columns written so far are copied). A row that can no
longer improve is answered and leaves the batch there (transformers computes it on to the end
of the batch; its answer is the same, since a row's arithmetic does not depend on its batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lalm.decode_ops import cpu_decode_path, decode_attention, decode_threads
from lalm.generate import SamplingOptions, TextStream, _rows_view, check_context, prefill
from lalm.model import KVCache

_NEG = -1.0e9  # transformers' "removed" score: finite, so sums stay ordered


@dataclass
class Beam:
    """The best finished sequence of one prompt."""

    tokens: list[int]  # generated ids, the final stop token included
    logprobs: list[float]  # the model's log-prob of each id (before the processors)
    score: float  # summed processed log-probs / length ** length_penalty
    finish_reason: str  # "stop" or "length"
    prompt_ids: list[int]


def _processed(logp: torch.Tensor, options: SamplingOptions, seen: torch.Tensor | None, n_generated: int,
               audio_id: int) -> torch.Tensor:
    """The scores beams are ranked by: log-probs (N, V) after min-new-tokens, the repetition
    penalty (CTRL-style, on log-probs as transformers' beam search applies it) and <|AUDIO|>."""
    if n_generated < options.min_new_tokens and options.stop_token_ids:
        logp[:, list(options.stop_token_ids)] = -math.inf
    if seen is not None:
        p = options.repetition_penalty
        logp = torch.where(seen, torch.where(logp < 0, logp * p, logp / p), logp)
    logp[:, audio_id] = -math.inf
    return logp


def _gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """t (B, M, ...) gathered along dim 1 by index (B, N) -> (B, N, ...)."""
    while index.dim() < t.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(t, index, dim=1)


@torch.inference_mode()
def search(model, batch, options: SamplingOptions) -> list[Beam]:
    """Beam search over a left-padded batch; one Beam per row, in batch order."""
    check_context(model, batch)
    model.use_decode_layout()
    K, lp = options.num_beams, options.length_penalty
    B, T = batch.input_ids.shape
    device = model.language_model.lm_head.weight.device
    mask0 = batch.attention_mask.to(device).bool()  # (B, T)
    lengths = mask0.long().sum(-1)  # (B,)
    room = model.config.text.max_position_embeddings - lengths  # new tokens each row's context allows
    budget = torch.clamp(room, max=options.max_new_tokens)  # (B,) >= 1 (check_context)
    M = int(budget.max())
    stop_ids = torch.tensor(options.stop_token_ids, dtype=torch.long, device=device)

    cache = KVCache.for_model(model, B * K, T + M)
    logits = prefill(model, batch, _rows_view(cache, B))  # (B, V); prompts in slots [0, B)
    for t in (cache.k, cache.v):
        t[:, : B * K, :, :T] = t[:, :B, :, :T].repeat_interleave(K, dim=1)
    logits = logits.float().repeat_interleave(K, dim=0)  # (B*K, V): K identical copies
    V = logits.shape[-1]
    # Candidates kept per row and step (transformers'; at most every continuation of every beam).
    width = min(max(2, 1 + len(options.stop_token_ids)) * K, K * V)
    first_k = torch.arange(width, device=device) < K  # only these may finish (transformers)
    kv_mask = torch.zeros(B * K, T + M, dtype=torch.bool, device=device)
    kv_mask[:, :T] = mask0.repeat_interleave(K, dim=0)
    next_pos = lengths.repeat_interleave(K)  # (B*K,) RoPE position of each slot's next token
    seen = None
    if options.repetition_penalty != 1.0:
        seen = torch.zeros(B * K, V, dtype=torch.bool, device=device)
        for b in range(B):
            seen[b * K : (b + 1) * K, batch.input_ids[b][batch.attention_mask[b].bool()].to(device)] = True

    # Running beams (B, K): tokens, per-token raw log-probs, summed score; beam 0 alone at first
    # so that the K copies do not all propose the same continuations.
    run_tok = torch.zeros(B, K, M, dtype=torch.long, device=device)
    run_lp = torch.zeros(B, K, M, device=device)
    run_score = torch.full((B, K), _NEG, device=device)
    run_score[:, 0] = 0.0
    # Finished (B, K), best first: tokens, log-probs, score, length, whether the slot holds one.
    fin_tok, fin_lp = run_tok.clone(), run_lp.clone()
    fin_score = torch.full((B, K), _NEG, device=device)
    fin_len = torch.zeros(B, K, dtype=torch.long, device=device)
    fin_done = torch.zeros(B, K, dtype=torch.bool, device=device)
    improvable = torch.ones(B, 1, dtype=torch.bool, device=device)
    ids = torch.arange(B, device=device)  # the batch row each live row is
    prompts = [batch.input_ids[b][batch.attention_mask[b].bool()].tolist() for b in range(B)]
    out: list[Beam | None] = [None] * B
    stops = set(options.stop_token_ids)

    def emit(rows: torch.Tensor) -> None:
        """The best finished beam of each live row in `rows` (local indices) is its answer."""
        for b in rows.tolist():
            n = int(fin_len[b, 0])
            tokens = fin_tok[b, 0, :n].tolist()
            out[int(ids[b])] = Beam(tokens=tokens, logprobs=fin_lp[b, 0, :n].tolist(), score=float(fin_score[b, 0]),
                                    finish_reason="stop" if tokens and tokens[-1] in stops else "length",
                                    prompt_ids=prompts[int(ids[b])])

    for step in range(M):
        raw = torch.log_softmax(logits, dim=-1)  # (B*K, V)
        scores = _processed(raw.clone(), options, seen, step, model.config.audio_token_index)
        total = (scores.view(B, K, V) + run_score[:, :, None]).view(B, K * V)
        top_score, top_idx = total.topk(width, dim=-1)  # (B, W)
        parent, token = top_idx // V, top_idx % V
        cand_tok, cand_lp = _gather(run_tok, parent), _gather(run_lp, parent)  # (B, W, M)
        cand_tok[:, :, step] = token
        cand_lp[:, :, step] = raw.view(B, K * V).gather(1, top_idx)
        ends = torch.isin(token, stop_ids) | (step + 1 >= budget)[:, None]  # (B, W)

        # The K best candidates that go on.
        going = top_score + ends.float() * _NEG
        keep = going.topk(K, dim=-1).indices  # (B, K)
        run_tok, run_lp = _gather(cand_tok, keep), _gather(cand_lp, keep)
        run_score, src = _gather(going, keep), _gather(parent, keep)

        # Candidates that end here, scored by length, merged into the finished list.
        just = ends & first_k
        new = top_score / float(step + 1) ** lp + (~just).float() * _NEG + (~improvable).float() * _NEG
        all_score = torch.cat([fin_score, new], dim=1)
        best = all_score.topk(K, dim=-1).indices
        fin_tok = _gather(torch.cat([fin_tok, cand_tok], 1), best)
        fin_lp = _gather(torch.cat([fin_lp, cand_lp], 1), best)
        fin_len = _gather(torch.cat([fin_len, torch.full_like(new, step + 1, dtype=torch.long)], 1), best)
        fin_done = _gather(torch.cat([fin_done, just], 1), best)
        fin_score = _gather(all_score, best)

        best_running = run_score[:, :1] / float(step + 1) ** lp
        worst_finished = torch.where(fin_done, fin_score.min(-1, keepdim=True).values, _NEG)
        improvable = improvable & (best_running > worst_finished).any(-1, keepdim=True)
        if not bool(improvable.any()) or bool(ends.all()) or step + 1 == M:
            break
        # A row that cannot improve is final (transformers computes it on; its finished list no
        # longer changes): answer it and drop it from the batch, as the greedy decoder drops rows.
        live = improvable[:, 0]
        if not bool(live.all()):
            emit((~live).nonzero()[:, 0])
            keep_rows = live.nonzero()[:, 0]
            run_tok, run_lp, run_score, src = run_tok[keep_rows], run_lp[keep_rows], run_score[keep_rows], src[keep_rows]
            fin_tok, fin_lp, fin_score = fin_tok[keep_rows], fin_lp[keep_rows], fin_score[keep_rows]
            fin_len, fin_done, improvable = fin_len[keep_rows], fin_done[keep_rows], improvable[keep_rows]
            budget, ids = budget[keep_rows], ids[keep_rows]
        else:
            keep_rows = torch.arange(B, device=device)
        # Slots follow their parents (rows dropped above leave the batch here); feed each beam's new token.
        slots = (src + keep_rows[:, None] * K).view(-1)  # (B'*K,) old slot of each new one
        B = len(keep_rows)
        pos = T + step
        for t in (cache.k, cache.v):
            t[:, : B * K, :, :pos] = t[:, slots, :, :pos]
        kv_mask, next_pos = kv_mask[slots], next_pos[slots]
        kv_mask[:, pos] = True
        if seen is not None:
            seen = seen[slots]
            seen[torch.arange(B * K, device=device), run_tok[:, :, step].view(-1)] = True
        head = model.language_model.lm_head.weight
        with decode_threads(on=cpu_decode_path(head)), decode_attention(head.device):
            logits = model(run_tok[:, :, step].reshape(-1, 1), position_ids=(next_pos + step)[:, None],
                           attention_mask=kv_mask[:, : pos + 1], cache=_rows_view(cache, B * K), cache_pos=pos,
                           logits_to_keep=1)[:, -1].float()  # (B*K, V)

    emit(torch.arange(B, device=device))
    return out


def text_of(beam: Beam, tokenizer) -> str:
    """The text a greedy row with these tokens would have (special ids skipped, whole characters)."""
    stream = TextStream(tokenizer)
    for t in beam.tokens:
        stream.push(t)
    stream.flush()
    return stream.text
