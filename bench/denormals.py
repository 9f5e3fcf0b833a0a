"""What denormal floats cost a fit, and what flushing them (ciess_prod/runtime.py) gives back.

Trains one plan (frequency sizes at a budget: the plan whose retraining slowed 4x mid-fit on MovieLens-1M) the way
the final protocol's fits do (the config's recipe at ``--l2``), once keeping denormals and once flushing them, each
in a fresh process: the setting is process-wide and reaches torch's threads only when set before they exist. Both
fits draw the same batches; the seconds of every chunk of ``--chunk`` batches say when the slowdown starts.

Appends one JSON line per mode to bench/results/denormals.jsonl (append-only).

    python bench/denormals.py [--config configs/ml1m-search-full-probe.yaml] [--batches 2000] [--l2 1e-4]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from ciess_prod.cli import non_negative_float, positive_int  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "denormals.jsonl"
MODES = ("keep", "flush")


def time_fit(config_path: Path, sparsity: float, l2: float, batches: int, chunk: int) -> dict:
    """Seconds of each ``chunk`` batches of a fit of the frequency plan at ``sparsity`` (this process's setting)
    and torch's thread count."""
    import torch

    from ciess_prod.config import load_yaml
    from ciess_prod.data import BPRSampler, load_dataset
    from ciess_prod.models import SIDES, build_model
    from ciess_prod.search.baselines import frequency_sizes
    from ciess_prod.search.config import SearchExperimentConfig
    from ciess_prod.train.trainer import train_step

    config = load_yaml(SearchExperimentConfig, config_path)
    recipe = dataclasses.replace(config.train, l2=l2)
    dataset = load_dataset(config.data, ROOT)
    sizes = frequency_sizes({"user": dataset.user_popularity(), "item": dataset.item_popularity()},
                            config.model.d_max, sparsity)
    torch.manual_seed(recipe.seed)
    model = build_model(config.model, dataset.n_users, dataset.n_items, dataset.train)
    for side in SIDES:
        model.set_row_sizes(side, sizes[side])
    sampler = BPRSampler(dataset.train, batch_size=recipe.batch_size, seed=recipe.seed, mode=recipe.sampling)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    model.train()
    seconds, start = [], time.perf_counter()
    for step in range(batches):
        train_step(model, sampler.next_batch(), optimizer, recipe, step)
        if (step + 1) % chunk == 0 or step + 1 == batches:
            seconds.append(time.perf_counter() - start)
            start = time.perf_counter()
    return {"seconds": seconds, "threads": torch.get_num_threads()}


def run_child(args: argparse.Namespace, mode: str) -> dict:
    """One mode's fit in a fresh interpreter: ``time_fit``'s answer."""
    command = [sys.executable, __file__, "--child", mode, "--config", str(args.config), "--sparsity",
               str(args.sparsity), "--l2", str(args.l2), "--batches", str(args.batches), "--chunk", str(args.chunk)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"the {mode} fit failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-search-full-probe.yaml")
    parser.add_argument("--sparsity", type=float, default=0.8, help="the frequency plan's budget")
    parser.add_argument("--l2", type=non_negative_float, default=1e-4, help="the fit's L2 weight")
    parser.add_argument("--batches", type=positive_int, default=2000)
    parser.add_argument("--chunk", type=positive_int, default=250, help="batches per timed chunk")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # one mode's fit, in this process
    args = parser.parse_args(argv)
    if args.child is not None:
        flushed = False
        if args.child == "flush":
            from ciess_prod.runtime import configure_cpu

            flushed = configure_cpu()  # False where the CPU cannot flush: the row says so
        fit = time_fit(args.config, args.sparsity, args.l2, args.batches, args.chunk)
        print(json.dumps({**fit, "flushed": flushed}))
        return 0

    sha = git_sha()
    fits = {mode: run_child(args, mode) for mode in MODES}
    seconds = {mode: fit["seconds"] for mode, fit in fits.items()}
    print(f"| denormals | total s | first {args.chunk} batches s | slowest {args.chunk} s | x flush total |")
    print("|---|---|---|---|---|")
    for mode in MODES:
        chunks = seconds[mode]
        ratio = sum(chunks) / sum(seconds["flush"])
        append_jsonl(args.results, {
            "config": args.config.name, "plan": "freq", "target_sparsity": args.sparsity, "l2": args.l2,
            "denormals": mode, "batches": args.batches, "chunk": args.chunk,
            "chunk_seconds": [round(s, 4) for s in chunks], "total_seconds": round(sum(chunks), 3),
            "vs_flush": round(ratio, 3), "flushed": fits[mode]["flushed"], "threads": fits[mode]["threads"],
            "load_avg_1m": round(os.getloadavg()[0], 2), "git_sha": sha,
        })
        print(f"| {mode} | {sum(chunks):.1f} | {chunks[0]:.1f} | {max(chunks):.1f} | {ratio:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
