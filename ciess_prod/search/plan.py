"""The dimension plan: the per-row sizes a search hands to the compressor, saved so they can be trusted later.

A plan outlives the process that found it (searches take hours, compression runs elsewhere), so it is stored as
a self-checking directory: ``sizes.safetensors`` (int16 tensors, no pickle) plus ``plan.json`` (provenance,
per-table statistics and the tensor file's sha256). ``load`` refuses anything corrupt, tampered with or
inconsistent instead of letting a bad plan silently shrink a model.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from fractions import Fraction
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

import ciess_prod
from ciess_prod.io import atomic_directory, read_json_object, sha256_file, write_json_atomic
from ciess_prod.models.memory import sparsity

PLAN_SCHEMA = "ciess-prod/dimension-plan/v1"
MANIFEST_NAME = "plan.json"
TENSORS_NAME = "sizes.safetensors"
MAX_D = 32767  # sizes are stored as int16
SPARSITY_TOLERANCE = 1e-9

# manifest key -> accepted JSON types (bool is excluded from int/float explicitly in _check_type)
_REQUIRED: dict[str, tuple[type, ...]] = {
    "schema": (str,),
    "d_max": (int,),
    "model": (str,),
    "dataset_fingerprint": (str,),
    "target_sparsity": (int, float),
    "achieved_sparsity": (int, float),
    "budget": (int,),
    "repaired": (bool,),
    "metrics": (dict,),
    "seed": (int,),
    "config": (dict,),
    "code_version": (str,),
    "created": (str,),
    "tables": (dict,),
    "table_order": (list,),
    "tensors_sha256": (str,),
}


class PlanError(ValueError):
    """A plan file is missing, corrupt, tampered with or inconsistent."""


def budget_for(total_rows: int, d_max: int, target_sparsity: float) -> int:
    """floor((1 - c) * rows * d_max): the most columns all rows together may keep at sparsity c.

    Computed exactly on c's shortest decimal form, so c = 0.9 means 9/10: plain float arithmetic gives
    (1 - 0.9) * 10 = 0.9999999999999998 and would forbid the uniform one-column plan that meets c exactly.
    """
    c = Fraction(repr(float(target_sparsity)))
    return math.floor((1 - c) * total_rows * d_max)


def _check_sizes(sizes: Mapping[str, Any], d_max: int) -> dict[str, torch.Tensor]:
    """Validates a table -> size-vector mapping and returns CPU int16 tensors (range checked before narrowing)."""
    if not isinstance(sizes, Mapping) or not sizes:
        raise PlanError("sizes: expected a non-empty mapping of table name -> size tensor")
    out: dict[str, torch.Tensor] = {}
    for name, s in sizes.items():
        if not isinstance(name, str) or not name:
            raise PlanError(f"sizes: table names must be non-empty strings, got {name!r}")
        if not isinstance(s, torch.Tensor):
            try:
                s = torch.as_tensor(s)
            except (TypeError, ValueError, RuntimeError) as e:
                raise PlanError(f"table {name!r}: cannot convert sizes to a tensor ({e})") from e
        if s.dtype.is_floating_point or s.dtype.is_complex or s.dtype == torch.bool:
            raise PlanError(f"table {name!r}: sizes must be an integer tensor, got {s.dtype}")
        if s.dim() != 1:
            raise PlanError(f"table {name!r}: sizes must be 1-D, got shape {list(s.shape)}")
        if s.numel() == 0:
            raise PlanError(f"table {name!r}: has no rows")
        lo, hi = int(s.min()), int(s.max())
        if lo < 1 or hi > d_max:
            raise PlanError(f"table {name!r}: sizes must lie in [1, {d_max}], got [{lo}, {hi}] (0 is not allowed)")
        out[name] = s.detach().to(device="cpu", dtype=torch.int16).contiguous()
    return out


def _check_d_max(d_max: Any) -> int:
    if isinstance(d_max, bool) or not isinstance(d_max, int) or not 1 <= d_max <= MAX_D:
        raise PlanError(f"d_max must be an integer in [1, {MAX_D}], got {d_max!r}")
    return d_max


def _check_target(target_sparsity: Any) -> float:
    if isinstance(target_sparsity, bool) or not isinstance(target_sparsity, int | float):
        raise PlanError(f"target_sparsity must be a number in [0, 1), got {target_sparsity!r}")
    c = float(target_sparsity)
    if not 0.0 <= c < 1.0:  # also rejects NaN
        raise PlanError(f"target_sparsity must lie in [0, 1), got {target_sparsity!r}")
    return c


@dataclass
class DimensionPlan:
    """Per-row embedding sizes for every table of one model at one budget."""

    sizes: dict[str, torch.Tensor]  # table name -> int16 [rows], every value in [1, d_max]
    d_max: int
    model: str
    dataset_fingerprint: str  # sha256 hex of the data + split the plan was searched on
    target_sparsity: float  # the budget c in [0, 1)
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seed: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    repaired: bool = False  # True when derived by repair_to_budget rather than found by the search
    code_version: str = ciess_prod.__version__
    created: str = ""  # ISO-8601 UTC, filled on save when empty

    def __post_init__(self) -> None:
        self.d_max = _check_d_max(self.d_max)
        self.target_sparsity = _check_target(self.target_sparsity)
        self.sizes = _check_sizes(self.sizes, self.d_max)
        for name in ("model", "dataset_fingerprint", "code_version", "created"):
            if not isinstance(getattr(self, name), str):
                raise PlanError(f"{name} must be a string, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise PlanError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.repaired, bool):
            raise PlanError(f"repaired must be a bool, got {self.repaired!r}")
        if not isinstance(self.config, Mapping):
            raise PlanError(f"config must be a mapping, got {type(self.config).__name__}")
        self.config = dict(self.config)
        if not isinstance(self.metrics, Mapping) or not all(isinstance(m, Mapping) for m in self.metrics.values()):
            raise PlanError("metrics must map a split name to a mapping of metric name -> value")
        try:
            self.metrics = {str(k): {str(n): float(v) for n, v in m.items()} for k, m in self.metrics.items()}
        except (TypeError, ValueError) as e:
            raise PlanError(f"metrics: every value must be a number ({e})") from e
        for split, values in self.metrics.items():  # an unknown value is left out: NaN is not JSON
            for name, value in values.items():
                if not math.isfinite(value):
                    raise PlanError(f"metrics: {split}.{name} is {value}, not a finite number (leave unknowns out)")

    @property
    def total_rows(self) -> int:
        return sum(int(s.numel()) for s in self.sizes.values())

    @property
    def total_size(self) -> int:
        """sum(d_n) over all rows of all tables."""
        return sum(int(s.sum(dtype=torch.int64)) for s in self.sizes.values())

    @property
    def achieved_sparsity(self) -> float:
        """1 - sum(d_n) / (rows * d_max), the paper's c actually reached."""
        return sparsity(list(self.sizes.values()), self.d_max)

    @property
    def budget(self) -> int:
        """The most sum(d_n) may be: floor((1 - target_sparsity) * rows * d_max)."""
        return budget_for(self.total_rows, self.d_max, self.target_sparsity)

    def fits_budget(self) -> bool:
        return self.total_size <= self.budget

    def manifest(self) -> dict[str, Any]:
        """plan.json without the tensor checksum (known only once the tensor file is written)."""
        tables = {
            name: {
                "rows": int(s.numel()),
                "sum": int(s.sum(dtype=torch.int64)),
                "min": int(s.min()),
                "max": int(s.max()),
                "mean": float(s.to(torch.float64).mean()),
            }
            for name, s in self.sizes.items()
        }
        return {
            "schema": PLAN_SCHEMA,
            "d_max": self.d_max,
            "model": self.model,
            "dataset_fingerprint": self.dataset_fingerprint,
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "budget": self.budget,
            "repaired": self.repaired,
            "metrics": self.metrics,
            "seed": self.seed,
            "config": self.config,
            "code_version": self.code_version,
            "created": self.created,
            "tables": tables,
            "table_order": list(self.sizes),  # sort_keys would otherwise lose the caller's table order
        }

    def save(self, directory: str | Path) -> Path:
        """Writes the plan directory whole: a crash leaves the previous plan (if any) untouched, never half a plan."""
        directory = Path(directory)
        if not self.created:
            self.created = datetime.now(timezone.utc).isoformat(timespec="seconds")
        manifest = self.manifest()
        try:
            json.dumps(manifest)
        except (TypeError, ValueError) as e:
            raise PlanError(f"{directory}: plan metadata is not JSON-serialisable ({e})") from e
        with atomic_directory(directory) as tmp:
            tensors = tmp / TENSORS_NAME
            # clones: safetensors refuses tensors that share storage (e.g. slices of one buffer)
            owned = {name: s.clone() for name, s in self.sizes.items()}
            safetensors.torch.save_file(owned, str(tensors), metadata={"schema": PLAN_SCHEMA})
            manifest["tensors_sha256"] = sha256_file(tensors)
            write_json_atomic(tmp / MANIFEST_NAME, manifest)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> DimensionPlan:
        """Reads and fully re-validates a saved plan; any inconsistency raises PlanError naming the path."""
        directory = Path(directory)
        if not directory.is_dir():
            raise PlanError(f"{directory}: plan directory does not exist")
        manifest_path, tensors_path = directory / MANIFEST_NAME, directory / TENSORS_NAME
        for p in (manifest_path, tensors_path):
            if not p.is_file():
                raise PlanError(f"{p}: missing plan file")
        manifest = _read_manifest(manifest_path)
        try:
            d_max = _check_d_max(manifest["d_max"])
        except PlanError as e:
            raise PlanError(f"{manifest_path}: {e}") from e

        digest = sha256_file(tensors_path)
        if digest != manifest["tensors_sha256"]:
            raise PlanError(
                f"{tensors_path}: checksum mismatch (sha256 {digest}, manifest says {manifest['tensors_sha256']}); "
                "the file is corrupt or was modified"
            )
        try:
            sizes = safetensors.torch.load_file(str(tensors_path))
        except Exception as e:  # safetensors raises its own error types, and OSError/ValueError on bad headers
            raise PlanError(f"{tensors_path}: unreadable safetensors file ({type(e).__name__}: {e})") from e

        tables: dict[str, Any] = manifest["tables"]
        order: list[Any] = manifest["table_order"]
        if not all(isinstance(n, str) for n in order) or sorted(order) != sorted(tables):
            raise PlanError(f"{manifest_path}: table_order {order} does not list the tables {sorted(tables)}")
        if set(sizes) != set(tables):
            raise PlanError(
                f"{tensors_path}: tables {sorted(sizes)} differ from the manifest's {sorted(tables)} ({manifest_path})"
            )
        for name, s in sizes.items():
            stats = tables[name]
            if not isinstance(stats, dict) or not all(k in stats for k in ("rows", "sum", "min", "max")):
                raise PlanError(f"{manifest_path}: table {name!r} lacks rows/sum/min/max")
            if s.dtype != torch.int16:
                raise PlanError(f"{tensors_path}: table {name!r} has dtype {s.dtype}, expected torch.int16")
            if s.dim() != 1 or s.numel() != stats["rows"]:
                raise PlanError(
                    f"{tensors_path}: table {name!r} has shape {list(s.shape)}, manifest says {stats['rows']} rows"
                )
            found = {"sum": int(s.sum(dtype=torch.int64)), "min": int(s.min()), "max": int(s.max())}
            if found["min"] < 1 or found["max"] > d_max:
                raise PlanError(
                    f"{tensors_path}: table {name!r} has sizes in [{found['min']}, {found['max']}], "
                    f"outside [1, {d_max}]"
                )
            if any(found[k] != stats[k] for k in found):
                raise PlanError(
                    f"{tensors_path}: table {name!r} statistics {found} differ from the manifest's "
                    f"{ {k: stats[k] for k in found} }"
                )
        try:
            plan = cls(
                sizes={name: sizes[name] for name in order},
                d_max=manifest["d_max"],
                model=manifest["model"],
                dataset_fingerprint=manifest["dataset_fingerprint"],
                target_sparsity=manifest["target_sparsity"],
                metrics=manifest["metrics"],
                seed=manifest["seed"],
                config=manifest["config"],
                repaired=manifest["repaired"],
                code_version=manifest["code_version"],
                created=manifest["created"],
            )
        except PlanError as e:
            raise PlanError(f"{directory}: {e}") from e

        if abs(plan.achieved_sparsity - manifest["achieved_sparsity"]) > SPARSITY_TOLERANCE:
            raise PlanError(
                f"{manifest_path}: achieved_sparsity {manifest['achieved_sparsity']} differs from the "
                f"{plan.achieved_sparsity} recomputed from {TENSORS_NAME}"
            )
        if plan.budget != manifest["budget"]:
            raise PlanError(
                f"{manifest_path}: budget {manifest['budget']} differs from {plan.budget} recomputed from "
                f"target_sparsity {plan.target_sparsity}"
            )
        return plan


def _read_manifest(path: Path) -> dict[str, Any]:
    """Parses plan.json and checks schema, required keys and their JSON types."""
    manifest = read_json_object(path, PlanError)
    if "schema" not in manifest:
        raise PlanError(f"{path}: missing 'schema' (expected {PLAN_SCHEMA!r}); not a dimension plan")
    if manifest["schema"] != PLAN_SCHEMA:
        raise PlanError(f"{path}: schema version mismatch: found {manifest['schema']!r}, expected {PLAN_SCHEMA!r}")
    missing = sorted(set(_REQUIRED) - set(manifest))
    if missing:
        raise PlanError(f"{path}: missing required keys {missing}")
    for key, types in _REQUIRED.items():
        value = manifest[key]
        wrong_bool = isinstance(value, bool) and bool not in types
        if wrong_bool or not isinstance(value, types):
            names = "/".join(t.__name__ for t in types)
            raise PlanError(f"{path}: key {key!r} must be {names}, got {type(value).__name__}")
    return manifest


def repair_to_budget(sizes: Mapping[str, torch.Tensor], d_max: int, target_sparsity: float) -> dict[str, torch.Tensor]:
    """Shrinks sizes just enough to meet budget c, for when no configuration the search visited fits it.

    Rule (deterministic, documented so a repaired plan can be reproduced by hand): every size of every table is
    scaled by one common factor s, ``new = max(1, floor(d * s))``, where s in [0, 1] is the largest value (to
    2**-60, by 60 bisection steps on the scalar) whose total fits ``floor((1 - c) * rows * d_max)``. A common
    factor keeps the search's ranking of rows, across tables too: d_a >= d_b implies new_a >= new_b. Left-over
    budget (rows whose floors jump together) is not redistributed. Sizes that already fit come back unchanged,
    as int16 copies. Raises PlanError when even one column per row exceeds the budget.
    """
    d_max = _check_d_max(d_max)
    c = _check_target(target_sparsity)
    checked = _check_sizes(sizes, d_max)
    flat = torch.cat([s.to(torch.float64) for s in checked.values()])
    rows = int(flat.numel())
    budget = budget_for(rows, d_max, c)
    if int(flat.sum()) <= budget:
        return {name: s.clone() for name, s in checked.items()}
    if rows > budget:
        raise PlanError(
            f"budget {budget} at target sparsity {c} is below one column per row ({rows} rows, d_max {d_max}); "
            "no plan can meet it"
        )

    def scaled(s: float) -> torch.Tensor:
        return torch.clamp(torch.floor(flat * s), min=1.0)

    return _split_like(checked, scaled(_largest_fitting(scaled, budget, 0.0, 1.0)))


def fill_to_budget(sizes: Mapping[str, torch.Tensor], d_max: int, target_sparsity: float) -> dict[str, torch.Tensor]:
    """Grows sizes that leave budget c unused, the mirror of ``repair_to_budget``.

    Rule: every size is scaled by one common factor s >= 1, ``new = min(d_max, max(d, floor(d * s)))``, s the
    largest (to 2**-60 of d_max, by bisection) whose total fits ``floor((1 - c) * rows * d_max)``. It keeps the
    order of rows (d_a >= d_b implies new_a >= new_b) and never shrinks a row; what is left over (rows whose floors
    jump together) stays unused. Sizes over the budget raise PlanError (repair them instead).
    """
    d_max = _check_d_max(d_max)
    c = _check_target(target_sparsity)
    checked = _check_sizes(sizes, d_max)
    flat = torch.cat([s.to(torch.float64) for s in checked.values()])
    budget = budget_for(int(flat.numel()), d_max, c)
    if int(flat.sum()) > budget:
        raise PlanError(f"sizes total {int(flat.sum())} exceeds the budget {budget} of target sparsity {c}")

    def scaled(s: float) -> torch.Tensor:
        return torch.clamp(torch.maximum(torch.floor(flat * s), flat), max=float(d_max))

    return _split_like(checked, scaled(_largest_fitting(scaled, budget, 1.0, float(d_max))))


def even_within_tables(sizes: Mapping[str, torch.Tensor], d_max: int) -> dict[str, torch.Tensor]:
    """Each table's rows share its total size equally: ``total // rows`` each, and the remainder's +1 goes to the
    rows with the largest sizes (ties by row order), so every table's total, hence any budget it met, is kept.

    Why: on MovieLens-1M the scatter of a visited configuration's sizes within a side is unrelated to popularity
    (docs/benchmarks.md, "Even sizes within a side") and plans with equal sizes within each side retrain better
    ("Size-plan families"); this keeps what the search chose between the tables.
    """
    d_max = _check_d_max(d_max)
    checked = _check_sizes(sizes, d_max)
    out = {}
    for name, s in checked.items():
        rows, total = int(s.numel()), int(s.to(torch.int64).sum())
        even = torch.full((rows,), total // rows, dtype=torch.int16)
        largest = torch.argsort(s.to(torch.int64), descending=True, stable=True)[: total % rows]
        even[largest] += 1
        out[name] = even
    return out


def size_distance(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> float:
    """How far plan b's sizes lie from plan a's: the columns that differ row by row (L1 over every table) as a share
    of a's columns. Two evened plans of one budget lie ``2 x`` the share of columns they move between tables apart."""
    if a.keys() != b.keys() or any(a[t].shape != b[t].shape for t in a):
        raise PlanError(f"size_distance compares plans of the same tables and rows, got {sorted(a)} and {sorted(b)}")
    moved = sum(int((a[t].to(torch.int64) - b[t].to(torch.int64)).abs().sum()) for t in a)
    return moved / max(1, sum(int(a[t].to(torch.int64).sum()) for t in a))


def _largest_fitting(scaled: Callable[[float], torch.Tensor], budget: int, lo: float, hi: float) -> float:
    """The largest factor in [lo, hi] (to (hi - lo) 2**-60) whose ``scaled(factor)`` total fits; ``lo`` must fit."""
    if int(scaled(hi).sum()) <= budget:
        return hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if int(scaled(mid).sum()) <= budget:
            lo = mid
        else:
            hi = mid
    return lo


def _split_like(checked: Mapping[str, torch.Tensor], flat: torch.Tensor) -> dict[str, torch.Tensor]:
    """int16 per table again, each with its own storage."""
    parts = torch.split(flat.to(torch.int16), [int(s.numel()) for s in checked.values()])
    return {name: part.clone() for name, part in zip(checked, parts, strict=True)}
