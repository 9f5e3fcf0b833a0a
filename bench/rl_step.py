"""Times the RL part of ONE search step of CIESS at 10^4 .. 10^7 rows (one side: users or items).

Phases, each timed with time.perf_counter (a warm-up step at the smallest size runs first in every child):

    states   random states [N, 3], rewards [N] and next states [N, 3] (stand-ins for the environment)
    act      actor sizes, TD3Agent.act (default chunks: 2^12 rows on CPU)
    perturb  per-row gaussian noise + rounding, Explorer.perturb
    walk     5-step random walk, Explorer.walk -> [N, 6] candidates
    score    critic Q1 of the 6 candidates per row, TD3Agent.q_values on chunks of 2^18 rows (inside: 2^12
             (row, candidate) pairs per forward pass on CPU) + per-row argmax
    buffer   ReplayBuffer.add into a 512 MiB buffer, subsampled to max_rows = min(N, 10^6)
    update   one TD3 update (minibatch 4096)

Every size runs in a fresh child process (``--single N``) so that sizes do not contaminate each other's peak RSS
(``resource.getrusage(RUSAGE_SELF).ru_maxrss`` of the child). One JSON object per size is appended to
bench/results/rl_step.jsonl with keys rows, seconds (sum of the phases), phases, peak_rss_mb, torch_threads, git_sha,
timestamp, plus load_avg_1m (the 1-minute load average around the run: timings on a shared machine are only
comparable at similar load).

Memory at 10^7 rows, by design (float32 = 4 B, int64 = 8 B per value):
    states + next states [N, 3] f32     2 x 120 MB     rewards [N] f32                 40 MB
    actor sizes, noisy sizes [N] f32    2 x  40 MB     rounded start [N] i64           80 MB
    walk candidates [N, 6] i64             480 MB      one step's uniforms [N] f32     40 MB
    chosen sizes [N] i64 (+ f32 copy)   80 + 40 MB     buffer-add randperm [N] i64     80 MB
    buffer rows written (10^6 x 36 B)       36 MB      (the 512 MiB ring is allocated lazily by the OS)
    chunked temporaries: score chunk of 2^18 rows (candidates, Q) ~20 MB; one actor/critic pass of 2^12 rows
    or pairs x 256 hidden x f32 x ~3 live activations ~12 MB; walk chunk of 2^18 rows ~10 MB
    => ~1.3 GB of tensors + ~0.5 GB interpreter/torch baseline: about 2 GB peak RSS, linear in N (~0.13 KB/row).
Compute at 10^7 rows is dominated by the critic scoring: 6 x 10^7 pairs x ~1.3 x 10^5 FLOP = 8 x 10^12 FLOP.

    python bench/rl_step.py                       # 10^4, 10^5, 10^6, 10^7
    python bench/rl_step.py --rows 10000 100000 1000000 --threads 1
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.agent import STATE_DIM, TD3Agent, TD3Config  # noqa: E402
from ciess_prod.search.buffer import ReplayBuffer  # noqa: E402
from ciess_prod.search.exploration import ExplorationConfig, Explorer  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "rl_step.jsonl"
D_MAX = 128
BUFFER_BYTES = 512 << 20  # replay buffer bound
MAX_BUFFER_ROWS = 1_000_000  # rows written per step at most (subsampled above)
SCORE_CHUNK_ROWS = 1 << 18  # rows per q_values call in the scoring phase


def git_sha() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def rl_step(n: int, seed: int = 0) -> dict[str, float]:
    """One step's RL part for n rows; returns wall seconds per phase (objects are built outside the timing)."""
    agent = TD3Agent(TD3Config(), D_MAX, seed=seed)
    explorer = Explorer(ExplorationConfig(), D_MAX, n_rows=n, seed=seed + 1)
    buffer = ReplayBuffer(BUFFER_BYTES, state_dim=STATE_DIM, seed=seed + 2)
    g = torch.Generator().manual_seed(seed + 3)
    phases: dict[str, float] = {}

    t = time.perf_counter()
    states = torch.rand(n, STATE_DIM, generator=g).mul_(2).sub_(1)  # [N, 3] in [-1, 1]
    rewards = torch.rand(n, generator=g)  # [N]
    next_states = torch.rand(n, STATE_DIM, generator=g).mul_(2).sub_(1)  # [N, 3]
    phases["states"] = time.perf_counter() - t

    t = time.perf_counter()
    actor_sizes = agent.act(states)  # [N] f32
    phases["act"] = time.perf_counter() - t

    t = time.perf_counter()
    start = explorer.perturb(actor_sizes).round_().to(torch.int64)  # [N] i64
    phases["perturb"] = time.perf_counter() - t

    t = time.perf_counter()
    candidates = explorer.walk(start)  # [N, 6] i64
    phases["walk"] = time.perf_counter() - t

    t = time.perf_counter()
    chosen = torch.empty(n, dtype=torch.int64)
    for lo in range(0, n, SCORE_CHUNK_ROWS):
        cand = candidates[lo : lo + SCORE_CHUNK_ROWS]  # [n_c, 6]
        q = agent.q_values(states[lo : lo + SCORE_CHUNK_ROWS], cand.to(torch.float32))  # [n_c, 6]
        chosen[lo : lo + SCORE_CHUNK_ROWS] = cand.gather(1, q.argmax(1, keepdim=True)).squeeze(1)
    phases["score"] = time.perf_counter() - t
    del candidates

    t = time.perf_counter()
    buffer.add(states, chosen.to(torch.float32), rewards, next_states, False, max_rows=min(n, MAX_BUFFER_ROWS))
    phases["buffer"] = time.perf_counter() - t

    t = time.perf_counter()
    losses = agent.update(buffer)
    phases["update"] = time.perf_counter() - t
    if not losses:
        raise RuntimeError(f"no TD3 update ran: {len(buffer)} transitions < batch {agent.config.batch_size}")
    return phases


def single(n: int, warmup_rows: int, threads: int | None) -> dict:
    """Child process body: warm-up at warmup_rows, then the timed step at n rows."""
    if threads is not None:
        torch.set_num_threads(threads)
    load_before = os.getloadavg()[0]
    rl_step(max(warmup_rows, TD3Config().batch_size), seed=100)
    phases = rl_step(n)
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {
        "rows": n,
        "seconds": sum(phases.values()),
        "phases": phases,
        "peak_rss_mb": round(peak_kb / 1024, 1),
        "torch_threads": torch.get_num_threads(),
        "load_avg_1m": round(max(load_before, os.getloadavg()[0]), 2),  # other work on the machine skews timings
    }


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", nargs="+", type=int, default=[10**4, 10**5, 10**6, 10**7])
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--single", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--warmup-rows", type=int, default=10**4, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.single is not None:  # child: one size, result as the last stdout line
        print(json.dumps(single(args.single, args.warmup_rows, args.threads)), flush=True)
        return 0

    sha = git_sha()
    warmup = min(args.rows)
    print(f"{'rows':>10} {'seconds':>9} {'s / 1e6 rows':>13} {'peak RSS MB':>12}  phases (s)")
    for n in args.rows:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--single", str(n), "--warmup-rows", str(warmup)]
        if args.threads is not None:
            cmd += ["--threads", str(args.threads)]
        child = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if child.returncode != 0:
            sys.stderr.write(child.stderr)
            print(f"{n:>10} FAILED (exit {child.returncode})")
            return 1
        record = json.loads(child.stdout.strip().splitlines()[-1])
        record["git_sha"] = sha
        record["timestamp"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        append_jsonl(args.results, record)
        phases = " ".join(f"{k}={v:.3f}" for k, v in record["phases"].items())
        per_million = record["seconds"] / n * 1e6
        print(f"{n:>10} {record['seconds']:>9.3f} {per_million:>13.3f} {record['peak_rss_mb']:>12.1f}  {phases}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
