"""The one training loop. A stage changes only the batch it builds and the loss it calls.

    pretrain, sft: cross-entropy over target tokens (labels != -100)
    dpo:           Eq. 2 over (chosen, rejected) pairs, reference log-probs from dpo_ref's cache

Normalisation: every micro-batch's summed loss is divided by the target count (pairs for DPO)
of the whole *global* batch, all ranks and micro-batches together, and multiplied by the world
size because data-parallel gradients are averaged over ranks. So the update does not depend on
how a global batch is split across processes or into micro-batches: 2 ranks x 4 equals 1 x 8.

Logits are computed only at target rows (`model.hidden_states` then `lm_head` on the selected
rows): with a 152k vocabulary the full (B, T, V) logits are the largest tensor of a step, and
audio/prompt rows carry no loss. `_forward_rows` is the single place that turns a Batch into
target logits.

cfg.feature_cache (encoder frozen): setup encodes every clip of data + eval_data once into that
folder (rank 0; the others wait, then read it), and the batches carry the cached encoder rows
(`Batch.audio_rows`) instead of mels, so a step starts at the projector. Only the batch source
changes; checkpoints, resume, ranks and metrics are the same.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from lalm.data.manifest import audio_paths, read_manifest
from lalm.errors import ConfigError
from lalm.processor import Batch, collate
from lalm.train import build, checkpoint, distributed, dpo_ref, losses
from lalm.train.config import TrainConfig
from lalm.train.data import TrainData, micro_batches, rank_slice, with_audio, with_stand_ins
from lalm.train.encoder_cache import FeatureCache
from lalm.train.metrics import MetricsWriter, plot_losses
from lalm.train.muon import MuonAdamW


@dataclass
class RunResult:
    out: Path
    final: Path
    steps: int
    last: dict = field(default_factory=dict)  # the last metrics row
    skipped: int = 0


def lr_at(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine to lr * min_lr_ratio at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    low = cfg.lr * cfg.min_lr_ratio
    return low + (cfg.lr - low) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def _forward_rows(model, batch: Batch):
    """Target-row logits (N, V), their targets (N,) and the sequence of each row (N,)."""
    sel = batch.labels != losses.IGNORE_INDEX  # (B, T)
    # The last decoder layer runs only from the first column holding a target (audio and prompt
    # rows before it feed the loss through their keys/values alone): same loss, less work.
    cols = sel.any(0).nonzero()
    first = int(cols[0]) if len(cols) else 0
    h = model.hidden_states(batch.input_ids, batch.position_ids, batch.attention_mask,
                            batch.mel, batch.mel_frames, audio_rows=batch.audio_rows,
                            rows_from=first)  # (B, T - first, hidden)
    sel, labels = sel[:, first:], batch.labels[:, first:]
    logits = model.language_model.lm_head(h[sel])  # (N, V)
    return logits, labels[sel], sel.nonzero()[:, 0]


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: bool = False):
        self.cfg = cfg.validate()
        if not cfg.data:
            raise ConfigError("data: no training manifest (set data: in the config or pass --data)")
        self.resume = resume
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.d = distributed.setup(cfg.device)
        self.out = Path(cfg.out)
        self.ckpt_root = self.out / "checkpoints"
        self.use_fsdp = cfg.fsdp and self.d.active
        self.bf16 = cfg.precision == "bf16" or (
            cfg.precision == "auto" and self.d.device.type == "cuda" and torch.cuda.is_bf16_supported())

    # -- setup --------------------------------------------------------------------------------------

    def setup(self) -> None:
        cfg, d = self.cfg, self.d
        self.tokenizer = build.build_tokenizer(cfg)
        model = build.build_model(cfg, self.tokenizer)
        self.model_config = model.config
        model = build.apply_trainable(model, cfg)
        features = self._feature_cache(model) if cfg.feature_cache else None
        rows_augment = {"dropout": cfg.feature_dropout, "time_masks": cfg.feature_time_masks,
                        "time_mask_len": cfg.feature_time_mask_len, "noise": cfg.feature_noise}
        rows_augment = rows_augment if (cfg.feature_dropout or cfg.feature_time_masks or cfg.feature_noise) else None
        with warnings.catch_warnings():
            if not d.main:  # one warning per run, not one per rank
                warnings.simplefilter("ignore")
            augment = {"gain_db": cfg.augment_gain_db, "speed": cfg.augment_speed,
                       "noise_snr_db": cfg.augment_noise_snr_db}
            augment = augment if (cfg.augment_gain_db or cfg.augment_speed
                                  or cfg.augment_noise_snr_db is not None) else None
            n_mels = model.config.audio.num_mel_bins
            self.data = TrainData(cfg.data, cfg.stage, self.tokenizer, n_mels, train_on=cfg.train_on,
                                  max_length=cfg.max_length, augment=augment, seed=cfg.seed,
                                  features=features, feature_augment=rows_augment)
            self.eval_data = (TrainData(cfg.eval_data, cfg.stage, self.tokenizer, n_mels, train_on=cfg.train_on,
                                        max_length=cfg.max_length, seed=cfg.seed, features=features)
                              if cfg.eval_data else None)
            if self.eval_data is not None and len(self.eval_data) == 0:
                warnings.warn(f"{cfg.eval_data}: no usable records; the run is not evaluated", stacklevel=2)
                self.eval_data = None  # no eval rows rather than scores of nothing
        if cfg.batch_size % d.world:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {d.world} ranks")
        self.batches_per_epoch = self.data.batches_per_epoch(cfg.batch_size)
        if self.batches_per_epoch == 0:
            raise ConfigError(f"{cfg.data}: {len(self.data)} usable records, fewer than batch_size={cfg.batch_size}")

        self.start_step, self.resumed_from = 0, None
        if self.resume:
            found = checkpoint.newest_checkpoint(self.ckpt_root)
            distributed.barrier(d)  # everyone has chosen before rank 0 removes torn folders
            if d.main:
                checkpoint.clean_partial(self.ckpt_root)
            if found is not None:
                self._load_weights(model, found)
                self.resumed_from = found
        if self.use_fsdp:
            from torch.distributed.fsdp import register_fsdp_forward_method

            distributed.apply_fsdp(model, d.device)  # moves each rank's shards to its device: no full copy there
            register_fsdp_forward_method(model, "hidden_states")  # the loop calls it, not forward()
        else:
            model.to(d.device)
        self.model = model
        self.names = {id(p): n for n, p in model.named_parameters()}
        params = [p for p in model.parameters() if p.requires_grad]
        decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and norm scales
        rest = [p for p in params if p.dim() < 2]
        self.params = params
        self.optimizer = self._optimizer(model, decay, rest)
        if self.resumed_from is not None:
            self._load_trainer_state(self.resumed_from)
        if cfg.stage == "dpo":
            self.ref = self._reference("train", self.data)
            self.eval_ref = self._reference("eval", self.eval_data) if self.eval_data else None

    def _optimizer(self, model, decay: list, rest: list) -> torch.optim.Optimizer:
        cfg = self.cfg
        betas = (cfg.adam_beta1, cfg.adam_beta2)
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(
                [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                lr=cfg.lr, betas=betas, eps=cfg.adam_eps)
        # Muon for the decoder layers' matrices (attention and MLP projections); the embeddings,
        # LM head and projector are not hidden-layer matrices and stay on AdamW (Jordan et al.).
        hidden = {id(p) for p in model.language_model.model.layers.parameters() if p.dim() == 2}
        groups = [{"params": [p for p in decay if id(p) in hidden], "muon": True, "weight_decay": cfg.weight_decay},
                  {"params": [p for p in decay if id(p) not in hidden], "weight_decay": cfg.weight_decay},
                  {"params": rest, "weight_decay": 0.0}]
        return MuonAdamW([g for g in groups if g["params"]], lr=cfg.lr, lr_ratio=cfg.muon_lr_ratio, betas=betas,
                         eps=cfg.adam_eps)

    def _feature_cache(self, model) -> FeatureCache:
        """The frozen encoder's rows for every clip of data + eval_data, encoding the missing ones
        once (rank 0, on its training device; the other ranks wait, then read the folder)."""
        cfg, d = self.cfg, self.d
        n_mels = model.config.audio.num_mel_bins
        if d.main:
            # The model is still on the CPU here. On a GPU run the encoder goes to the GPU for the
            # encoding: Qwen2-Audio's Whisper-large-v3 encoder (~635M parameters) takes seconds per
            # clip on a CPU. It goes back afterwards, where setup() expects the whole model.
            tower = model.audio_tower
            home = next(tower.parameters()).device
            tower.to(d.device)
            try:
                cache = FeatureCache(cfg.feature_cache, tower, n_mels)
                paths = [p for m in (cfg.data, cfg.eval_data) if m
                         for rec in read_manifest(m, warn=False) for p in audio_paths(rec)]
                cache.add(paths, progress=cfg.progress, desc=f"{cfg.stage}: encoding audio")
            finally:
                tower.to(home)
        distributed.barrier(d)
        if not d.main:
            cache = FeatureCache(cfg.feature_cache, model.audio_tower, n_mels)
        return cache

    def _load_weights(self, model, folder: Path) -> None:
        if self.cfg.lora_r:  # frozen base = the init; the trained tensors are in the trainer state
            build.load_trainable_state(model, checkpoint.read_tensors(folder, "params.safetensors"), str(folder))
        else:
            build.load_hf_state(model, folder)

    def _load_trainer_state(self, folder: Path) -> None:
        state = checkpoint.read_trainer_state(folder)
        saved = state.get("config", {}).get("optimizer", "adamw")
        if saved != self.cfg.optimizer:  # the slots differ: Muon keeps a momentum, AdamW two moments
            raise ConfigError(f"{folder}: trained with optimizer {saved}; resume it with optimizer: {saved} "
                              f"(this run has {self.cfg.optimizer})")
        self.start_step = int(state["step"])
        # What decides which records each remaining step sees: changed, the run goes on but no
        # longer replays the uninterrupted one (what --resume otherwise guarantees); say so.
        before = state.get("config", {})
        changed = [f"{k}={getattr(self.cfg, k)!r} (was {before[k]!r})"
                   for k in ("data", "batch_size", "seed", "length_grouping", "max_length")
                   if k in before and before[k] != getattr(self.cfg, k)]
        if changed and self.d.main:
            warnings.warn(f"{folder}: resuming with {', '.join(changed)}: the remaining steps do not "
                          "replay the uninterrupted run", stacklevel=2)
        checkpoint.load_optimizer_tensors(self.optimizer, checkpoint.read_tensors(folder, "optimizer.safetensors"),
                                          self.names, str(folder), frozenset(state.get("stateless_params", ())))
        rng = folder / "trainer" / f"rng-rank{self.d.rank}.safetensors"
        if rng.is_file():  # absent when resuming with more ranks than were saved
            checkpoint.restore_rng(checkpoint.read_tensors(folder, rng.name))

    # -- DPO reference ----------------------------------------------------------------------------

    def _reference(self, name: str, data: TrainData) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.cfg
        key = dpo_ref.fingerprint(data.path, len(data), {
            "init": cfg.init, "model": cfg.model, "encoder_init": cfg.encoder_init,
            "decoder_init": cfg.decoder_init, "seed": cfg.seed, "lora_r": cfg.lora_r})
        path = dpo_ref.cache_path(self.out, name)
        if self.resumed_from is not None:
            return dpo_ref.load(path, key)
        self.model.eval()
        with torch.no_grad():
            chosen, rejected = dpo_ref.compute(
                lambda idx: self._pair_logps(data, idx), len(data), self.d.rank, self.d.world,
                max(1, cfg.micro_batch_size or cfg.batch_size // self.d.world),
                lambda t: distributed.all_sum_tensor(self.d, t))
        self.model.train()
        if self.d.main:
            dpo_ref.save(path, chosen, rejected, key)
        distributed.barrier(self.d)
        return chosen, rejected

    def _pair_logps(self, data: TrainData, indices: list[int], epoch: int = 0) -> torch.Tensor:
        """log P(answer | prompt) for [chosen_0, rejected_0, chosen_1, ...] of the given records;
        NaN for a padding index (-1) or a record that cannot be read (so its reference is NaN)."""
        got, ok = self._load(data, indices, epoch)
        examples = [e for ex in got for e in ex]
        batch = collate(examples, self.tokenizer.pad_id).to(self.d.device)
        with self._autocast():
            logits, targets, seq = _forward_rows(self.model, batch)
        logps = losses.rows_sequence_logps(logits, targets, seq, len(examples))
        logps = torch.where(torch.tensor(ok, device=logps.device).repeat_interleave(2), logps, math.nan)
        return logps[: 2 * len(indices)]

    def _load(self, data: TrainData, indices: list[int], epoch: int = 0):
        """with_stand_ins; under FSDP also with_audio (a forward gathers the shards of the modules
        it runs, so every rank must run the same ones). (examples of each, ok) as with_stand_ins."""
        got, ok = with_stand_ins(data, indices, epoch)
        return with_audio(data, got, ok) if self.use_fsdp else (got, ok)

    def _autocast(self):
        if self.bf16:
            return torch.autocast(device_type=self.d.device.type, dtype=torch.bfloat16)
        return nullcontext()

    # -- one step -------------------------------------------------------------------------------

    def train_step(self, step: int) -> dict:
        cfg, d = self.cfg, self.d
        epoch, b = divmod(step, self.batches_per_epoch)
        if getattr(self, "_epoch", None) != epoch:
            self._epoch, self._batches = epoch, self.data.epoch_batches(epoch, cfg.batch_size, cfg.length_grouping)
        indices = rank_slice(self._batches[b], d.rank, d.world)
        # (index, examples, ok): a record that fails to load runs as a stand-in with no loss (ok False)
        mine = list(zip(indices, *with_stand_ins(self.data, indices, epoch)))
        micro = micro_batches(mine, cfg.micro_batch_size)
        dpo = cfg.stage == "dpo"
        # Denominator of the global-batch mean: target tokens (CE) or pairs (DPO), over all ranks.
        local = sum(ok for *_, ok in mine) if dpo else sum(
            int(e.loss_mask[1:].sum()) for _, ex, ok in mine if ok for e in ex)
        tokens_local = sum(len(e) for _, ex, ok in mine if ok for e in ex)
        audio_local = sum(e.audio_tokens > 0 for _, ex, _ in mine for e in ex)
        denom, tokens, audio = distributed.all_sum(d, [local, tokens_local, audio_local])
        # When any rank runs the encoder, every micro-batch of every rank must (see data.with_audio).
        spare = self.data.audio_stand_in() if d.active and audio else None
        scale = d.world / max(denom, 1.0)
        sums = {"loss": 0.0, "margin": 0.0, "acc": 0.0, "chosen": 0.0, "rejected": 0.0}
        for k, part in enumerate(micro):
            if self.use_fsdp:  # reduce-scatter gradients once per step, not once per micro-batch
                self.model.set_requires_gradient_sync(k == len(micro) - 1)
            if spare is not None and not any(e.audio_tokens for _, ex, _ in part for e in ex):
                part = part + [(*spare, False)]
            examples = [e for _, ex, _ in part for e in ex]
            batch = collate(examples, self.tokenizer.pad_id).to(d.device)
            with self._autocast():
                logits, targets, seq = _forward_rows(self.model, batch)
            keep = torch.tensor([ok for _, ex, ok in part for _ in ex], device=logits.device)  # per sequence
            if dpo:
                logps = losses.rows_sequence_logps(logits, targets, seq, len(examples))
                idx = torch.tensor([i for i, _, _ in part])
                n_tokens = torch.bincount(seq, minlength=len(examples))  # (2P,) target tokens per sequence
                keep = keep[0::2]
                # A stand-in's reference is NaN: zeroed, or 0 x NaN would reach the gradients.
                ref = [torch.where(keep, r[idx].to(logps), 0.0) for r in self.ref]
                out = losses.dpo_loss(logps[0::2], logps[1::2], ref[0], ref[1], cfg.beta, cfg.rpo_alpha,
                                      n_tokens[0::2])
                total = out.losses[keep].sum()
                sums["margin"] += float(out.margins[keep].sum())
                sums["acc"] += float((out.margins[keep] > 0).sum())
                sums["chosen"] += float(out.chosen_rewards[keep].sum())
                sums["rejected"] += float(out.rejected_rewards[keep].sum())
            elif bool(keep.all()):  # the usual case: no copy of the logits
                total = losses.rows_ce_sum(logits, targets)
            else:  # stand-ins (records that failed to load) contribute no loss
                rows = keep[seq]
                total = losses.rows_ce_sum(logits[rows], targets[rows])
            (total * scale).backward()
            sums["loss"] += float(total.detach())
        if not self.use_fsdp:
            distributed.average_gradients(d, self.params)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = lr_at(cfg, step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        if denom:  # a batch of records that all failed to load holds no data: no update
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = list(sums)
        totals = dict(zip(keys, distributed.all_sum(d, [sums[k] for k in keys])))
        n = max(denom, 1.0)  # 0 when every record of the batch failed to load
        row = {"step": step + 1, "loss": totals["loss"] / n, "lr": lr,
               "grad_norm": float(grad_norm), "tokens": int(tokens), "epoch": epoch}
        if dpo:
            row.update(reward_margin=totals["margin"] / n, accuracy=totals["acc"] / n,
                       chosen_reward=totals["chosen"] / n, rejected_reward=totals["rejected"] / n)
        return row

    # -- evaluation ------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, data: TrainData, ref: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict:
        """Held-out loss (pretrain/SFT), or for DPO: reward accuracy and margin, and the share of pairs
        whose chosen answer is the more likely one (`eval_prefers_chosen`, reference-free)."""
        d, cfg = self.d, self.cfg
        n = len(data)
        per_rank = -(-n // d.world)
        mine = list(range(d.rank, n, d.world))
        mine += [-1] * (per_rank - len(mine))  # -1: padding so every rank runs as many forwards
        micro = max(1, cfg.micro_batch_size or cfg.batch_size // d.world)
        self.model.eval()
        s = [0.0, 0.0, 0.0, 0.0]  # loss sum (or margin sum), count, accuracy count, prefers-chosen count
        for start in range(0, per_rank, micro):
            idx = mine[start: start + micro]
            if cfg.stage == "dpo":
                logps = self._pair_logps(data, idx)
                for j, i in enumerate(idx):
                    margin = cfg.beta * float((logps[2 * j] - ref[0][i]) - (logps[2 * j + 1] - ref[1][i]))
                    if math.isnan(margin):  # padding, or a record that cannot be read
                        continue
                    s[0] += margin
                    s[1] += 1
                    s[2] += margin > 0
                    s[3] += bool(logps[2 * j] > logps[2 * j + 1])
            else:
                got, ok = self._load(data, idx)  # padding (-1), unreadable records, stand-ins: ok False
                batch = collate([ex[0] for ex in got], self.tokenizer.pad_id).to(d.device)
                with self._autocast():
                    logits, targets, seq = _forward_rows(self.model, batch)
                ce = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
                keep = torch.tensor(ok, device=ce.device)[seq]
                s[0] += float(ce[keep].sum())
                s[1] += float(keep.sum())
        self.model.train()
        total, count, acc, prefers = distributed.all_sum(d, s)
        if cfg.stage == "dpo":
            return {"eval_reward_margin": total / max(count, 1), "eval_accuracy": acc / max(count, 1),
                    "eval_prefers_chosen": prefers / max(count, 1)}
        return {"eval_loss": total / max(count, 1)}

    # -- saving ----------------------------------------------------------------------------------

    def _gather(self, trainer_state: bool = True):
        """(HF tensors, optimizer tensors, LoRA trainable tensors) whole, on rank 0."""
        d = self.d
        state = distributed.full_tensors(d, self.model.state_dict().items())
        optim = params = None
        if trainer_state:
            optim = distributed.full_tensors(d, checkpoint.optimizer_items(self.optimizer, self.names))
            if self.cfg.lora_r:
                params = distributed.full_tensors(
                    d, ((n, p) for n, p in self.model.named_parameters() if p.requires_grad))
        hf = build.export_state(state, build.lora_scaling(self.cfg)) if d.main else None
        return hf, optim, params

    def save_checkpoint(self, step: int) -> None:
        d = self.d
        hf, optim, params = self._gather()
        tmp = self.ckpt_root / f".tmp-step-{step:06d}"
        if d.main:
            tmp = checkpoint.begin(self.ckpt_root, step)
            build.save_hf(hf, self.model_config, self.tokenizer, tmp)
            checkpoint.maybe_inject_kill(step)
            state = {"step": step, "epoch": step // self.batches_per_epoch,
                     "batch_in_epoch": step % self.batches_per_epoch, "world": d.world,
                     "config": self.cfg.to_dict(),
                     "stateless_params": checkpoint.stateless_parameters(self.optimizer, self.names)}
            checkpoint.write_trainer_state(tmp, state, optim, params)
        distributed.barrier(d)
        checkpoint.write_rng(tmp, d.rank)
        distributed.barrier(d)
        if d.main:
            checkpoint.commit(self.ckpt_root, tmp, step, self.cfg.keep_checkpoints)
        distributed.barrier(d)

    def save_final(self) -> Path:
        hf, _, _ = self._gather(trainer_state=False)
        final = self.out / "final"
        if self.d.main:
            tmp = self.out / ".tmp-final"
            shutil.rmtree(tmp, ignore_errors=True)
            build.save_hf(hf, self.model_config, self.tokenizer, tmp)
            checkpoint.publish(tmp, final)
        distributed.barrier(self.d)
        return final

    # -- the loop --------------------------------------------------------------------------------

    def run(self) -> RunResult:
        cfg, d = self.cfg, self.d
        self.setup()
        writer = None
        if d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            writer = MetricsWriter(self.out, resume_step=self.start_step)
        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=self.start_step, disable=not (d.main and cfg.progress),
                   desc=f"{cfg.stage}", unit="step", dynamic_ncols=True)
        last, t0, seen = {}, time.perf_counter(), 0
        try:
            if self.eval_data is not None and cfg.eval_every and self.start_step == 0:
                row = {"step": 0, **self.evaluate(self.eval_data, getattr(self, "eval_ref", None))}
                if writer:
                    writer.log(row)  # the starting point of the eval curves
            for step in range(self.start_step, cfg.max_steps):
                row = self.train_step(step)
                seen += row["tokens"]
                elapsed = time.perf_counter() - t0
                row["tokens_per_s"] = seen / max(elapsed, 1e-9)
                done = step + 1
                evaluated = bool(self.eval_data is not None and cfg.eval_every
                                 and (done % cfg.eval_every == 0 or done == cfg.max_steps))
                if evaluated:
                    row.update(self.evaluate(self.eval_data, getattr(self, "eval_ref", None)))
                if writer and (done % cfg.log_every == 0 or done == cfg.max_steps or evaluated):
                    writer.log(row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", tok_s=f"{row['tokens_per_s']:.0f}")
                bar.update(1)
                last = row
                if cfg.save_every and (done % cfg.save_every == 0 or done == cfg.max_steps):
                    self.save_checkpoint(done)
            final = self.save_final()
        finally:
            bar.close()
            if writer:
                writer.close()
        skipped = self._skipped_on_any_rank(self.data)
        skipped_eval = self._skipped_on_any_rank(self.eval_data) if self.eval_data else 0
        if d.main:
            plot_losses(self.out, title=f"lalm train --stage {cfg.stage}")
            first = self.data.skipped.items[0][1] if self.data.skipped else None
            summary = {"steps": cfg.max_steps, "final": str(final), "skipped_records": skipped,
                       "skipped_first": first, "last": last, "skipped_eval_records": skipped_eval}
            (self.out / "summary.json").write_text(json.dumps(summary, indent=1))
            if skipped:
                warnings.warn(f"{cfg.data}: skipped {skipped} record(s)" + (f"; first: {first}" if first else ""),
                              stacklevel=2)
        return RunResult(self.out, final, cfg.max_steps, last, skipped)

    def _skipped_on_any_rank(self, data: TrainData) -> int:
        """Records skipped by the run as a whole. Those the manifest check dropped are the same on
        every rank; a record that fails only when decoded is met by whichever rank its batch slice
        falls to (another one each epoch), so the count is the union of every rank's failures."""
        failed = torch.zeros(len(data), dtype=torch.float32)
        failed[sorted(data.failed)] = 1.0
        failed = distributed.all_sum_tensor(self.d, failed)
        return len(data.skipped) - len(data.failed) + int((failed > 0).sum())

    def close(self) -> None:
        distributed.teardown(self.d)


def train(cfg: TrainConfig, resume: bool = False) -> RunResult:
    trainer = Trainer(cfg, resume)
    try:
        return trainer.run()
    finally:
        trainer.close()
