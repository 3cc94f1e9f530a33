"""Training with a frozen, cached audio encoder: the fast path `lalm demo` uses on a CPU.

The stage configs are ordinary `TrainConfig` files (configs/tiny/*.yaml also run under
`lalm train`), and the examples are rendered exactly as `train/data.py` renders them
(pretrain: raw prompt + target; SFT: the Instruct template; DPO: chosen/rejected answers). The
difference is the audio: instead of log-mel -> encoder on every step, each `<|AUDIO|>` span is
filled with `projector(cached encoder rows)` (encoder_cache.py). The encoder must therefore be
listed in `freeze`. Everything after the projector is the model's own code: embeddings, the
Qwen2 layers, the final norm and the head applied to target rows only.

Optional regularisation of the cached features (`FeatureAugment`): random time masks and
Gaussian noise, the cheap stand-in for audio augmentation when the audio is never re-encoded.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lalm import chat
from lalm.data.manifest import read_manifest
from lalm.errors import ConfigError, LalmError
from lalm.model import attention_mask_4d, rope_cos_sin
from lalm.train import build, losses
from lalm.train.config import TrainConfig
from lalm.train.data import raw_prompt
from lalm.train.encoder_cache import FeatureCache
from lalm.train.loop import lr_at
from lalm.train.metrics import MetricsWriter, plot_losses

IGNORE = losses.IGNORE_INDEX


@dataclass
class Seq:
    """One rendered sequence: ids (T,), loss mask (T,) and its audio paths in order."""

    ids: list[int]
    mask: list[bool]
    audios: list[str]


@dataclass
class FeatureAugment:
    time_masks: int = 0  # spans zeroed per clip
    time_mask_len: int = 4  # max rows per span (25 rows = 1 s)
    noise: float = 0.0  # Gaussian noise std added to the (layer-normed) features
    dropout: float = 0.0  # elementwise dropout on the rows (what helped most against memorising the transcripts)


@dataclass
class Records:
    """The usable items of a manifest: one Seq (pretrain/SFT) or a (chosen, rejected) pair (DPO)."""

    items: list[list[Seq]] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.items)


def _audio_paths(messages: list[dict]) -> list[str]:
    return [str(a) for a in chat.audios(chat.validate(messages))]


def load_records(path: str | Path) -> list[dict]:
    """A manifest's records with absolute audio paths.

    Relative paths are taken relative to the manifest's folder, or, when only that exists, to
    the folder above it: `lalm data build` writes DIR/<stage>/<split>.jsonl with DIR-relative
    paths (the rule eval/adapters.py applies too). Records whose audio is missing are dropped.
    """
    path = Path(path)
    out = []
    for rec in read_manifest(path, resolve_audio=False, warn=False):
        ok = True
        for m in rec["messages"]:
            if not isinstance(m["content"], list):
                continue
            for part in m["content"]:
                if part.get("type") != "audio" or not isinstance(part.get("audio"), str):
                    continue
                a = Path(part["audio"])
                if not a.is_absolute():
                    here, above = path.parent / a, path.parent.parent / a
                    a = above if not here.exists() and above.exists() else here
                part["audio"] = str(a.resolve())
                ok = ok and a.is_file()
        if ok:
            out.append(rec)
    return out


def manifest_audio(path: str | Path) -> list[str]:
    """Every audio path a manifest refers to (resolved), in order, without duplicates."""
    out: dict[str, None] = {}
    for rec in load_records(path):
        for p in _audio_paths(rec["messages"]):
            out[p] = None
    return list(out)


def render_records(path: str | Path, stage: str, tokenizer, cache: FeatureCache, train_on: str = "all",
                   max_length: int = 4096, limit: int | None = None) -> Records:
    """Render a manifest's records for `stage`, audio spans sized from the cache."""
    out = Records()
    recs = load_records(path)
    if limit is not None:
        recs = recs[:limit]
    for k, rec in enumerate(recs):
        where = f"{path}: record {rec.get('id', k + 1)}"
        try:
            msgs = [dict(m) for m in rec["messages"]]
            audios = _audio_paths(msgs)
            counts = [cache.tokens(p) for p in audios]
            if stage == "pretrain":
                prompt, _, target = raw_prompt(msgs)
                r = chat.render_raw(prompt, tokenizer, counts, target=target)
                seqs = [Seq(r.ids, r.loss_mask, audios)]
            elif stage == "sft":
                r = chat.render(msgs, tokenizer, counts, add_generation_prompt=False, train_on=train_on)
                seqs = [Seq(r.ids, r.loss_mask, audios)]
            else:
                if "chosen" not in rec or "rejected" not in rec:
                    raise ConfigError(f"{where}: a DPO record needs 'chosen' and 'rejected'")
                seqs = []
                for key in ("chosen", "rejected"):
                    r = chat.render(msgs + [{"role": "assistant", "content": rec[key]}], tokenizer, counts,
                                    add_generation_prompt=False, train_on="last")
                    seqs.append(Seq(r.ids, r.loss_mask, audios))
        except (LalmError, KeyError) as e:
            out.skipped.append(f"{where}: {e}")
            continue
        if max(len(s.ids) for s in seqs) > max_length:
            out.skipped.append(f"{where}: over max_length={max_length}")
            continue
        out.items.append(seqs)
        out.tasks.append(rec.get("task", "?"))
    return out


def collate(seqs: list[Seq], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-padded (input_ids, attention_mask, position_ids, labels), each (B, T)."""
    B, T = len(seqs), max(len(s.ids) for s in seqs)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    att = torch.zeros((B, T), dtype=torch.bool)
    tgt = torch.zeros((B, T), dtype=torch.bool)
    for b, s in enumerate(seqs):
        n = len(s.ids)
        ids[b, T - n:] = torch.tensor(s.ids)
        att[b, T - n:] = True
        tgt[b, T - n:] = torch.tensor(s.mask)
    pos = (att.long().cumsum(1) - 1).clamp(min=0)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    labels[:, :-1] = torch.where(tgt[:, 1:], ids[:, 1:], IGNORE)  # labels[t] = target of logits at t
    return ids, att, pos, labels


def features(seqs: list[Seq], cache: FeatureCache, augment: FeatureAugment | None,
             rng: random.Random | None) -> torch.Tensor | None:
    """(sum N, d_audio) float32 encoder rows of every audio of the batch, in order of appearance."""
    rows = []
    for s in seqs:
        for p in s.audios:
            x = cache.get(p).float()
            if augment is not None and rng is not None and (augment.time_masks or augment.noise or augment.dropout):
                x = x.clone()
                for _ in range(augment.time_masks):
                    w = rng.randint(0, augment.time_mask_len)
                    if w and x.shape[0] > 2 * w:
                        start = rng.randrange(0, x.shape[0] - w)
                        x[start: start + w] = 0
                if augment.noise:
                    g = torch.Generator().manual_seed(rng.randrange(2**31))
                    x = x + augment.noise * torch.randn(x.shape, generator=g)
                if augment.dropout:
                    g = torch.Generator().manual_seed(rng.randrange(2**31))
                    keep = torch.rand(x.shape, generator=g) >= augment.dropout
                    x = x * keep / (1 - augment.dropout)
            rows.append(x)
    return torch.cat(rows) if rows else None


def hidden_states(model, ids, att, pos, feats) -> torch.Tensor:
    """The model's `hidden_states` with the encoder replaced by cached rows: (B, T, hidden)."""
    lm = model.language_model.model
    x = lm.embed_tokens(ids)
    is_audio = ids == model.config.audio_token_index
    if feats is not None:
        if int(is_audio.sum()) != feats.shape[0]:
            raise LalmError(f"{int(is_audio.sum())} <|AUDIO|> tokens but {feats.shape[0]} cached rows")
        x[is_audio] = model.multi_modal_projector(feats).to(x.dtype)
    c = model.config.text
    T = ids.shape[1]
    cos, sin = rope_cos_sin(pos, c.head_dim, c.rope_theta, x.dtype)
    cache_pos = torch.arange(T)
    mask = attention_mask_4d(att, cache_pos, T)
    for layer in lm.layers:
        x = layer(x, cos, sin, mask, None, cache_pos, T)
    return lm.norm(x)


def target_rows(model, seqs, cache, pad_id: int, augment=None, rng=None):
    """(logits at target rows (N, V), targets (N,), sequence of each row (N,))."""
    ids, att, pos, labels = collate(seqs, pad_id)
    h = hidden_states(model, ids, att, pos, features(seqs, cache, augment, rng))
    sel = labels != IGNORE
    return model.language_model.lm_head(h[sel]), labels[sel], sel.nonzero()[:, 0]


def length_batches(lengths: list[int], batch_size: int, rng: random.Random, mega: int = 16) -> list[list[int]]:
    """Shuffled batches of similar lengths (sorted within mega-batches of `mega` batches)."""
    order = list(range(len(lengths)))
    rng.shuffle(order)
    grouped = []
    span = batch_size * mega
    for i in range(0, len(order), span):
        grouped += sorted(order[i: i + span], key=lambda j: -lengths[j])
    batches = [grouped[i: i + batch_size] for i in range(0, len(grouped) - batch_size + 1, batch_size)]
    rng.shuffle(batches)
    return batches


@dataclass
class StageResult:
    final: Path
    steps: int
    seconds: float
    last: dict
    skipped: int
    eval: dict = field(default_factory=dict)


class CachedTrainer:
    """One stage (cfg.stage) on cached encoder features; the model starts from cfg.init."""

    def __init__(self, cfg: TrainConfig, cache_dir: str | Path, augment: FeatureAugment | None = None,
                 model=None, tokenizer=None, progress: bool = True):
        self.cfg = cfg.validate()
        if "encoder" not in cfg.freeze:
            raise ConfigError("freeze: cached-feature training needs the encoder frozen (freeze: [encoder])")
        if cfg.lora_r:
            raise ConfigError("lora_r: cached-feature training trains the decoder directly (set lora_r: 0)")
        if not cfg.data:
            raise ConfigError("data: no training manifest")
        torch.manual_seed(cfg.seed)
        self.tokenizer = tokenizer or build.build_tokenizer(cfg)
        self.model = model if model is not None else build.build_model(cfg, self.tokenizer)
        build.apply_trainable(self.model, cfg)
        self.pad_id = self.tokenizer.pad_id
        self.cache = FeatureCache(cache_dir, self.model.audio_tower, self.model.config.audio.num_mel_bins)
        self.augment = augment
        self.progress = progress

    def prepare(self, paths: list[str]) -> None:
        """Encode whatever audio of these manifests is not cached yet."""
        audio = [p for m in paths for p in manifest_audio(m)]
        self.cache.add(audio, progress=self.progress, desc=f"{self.cfg.stage}: encoding audio")

    def records(self, path: str, limit: int | None = None) -> Records:
        return render_records(path, self.cfg.stage, self.tokenizer, self.cache, self.cfg.train_on,
                              self.cfg.max_length, limit)

    @torch.no_grad()
    def pair_logps(self, data: Records, batch: int = 16) -> torch.Tensor:
        """(n, 2) log P(answer | prompt) of chosen and rejected for every pair."""
        self.model.eval()
        out = []
        for i in range(0, len(data), batch):
            seqs = [s for pair in data.items[i: i + batch] for s in pair]
            logits, targets, seq = target_rows(self.model, seqs, self.cache, self.pad_id)
            out.append(losses.rows_sequence_logps(logits, targets, seq, len(seqs)).view(-1, 2))
        self.model.train()
        return torch.cat(out) if out else torch.zeros(0, 2)

    @torch.no_grad()
    def eval_loss(self, data: Records, batch: int = 16) -> float:
        self.model.eval()
        total, count = 0.0, 0
        for i in range(0, len(data), batch):
            seqs = [pair[0] for pair in data.items[i: i + batch]]
            logits, targets, _ = target_rows(self.model, seqs, self.cache, self.pad_id)
            total += float(torch.nn.functional.cross_entropy(logits, targets, reduction="sum"))
            count += int(targets.numel())
        self.model.train()
        return total / max(count, 1)

    def run(self, eval_limit: int = 256) -> StageResult:
        cfg, model = self.cfg, self.model
        paths = [cfg.data] + ([cfg.eval_data] if cfg.eval_data else [])
        self.prepare(paths)
        data = self.records(cfg.data)
        if len(data) < cfg.batch_size:
            raise ConfigError(f"{cfg.data}: {len(data)} usable records, fewer than batch_size={cfg.batch_size}")
        dev = self.records(cfg.eval_data, limit=eval_limit) if cfg.eval_data else None
        dpo = cfg.stage == "dpo"
        out = Path(cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=1))
        ref = self.pair_logps(data) if dpo else None
        dev_ref = self.pair_logps(dev) if dpo and dev is not None else None
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                 {"params": rest, "weight_decay": 0.0}],
                                lr=cfg.lr, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_eps)
        rng = random.Random(cfg.seed)
        lengths = [max(len(s.ids) for s in item) for item in data.items]
        writer = MetricsWriter(out, tensorboard=False)
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, desc=cfg.stage, unit="step", disable=not self.progress,
                   dynamic_ncols=True)
        schedule: list[list[int]] = []
        t0, last, tokens = time.perf_counter(), {}, 0
        model.train()
        try:
            for step in range(cfg.max_steps):
                if not schedule:
                    schedule = length_batches(lengths, cfg.batch_size, rng)
                idx = schedule.pop()
                seqs = [s for i in idx for s in data.items[i]]
                tokens += sum(len(s.ids) for s in seqs)
                logits, targets, seq = target_rows(model, seqs, self.cache, self.pad_id, self.augment, rng)
                row = {"step": step + 1}
                if dpo:
                    logps = losses.rows_sequence_logps(logits, targets, seq, len(seqs))
                    r = ref[torch.tensor(idx)]
                    o = losses.dpo_loss(logps[0::2], logps[1::2], r[:, 0], r[:, 1], cfg.beta)
                    loss = o.losses.mean()
                    row.update(reward_margin=float(o.margins.mean()),
                               accuracy=float((o.margins > 0).float().mean()))
                else:
                    loss = losses.rows_ce_sum(logits, targets) / max(int(targets.numel()), 1)
                loss.backward()
                norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                lr = lr_at(cfg, step)
                for g in opt.param_groups:
                    g["lr"] = lr
                opt.step()
                opt.zero_grad(set_to_none=True)
                elapsed = time.perf_counter() - t0
                row.update(loss=float(loss.detach()), lr=lr, grad_norm=float(norm), tokens_per_s=tokens / elapsed,
                           seconds=round(elapsed, 2))
                done = step + 1
                if dev is not None and len(dev) and cfg.eval_every and (
                        done % cfg.eval_every == 0 or done == cfg.max_steps):
                    row.update(self.evaluate(dev, dev_ref))
                if done % cfg.log_every == 0 or done == cfg.max_steps or "eval_loss" in row:
                    writer.log(row)
                bar.set_postfix(loss=f"{row['loss']:.3f}")
                bar.update(1)
                last = row
        finally:
            bar.close()
            writer.close()
        final = self.save(out / "final")
        plot_losses(out, title=f"lalm demo: {cfg.stage}")
        seconds = time.perf_counter() - t0
        summary = {"steps": cfg.max_steps, "seconds": round(seconds, 1), "examples": len(data),
                   "skipped": len(data.skipped), "skipped_first": data.skipped[:3], "last": last}
        (out / "summary.json").write_text(json.dumps(summary, indent=1))
        return StageResult(final, cfg.max_steps, seconds, last, len(data.skipped))

    def evaluate(self, dev: Records, dev_ref: torch.Tensor | None) -> dict:
        if self.cfg.stage != "dpo":
            return {"eval_loss": self.eval_loss(dev)}
        logps = self.pair_logps(dev)
        margins = self.cfg.beta * ((logps[:, 0] - dev_ref[:, 0]) - (logps[:, 1] - dev_ref[:, 1]))
        return {"eval_reward_margin": float(margins.mean()), "eval_accuracy": float((margins > 0).float().mean()),
                "eval_prefers_chosen": float((logps[:, 0] > logps[:, 1]).float().mean())}

    def save(self, folder: Path) -> Path:
        """An HF-format folder: config.json, model.safetensors, tokenizer, generation_config.json."""
        tmp = folder.with_name(folder.name + ".tmp")
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        build.save_hf(state, self.model.config, self.tokenizer, tmp)
        write_generation_config(tmp, self.tokenizer)
        shutil.rmtree(folder, ignore_errors=True)
        tmp.rename(folder)
        return folder


def write_generation_config(folder: Path, tokenizer, max_new_tokens: int = 128) -> None:
    """Greedy decoding that stops at <|im_end|> (chat) or <|endoftext|> (raw prompts)."""
    (Path(folder) / "generation_config.json").write_text(json.dumps({
        "eos_token_id": [tokenizer.im_end_id, tokenizer.endoftext_id],
        "pad_token_id": tokenizer.endoftext_id, "do_sample": False, "max_new_tokens": max_new_tokens,
    }, indent=1) + "\n")
