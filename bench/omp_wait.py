"""OpenMP's wait policy for `lalm train` on a small CPU: spinning (ACTIVE, or the default's bounded
spin) vs sleeping (PASSIVE) waits.

    .venv/bin/python bench/omp_wait.py --home $LALM_HOME [--steps 200 --trials 2]

Runs `lalm train --stage sft` from a finished demo's SFT config (its data, tokenizer and cached
encoder rows; the run writes to a temporary folder) for --steps steps under each policy, alone and
beside one busy process (a Python spin loop standing in for anything else on the machine), with
the torch threads the CLI picks (all cores). Alternates the policies per trial; prints the wall
clock of each whole run (setup included) and the loop's tokens/s per condition. "default" runs
with OMP_WAIT_POLICY unset (libgomp spins a while, then sleeps), which is what `lalm train` gets
and what `lalm demo` keeps on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LALM = str(Path(sys.executable).with_name("lalm"))
POLICIES = ("ACTIVE", "default", "PASSIVE")


def one_run(home: Path, steps: int, policy: str, busy: bool) -> float:
    """tokens/s of the run (the loop's running figure at its last logged step)."""
    spin = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        with tempfile.TemporaryDirectory() as out:
            env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
            if policy != "default":
                env["OMP_WAIT_POLICY"] = policy
            cmd = [LALM, "train", "--stage", "sft", "--config", str(home / "demo/runs/sft/config.yaml"),
                   "--max-steps", str(steps), "--out", out, "--progress=false"]
            subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    finally:
        if spin:
            spin.kill()
    return [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--home", required=True, type=Path, help="LALM_HOME of a finished `lalm demo`")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--trials", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {}
    for trial in range(args.trials):
        for busy in (False, True):
            order = POLICIES if trial % 2 == 0 else POLICIES[::-1]
            for policy in order:
                t = time.perf_counter()
                tps = one_run(args.home, args.steps, policy, busy)
                key = f"{policy:<7} {'+ 1 busy process' if busy else 'alone'}"
                results.setdefault(key, []).append((tps, time.perf_counter() - t))
                print(f"trial {trial} {key}: {tps:,.0f} tokens/s, run {time.perf_counter() - t:.0f} s", flush=True)
    print(f"\n{args.steps} SFT steps, {os.cpu_count()} CPUs; mean over {args.trials} trials")
    print("| condition | tokens/s | whole run (s) |\n|---|---|---|")
    for key, vals in results.items():
        print(f"| {key} | {sum(v[0] for v in vals) / len(vals):,.0f} | {sum(v[1] for v in vals) / len(vals):.0f} |")


if __name__ == "__main__":
    main()
