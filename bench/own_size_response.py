"""What a row's own embedding size does to its own quality, under either environment protocol.

Draws configurations in which every row's size is uniform in 1..d_max (seeded, independent of everything else),
trains at each under the chosen protocol (`warm`: fine-tune the full-size reference for `--batches`; `paper`:
train from scratch for `--batches` with the recipe's schedule, as the paper's environment does) and buckets every
row's q (its eval over the reference's, capped at 1) and raw eval by its own size. Since the sizes are random,
a bucket's mean shows what a row's own size is worth, unlike the search's replay buffers, where the actor chose
sizes from the rows' states. Appends one JSON line per side to bench/results/own_size.jsonl.

    OMP_NUM_THREADS=1 python bench/own_size_response.py --protocol paper --batches 2000 --draws 1
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.ml1m_baselines import git_sha  # noqa: E402
from bench.search_diagnosis import size_response  # noqa: E402
from ciess_prod.cli import positive_int  # noqa: E402
from ciess_prod.config import load_yaml  # noqa: E402
from ciess_prod.experiment import load_dataset  # noqa: E402
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.models import SIDES  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig  # noqa: E402
from ciess_prod.search.environment import SizeEnvironment  # noqa: E402
from ciess_prod.search.search import train_reference  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "own_size.jsonl"


def side_response(sizes: torch.Tensor, q: torch.Tensor, raw: torch.Tensor, popularity: torch.Tensor,
                  d_max: int) -> dict:
    """q and raw eval by own size over all draws: sizes, q, raw, popularity [draws * rows]."""
    return {"rows": len(sizes), **size_response(sizes, q, popularity, d_max, raw=raw)}


def measure(config: SearchExperimentConfig, draws: int, seed: int, base_dir: Path) -> list[dict]:
    """One record per side; ``config.search.environment`` says the protocol, batches and eval(item)."""
    dataset = load_dataset(config.data, base_dir)
    reference_dir = base_dir / (config.reference_dir or str(Path(config.output_dir) / "reference"))
    reference = train_reference(config, dataset, reference_dir)
    env = SizeEnvironment(dataset, config.model, config.train, config.search.environment, reference)
    d_max = config.model.d_max
    n_rows = {"user": dataset.n_users, "item": dataset.n_items}
    popularity = {"user": torch.from_numpy(dataset.user_popularity()),
                  "item": torch.from_numpy(dataset.item_popularity())}
    generator = torch.Generator().manual_seed(seed)
    seen = {s: {"sizes": [], "q": [], "raw": []} for s in SIDES}
    started = time.perf_counter()
    for draw in range(draws):
        sizes = {s: torch.randint(1, d_max + 1, (n_rows[s],), generator=generator) for s in SIDES}
        quality = env.evaluate(sizes, step_seed=seed * 100_003 + draw)
        for s in SIDES:
            seen[s]["sizes"].append(sizes[s].float())
            seen[s]["q"].append(quality.ratio[s])
            seen[s]["raw"].append(quality.raw[s])
    environment = config.search.environment
    records = []
    for s in SIDES:
        sizes, q, raw = (torch.cat(seen[s][k]) for k in ("sizes", "q", "raw"))
        records.append({"side": s, "protocol": environment.protocol, "batches": environment.batches,
                        "item_quality": environment.item_quality, "reference_basis": environment.reference_basis,
                        "draws": draws, "seed": seed,
                        **side_response(sizes, q, raw, popularity[s].repeat(draws), d_max),
                        "seconds": round(time.perf_counter() - started, 1), "git_sha": git_sha()})
    return records


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-search.yaml")
    parser.add_argument("--protocol", choices=["warm", "paper"], required=True)
    parser.add_argument("--batches", type=positive_int, help="training batches per draw (default: the config's)")
    parser.add_argument("--item-quality", choices=["users", "hits"], help="eval(item) (default: the config's)")
    parser.add_argument("--reference-basis", choices=["trained", "principal"],
                        help="warm: the reference's basis (default: the config's)")
    parser.add_argument("--draws", type=positive_int, default=1, help="random configurations to train at")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    config = load_yaml(SearchExperimentConfig, args.config)
    environment = config.search.environment
    environment = dataclasses.replace(environment, protocol=args.protocol,
                                      batches=args.batches or environment.batches,
                                      item_quality=args.item_quality or environment.item_quality,
                                      reference_basis=args.reference_basis or environment.reference_basis)
    config = dataclasses.replace(config, search=dataclasses.replace(config.search, environment=environment))
    for record in measure(config, args.draws, args.seed, ROOT):
        append_jsonl(args.results, record)
        print(f"{record['side']} ({record['protocol']}, {record['reference_basis']} basis, "
              f"{record['batches']} batches, {record['rows']} rows): mean q {record['mean_q']}")
        print(f"  q by own size {record['q_by_size']}")
        print(f"  popular third {record['q_by_size_popular_third']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
