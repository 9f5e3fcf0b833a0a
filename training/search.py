"""torchrun entry point of the CIESS search.

    torchrun --nproc_per_node=N training/search.py --config configs/ctr-smoke.yaml [--resume]
    torchrun --nproc_per_node=N training/search.py --config configs/smoke.yaml [--resume] [--sharded]

Initialises the process group torchrun describes (gloo on CPU, NCCL on GPU). A config with ``task: ctr`` runs the
sharded search over a DLRM's tables (``ciess_prod.distributed.ctr``). A user/item recommender config runs the
sharded search over its user and item tables (``ciess_prod.distributed.recommender``) on N > 1 processes (or
with ``--sharded``), and the single-process search (``ciess search``: Adam on the tables) in one process.
Under ``torchrun --max-restarts=K`` a restarted group resumes from the last complete checkpoint by itself.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ciess_prod.config import ConfigError, load_yaml, read_yaml_mapping  # noqa: E402
from ciess_prod.data import load_dataset  # noqa: E402
from ciess_prod.distributed.ctr import CTREnvironment, CTRSearchExperimentConfig, load_ctr_data  # noqa: E402
from ciess_prod.distributed.environment import process_device  # noqa: E402
from ciess_prod.distributed.process import exit_skipping_finalisation  # noqa: E402
from ciess_prod.distributed.recommender import RecEnvironment, ShardedSearchExperimentConfig  # noqa: E402
from ciess_prod.distributed.search import run_sharded_search  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402
from ciess_prod.search.config import SearchExperimentConfig, resumable_settings  # noqa: E402
from ciess_prod.search.search import run_search  # noqa: E402


def init_process_group(backend: str) -> None:
    """The group torchrun describes, its store keys prefixed by the restart attempt.

    After ``torchrun --max-restarts`` restarts a group, the store still holds the dead workers' gloo addresses;
    without the prefix the new workers can read them and hang or fail to connect.
    """
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
        is_master=not agent_store and rank == 0, use_libuv=True,
    )
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    dist.init_process_group(backend, store=dist.PrefixStore(f"ciess/attempt{attempt}", store), rank=rank,
                            world_size=world)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--resume", action="store_true", help="continue from the last completed step")
    parser.add_argument("--sharded", action="store_true",
                        help="recommender configs: the sharded search even in one process (default: when N > 1)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", force=True)

    ctr = read_yaml_mapping(args.config).get("task") == "ctr"
    sharded = ctr or args.sharded or int(os.environ.get("WORLD_SIZE", "1")) > 1
    if sharded:
        if "WORLD_SIZE" not in os.environ:  # a sharded search started without torchrun: a group of one
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        init_process_group(backend)
    try:
        if sharded:
            if ctr:
                config = load_yaml(CTRSearchExperimentConfig, args.config)
                env = CTREnvironment(config, load_ctr_data(config.data, ROOT), process_device())
            else:
                config = load_yaml(ShardedSearchExperimentConfig, args.config)
                env = RecEnvironment(config, load_dataset(config.data, ROOT), process_device())
            restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
            fail_at = os.environ.get("CIESS_FAIL_AT_STEP")  # fault-tolerance tests: SIGKILL on the first attempt
            summary = run_sharded_search(
                env,
                config.search,
                config.model.d_max,
                config.output_dir,
                settings=resumable_settings(config),
                resume=args.resume or restarted,
                fail_at_step=int(fail_at) if fail_at and not restarted and dist.get_rank() == 1 else None,
            )
        else:
            config = load_yaml(SearchExperimentConfig, args.config)
            summary = run_search(config, base_dir=ROOT, resume=args.resume)
        if not sharded or dist.get_rank() == 0:
            for budget, plan in summary.get("plans", {}).items():
                print(f"c={budget}: {plan['path']} (achieved sparsity {plan['achieved_sparsity']:.4f})")
    finally:
        if sharded:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        code = main()
    except ConfigError as exc:  # a bad config: one line that names the file and the problem
        print(f"training/search.py: error: {exc}", file=sys.stderr)
        sys.exit(2)
    exit_skipping_finalisation(code)  # everything is written and the process group destroyed
