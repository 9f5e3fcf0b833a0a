"""Hand-made size plans for LightGCN under the final protocol, in plain torch, on any device.

Why: a search can only be as good as the best plan at its budget. This measures families of per-row size plans
(uniform `es`, a fixed users/items split of the budget, sizes proportional to popularity^alpha) at several L2
weights and training caps, without any search. It runs where torchrec and FBGEMM cannot be installed (a GPU
machine with no network), so it does not use the project's model and trainer: it restates their LightGCN recipe
in plain torch (BPR on 10,000 uniformly drawn users with one positive and one uniform negative each, L2 on the
batch's masked ego embeddings, Adam at lr 0.03 x0.9 every 200 batches down to 1e-3, early stopping on validation
Recall@20 every 250 batches with patience 4, then a fresh model on train+validation for as many epochs, tested
with train+validation items excluded) and reuses the project's ranking metric. Fidelity against the project's
trainer is in docs/benchmarks.md ("Size-plan families").

    python bench/plan_families.py export --config configs/ml1m-lightgcn.yaml --out split.npz   # project stack
    python bench/plan_families.py run --split split.npz --grid sweep --workers 4                # torch only

`run` appends one JSON line per job to bench/results/plan_families.jsonl (append-only; never edit it by hand).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import platform
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ciess_prod.eval.metrics import top_k_metrics  # noqa: E402  (torch only, like everything `run` needs)
from ciess_prod.io import append_jsonl  # noqa: E402
from ciess_prod.runtime import configure_cpu  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "plan_families.jsonl"
D_MAX = 128
KS = (5, 10, 20)
PLANS = ("full", "es", "split", "pop")


@dataclass(frozen=True)
class Job:
    """One plan family at one budget and L2 weight, trained under the final protocol (or only fitted)."""

    plan: str  # full | es (floor((1-c) d_max) for every row) | split | pop
    c: float  # target sparsity
    l2: float  # weight of the L2 term on the batch's masked ego embeddings
    share: float | None = None  # split/pop: the users' share of the budget (None: their share of the rows)
    alpha: float = 0.0  # pop: size proportional to train popularity^alpha within each side (0: uniform)
    seed: int = 0
    max_batches: int = 4000  # cap of the early-stopped fit on train
    eval_every: int = 250
    patience: int = 4
    fit_only: bool = False  # stop after the fit on train (validation curve only, no test)

    def __post_init__(self) -> None:
        if self.plan not in PLANS:
            raise ValueError(f"plan must be one of {PLANS}, got {self.plan!r}")
        if not 0 <= self.c < 1:
            raise ValueError(f"c must lie in [0, 1), got {self.c}")
        if self.share is not None and not 0 < self.share < 1:
            raise ValueError(f"share must lie in (0, 1), got {self.share}")
        if self.l2 < 0 or self.max_batches < 1 or self.eval_every < 1 or self.patience < 1:
            raise ValueError(f"l2 must be >= 0 and max_batches, eval_every, patience >= 1: {self}")


# ---- data ------------------------------------------------------------------------------------------------------
def export_split(config_path: Path, out: Path) -> None:
    """Writes a config's dataset split as (user, item) pairs; needs the project's data stack (torchrec)."""
    from ciess_prod.config import load_yaml
    from ciess_prod.experiment import ExperimentConfig, load_dataset

    dataset = load_dataset(load_yaml(ExperimentConfig, config_path).data)

    def pairs(matrix) -> np.ndarray:
        coo = matrix.tocoo()
        return np.stack([coo.row, coo.col]).astype(np.int32)

    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, n_users=dataset.n_users, n_items=dataset.n_items, train=pairs(dataset.train),
                        val=pairs(dataset.val), test=pairs(dataset.test), fingerprint=dataset.fingerprint)


@dataclass
class Split:
    n_users: int
    n_items: int
    train: np.ndarray  # int [2, nnz] (user, item) pairs
    val: np.ndarray
    test: np.ndarray
    fingerprint: str

    @classmethod
    def load(cls, path: Path) -> Split:
        with np.load(path) as z:
            missing = {"n_users", "n_items", "train", "val", "test", "fingerprint"} - set(z.files)
            if missing:
                raise ValueError(f"{path}: not a split written by `export` (missing {sorted(missing)})")
            split = cls(int(z["n_users"]), int(z["n_items"]), z["train"], z["val"], z["test"], str(z["fingerprint"]))
        for name in ("train", "val", "test"):
            pairs = getattr(split, name)
            if pairs.ndim != 2 or pairs.shape[0] != 2 or (pairs.size and (
                    pairs.min() < 0 or pairs[0].max() >= split.n_users or pairs[1].max() >= split.n_items)):
                raise ValueError(f"{path}: {name} must be [2, nnz] pairs within {split.n_users}x{split.n_items}")
        return split


class Interactions:
    """One training set on a device: BPR sampling (as ``BPRSampler(mode="users")``), adjacency and a dense mask."""

    def __init__(self, n_users: int, n_items: int, pairs: np.ndarray, device: torch.device) -> None:
        self.n_users, self.n_items = n_users, n_items
        key = torch.unique(torch.as_tensor(pairs[0], dtype=torch.int64) * n_items + torch.as_tensor(pairs[1]))
        users, items = key // n_items, key % n_items  # sorted by user, then item
        degree = torch.bincount(users, minlength=n_users)
        indptr = torch.cat([torch.zeros(1, dtype=torch.int64), degree.cumsum(0)])
        rank_in_row = torch.arange(len(users)) - indptr[users]
        self.nnz = len(users)
        self.items = items.to(device)
        self.degree, self.indptr = degree.to(device), indptr.to(device)
        self.user_popularity, self.item_popularity = degree, torch.bincount(items, minlength=n_items)
        self.eligible = torch.nonzero((degree > 0) & (degree < n_items)).squeeze(1).to(device)
        # u * n_items + (s_j - j) is non-decreasing: one searchsorted maps a uniform rank to the r-th non-item
        self.gap_keys = (users * n_items + items - rank_in_row).to(device)
        self.adjacency = normalized_adjacency(users, items, n_users, n_items).to(device)
        self.mask = torch.zeros(n_users, n_items, dtype=torch.bool, device=device)
        self.mask[users.to(device), self.items] = True

    def sample(self, batch: int, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        device = self.items.device
        users = self.eligible[torch.randint(0, len(self.eligible), (batch,), device=device, generator=generator)]
        degree = self.degree[users]
        offset = torch.minimum((torch.rand(batch, device=device, generator=generator) * degree).long(), degree - 1)
        free = self.n_items - degree
        r = torch.minimum((torch.rand(batch, device=device, generator=generator) * free).long(), free - 1)
        below = torch.searchsorted(self.gap_keys, users * self.n_items + r, right=True) - self.indptr[users]
        return users, self.items[self.indptr[users] + offset], r + below


def normalized_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """D^-1/2 A D^-1/2 of the bipartite graph as a CSR tensor (users first)."""
    n = n_users + n_items
    rows, cols = torch.cat([users, items + n_users]), torch.cat([items + n_users, users])
    degree = torch.bincount(rows, minlength=n).float()
    inv_sqrt = torch.where(degree > 0, degree.clamp(min=1).pow(-0.5), torch.zeros_like(degree))
    coo = torch.sparse_coo_tensor(torch.stack([rows, cols]), inv_sqrt[rows] * inv_sqrt[cols], (n, n),
                                  check_invariants=False)
    with warnings.catch_warnings():  # torch's "CSR support is in beta" notice
        warnings.simplefilter("ignore", UserWarning)
        return coo.coalesce().to_sparse_csr()


class _SymmetricProduct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.matrix = matrix
        return matrix @ x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return ctx.matrix @ grad.contiguous(), None


def lightgcn(adjacency: torch.Tensor, ego: torch.Tensor, n_layers: int = 3) -> torch.Tensor:
    layer, total = ego, ego
    for _ in range(n_layers):
        layer = _SymmetricProduct.apply(layer, adjacency)
        total = total + layer
    return total / (n_layers + 1)


def ranking(users: torch.Tensor, items: torch.Tensor, targets: torch.Tensor, exclude: torch.Tensor) -> dict[str, float]:
    """Means over all users of Recall@k / NDCG@k (users without targets count 0), as ``rank_users``."""
    scores = (users @ items.T).masked_fill(exclude, -torch.inf)
    top = torch.topk(scores, max(KS), dim=1).indices
    recall, ndcg = top_k_metrics(targets.gather(1, top).cpu(), targets.sum(1).cpu(), KS)
    out = {}
    for k in KS:
        out[f"recall@{k}"], out[f"ndcg@{k}"] = float(recall[k].mean()), float(ndcg[k].mean())
    return out


# ---- plans -----------------------------------------------------------------------------------------------------
def plan_sizes(job: Job, user_popularity: torch.Tensor, item_popularity: torch.Tensor) -> torch.Tensor:
    """Sizes of all rows (users first), int64 in [1, d_max], with sum <= (1 - c) * rows * d_max."""
    n_users, n_items = len(user_popularity), len(item_popularity)
    if job.plan == "full":
        return torch.full((n_users + n_items,), D_MAX, dtype=torch.int64)
    if job.plan == "es":
        return torch.full((n_users + n_items,), max(1, math.floor((1 - job.c) * D_MAX)), dtype=torch.int64)
    budget = (1 - job.c) * (n_users + n_items) * D_MAX
    share = n_users / (n_users + n_items) if job.share is None else job.share
    alpha = job.alpha if job.plan == "pop" else 0.0
    return torch.cat([_side_sizes(user_popularity, alpha, share * budget),
                      _side_sizes(item_popularity, alpha, (1 - share) * budget)])


def _side_sizes(popularity: torch.Tensor, alpha: float, total: float) -> torch.Tensor:
    """floor(scale * popularity^alpha) clipped to [1, d_max], with the largest scale whose sum fits ``total``."""
    weight = popularity.double().clamp(min=1) ** alpha

    def sizes(scale: float) -> torch.Tensor:
        return (scale * weight).floor().clamp(1, D_MAX).long()

    low, high = 0.0, D_MAX / float(weight.min())  # at `high` every row is at d_max
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if sizes(mid).sum() <= total else (low, mid)
    return sizes(low)


# ---- training --------------------------------------------------------------------------------------------------
def learning_rate(batch: int) -> float:
    return max(0.03 * 0.9 ** (batch // 200), 1e-3)


@dataclass
class Fit:
    weights: torch.Tensor
    best_batches: int
    val: dict[str, float] = field(default_factory=dict)
    history: list[tuple[int, float]] = field(default_factory=list)  # (batch, validation Recall@20)


def train(data: Interactions, sizes: torch.Tensor, job: Job, n_batches: int, seed: int,
          val_targets: torch.Tensor | None = None, batch_size: int = 10_000) -> Fit:
    """BPR + L2 training at fixed sizes; with ``val_targets`` it early-stops on validation Recall@20."""
    device = sizes.device
    n_rows = data.n_users + data.n_items
    init = torch.Generator().manual_seed(seed)
    weights = (torch.randn(n_rows, D_MAX, generator=init) * 0.01).to(device).requires_grad_(True)
    mask = (torch.arange(D_MAX, device=device) < sizes[:, None]).float()
    optimizer = torch.optim.Adam([weights], lr=learning_rate(0))
    sampler = torch.Generator(device=device).manual_seed(seed + 1)
    best = Fit(weights.detach().clone(), n_batches)
    best_recall, stale = -1.0, 0
    for step in range(n_batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step)
        ego = weights * mask
        final = lightgcn(data.adjacency, ego)
        u, p, n = data.sample(batch_size, sampler)
        p, n = p + data.n_users, n + data.n_users
        bpr = F.softplus((final[u] * final[n]).sum(-1) - (final[u] * final[p]).sum(-1)).mean()
        l2 = (ego[u].pow(2).sum() + ego[p].pow(2).sum() + ego[n].pow(2).sum()) / 2 / batch_size
        optimizer.zero_grad(set_to_none=True)
        (bpr + job.l2 * l2).backward()
        optimizer.step()
        done = step + 1
        if val_targets is None or (done % job.eval_every and done != n_batches):
            continue
        with torch.no_grad():
            final = lightgcn(data.adjacency, weights * mask)
            val = ranking(final[: data.n_users], final[data.n_users:], val_targets, data.mask)
        best.history.append((done, round(val["recall@20"], 5)))
        if val["recall@20"] > best_recall:
            best_recall, stale = val["recall@20"], 0
            best.weights, best.best_batches, best.val = weights.detach().clone(), done, val
        else:
            stale += 1
            if stale >= job.patience:
                break
    if val_targets is None:
        best.weights = weights.detach()
    return best


def dense(pairs: np.ndarray, n_users: int, n_items: int, device: torch.device) -> torch.Tensor:
    out = torch.zeros(n_users, n_items, dtype=torch.bool, device=device)
    out[torch.as_tensor(pairs[0], dtype=torch.int64, device=device),
        torch.as_tensor(pairs[1], dtype=torch.int64, device=device)] = True
    return out


class Runner:
    """Builds a split's device tensors once and runs jobs against them."""

    def __init__(self, split: Split, device: torch.device) -> None:
        self.split, self.device = split, device
        self.train = Interactions(split.n_users, split.n_items, split.train, device)
        self.merged = Interactions(split.n_users, split.n_items, np.concatenate([split.train, split.val], 1), device)
        self.val = dense(split.val, split.n_users, split.n_items, device)
        self.test = dense(split.test, split.n_users, split.n_items, device)

    def run(self, job: Job) -> dict[str, Any]:
        start = time.perf_counter()
        n_users = self.split.n_users
        sizes = plan_sizes(job, self.train.user_popularity, self.train.item_popularity).to(self.device)
        fit = train(self.train, sizes, job, job.max_batches, job.seed, self.val)
        row: dict[str, Any] = {
            **asdict(job), "achieved": round(1 - sizes.sum().item() / (sizes.numel() * D_MAX), 4),
            "users_mean": round(sizes[:n_users].float().mean().item(), 2),
            "items_mean": round(sizes[n_users:].float().mean().item(), 2),
            "best_batches": fit.best_batches, "converged": fit.best_batches < job.max_batches,
            "val": _rounded(fit.val), "history": fit.history,
        }
        if not job.fit_only:  # the final protocol: as many epochs on train+validation as chosen on train
            batches = max(1, round(fit.best_batches * self.merged.nnz / self.train.nnz))
            final = train(self.merged, sizes, job, batches, job.seed + 100)
            with torch.no_grad():
                embeddings = lightgcn(self.merged.adjacency, final.weights * (
                    torch.arange(D_MAX, device=self.device) < sizes[:, None]).float())
                test = ranking(embeddings[:n_users], embeddings[n_users:], self.test, self.merged.mask)
            row.update(final_batches=batches, test=_rounded(test))
        row["seconds"] = round(time.perf_counter() - start, 1)
        return row


def _rounded(metrics: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 5) for k, v in metrics.items()}


# ---- grids -----------------------------------------------------------------------------------------------------
GRIDS = ("sweep", "convergence", "tilts", "converged", "converged_es", "uniform_ceiling",
         "tilts_ceiling")


def grid(name: str) -> list[Job]:
    """The named job lists behind docs/benchmarks.md ("Size-plan families"), highest priority first."""
    families = [dict(plan="split", share=0.95), dict(plan="split", share=0.8), dict(plan="split", share=0.45),
                dict(plan="pop", alpha=0.5), dict(plan="pop", alpha=0.25), dict(plan="pop", alpha=0.5, share=0.8)]
    if name == "sweep":
        jobs = [Job("es", 0.8, 1e-4), Job("es", 0.8, 1e-3), Job("es", 0.8, 1e-3, seed=1)]
        for c in (0.8, 0.9, 0.95):
            for l2 in (1e-3, 3e-4):
                jobs += [Job("es", c, l2)] if (c, l2) != (0.8, 1e-3) else []
                jobs += [Job(c=c, l2=l2, **f) for f in families]
        for c in (0.8, 0.9, 0.95):
            for l2 in (5e-4, 2e-4):
                jobs += [Job("es", c, l2), Job("split", c, l2, share=0.95), Job("pop", c, l2, alpha=0.5)]
        jobs += [Job("full", 0.0, l2) for l2 in (1e-3, 3e-4, 1e-4)]
        for c in (0.8, 0.9, 0.95):
            jobs += [Job("es", c, 2e-3), Job("pop", c, 2e-3, alpha=0.5)]
        for c in (0.8, 0.9, 0.95):
            jobs += [Job("es", c, 1e-4)] if c != 0.8 else []
            jobs += [Job(c=c, l2=1e-4, **f) for f in families]
        return jobs
    if name == "convergence":  # validation curves past the 4000-batch cap
        long = dict(max_batches=10_000, eval_every=500, patience=100, fit_only=True)
        return [Job("es", 0.8, 1e-3, **long), Job("split", 0.95, 1e-3, share=0.95, **long),
                Job("split", 0.9, 3e-4, share=0.8, **long), Job("full", 0.0, 1e-3, **long)]
    if name == "tilts":  # small and inverse departures from uniform sizes, at the budget where uniform sizes lead
        return ([Job("es", 0.8, 1e-3, fit_only=True)]
                + [Job("pop", 0.8, 1e-3, alpha=a, fit_only=True) for a in (0.1, -0.1, -0.25, -0.5)]
                + [Job("split", 0.8, 1e-3, share=s, fit_only=True) for s in (0.7, 0.55)])
    if name == "converged":  # the best plans of the sweep, and the full-size model, trained past the 4000 cap
        return [Job("es", 0.8, 1e-3, max_batches=10_000), Job("split", 0.95, 1e-3, share=0.95, max_batches=10_000),
                Job("split", 0.9, 3e-4, share=0.8, max_batches=10_000), Job("full", 0.0, 1e-3, max_batches=10_000)]
    if name == "converged_es":  # uniform sizes past the cap beside the converged users-heavy plans (same L2, cap)
        return [Job("es", 0.9, 3e-4, max_batches=10_000), Job("es", 0.95, 1e-3, max_batches=10_000),
                Job("es", 0.9, 1e-3, max_batches=10_000)]
    patient = dict(max_batches=10_000, patience=12)  # the ceiling grids' recipe: past the cap, slow to stop
    if name == "uniform_ceiling":  # can uniform sizes reach 97% of the paper at c = 0.80: more patience, more L2
        return [Job("es", 0.8, 1e-3, **patient), Job("es", 0.8, 2e-3, max_batches=10_000),
                Job("es", 0.8, 1e-3, seed=1, **patient)]
    if name == "tilts_ceiling":  # the two tilts nearest uniform, trained like the uniform_ceiling es row beside them
        return [Job("pop", 0.8, 1e-3, alpha=a, seed=seed, **patient) for a, seed in ((-0.1, 0), (0.1, 0), (0.1, 1))]
    raise ValueError(f"unknown grid {name!r}; known: {', '.join(GRIDS)}")


# ---- command line ----------------------------------------------------------------------------------------------
def recorded_jobs(results: Path, grid_name: str, split_fingerprint: str) -> set[Job]:
    """The jobs of ``grid_name`` already recorded in ``results`` for this split, so a lost run can be resumed."""
    if not results.exists():
        return set()
    names = set(Job.__dataclass_fields__)
    done = set()
    for number, line in enumerate(results.read_text().splitlines(), 1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{results}:{number} is not a JSON line: {exc}") from None
        if row.get("grid") == grid_name and row.get("split") == split_fingerprint:
            done.add(Job(**{k: v for k, v in row.items() if k in names}))
    return done


def code_version() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "HEAD"], cwd=ROOT, text=True, stderr=subprocess.DEVNULL)
        dirty = subprocess.check_output(["git", "status", "--porcelain", "--", "bench/plan_families.py"], cwd=ROOT,
                                        text=True, stderr=subprocess.DEVNULL)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha.strip() + ("-dirty" if dirty.strip() else "")


_RUNNER: Runner | None = None


def _worker_init(split_path: str, device: str, threads: int) -> None:
    global _RUNNER
    configure_cpu()
    torch.set_num_threads(threads)
    _RUNNER = Runner(Split.load(Path(split_path)), torch.device(device))


def _worker_run(job: Job) -> dict[str, Any]:
    assert _RUNNER is not None
    return _RUNNER.run(job)


def run_jobs(jobs: list[Job], split_path: Path, results: Path, workers: int, device: str, threads: int,
             meta: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs ``jobs`` on ``workers`` processes; each row is appended to ``results`` as soon as it is done."""
    rows = []
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, _worker_init, (str(split_path), device, threads)) as pool:
        for row in pool.imap_unordered(_worker_run, jobs):
            row = {**row, **meta}
            append_jsonl(results, row)
            print_row(row)
            rows.append(row)
    return rows


def print_row(row: dict[str, Any]) -> None:
    test = row.get("test") or {}
    params = f"share={row['share']} alpha={row['alpha']}" if row["plan"] in ("split", "pop") else ""
    print(f"{row['plan']:>5} c={row['c']:<4} l2={row['l2']:<7g} {params:<24} users {row['users_mean']:>6} "
          f"items {row['items_mean']:>6} best {row['best_batches']:>5} val R@20 {row['val'].get('recall@20', 0):.4f} "
          f"test R@20 / N@20 {test.get('recall@20', float('nan')):.4f} / {test.get('ndcg@20', float('nan')):.4f} "
          f"({row['seconds']} s)", flush=True)


def main(argv: list[str] | None = None) -> int:
    configure_cpu()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser("export", help="write a config's split as an npz (needs the project's data stack)")
    export.add_argument("--config", type=Path, default=ROOT / "configs" / "ml1m-lightgcn.yaml")
    export.add_argument("--out", type=Path, required=True)
    run = sub.add_parser("run", help="run a grid of plans on an exported split (torch only)")
    run.add_argument("--split", type=Path, required=True)
    run.add_argument("--grid", required=True, help=" | ".join(GRIDS))
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    run.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    run.add_argument("--results", type=Path, default=RESULTS)
    run.add_argument("--code-version", default=None, help="recorded instead of git's HEAD (a tree without .git)")
    run.add_argument("--resume", action="store_true", help="skip the grid's jobs already recorded for this split")
    args = parser.parse_args(argv)
    if args.command == "export":
        export_split(args.config, args.out)
        return 0
    try:
        jobs = grid(args.grid)
        split = Split.load(args.split)
        if args.resume:
            done = recorded_jobs(args.results, args.grid, split.fingerprint)
            jobs = [job for job in jobs if job not in done]
            print(f"resuming {args.grid}: {len(done)} recorded, {len(jobs)} to run", flush=True)
    except (OSError, ValueError) as exc:
        parser.error(str(exc))
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    meta = {"git": args.code_version or code_version(), "device": device_name, "grid": args.grid,
            "split": split.fingerprint, "workers": args.workers, "torch": torch.__version__}
    run_jobs(jobs, args.split, args.results, args.workers, args.device, args.threads, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
