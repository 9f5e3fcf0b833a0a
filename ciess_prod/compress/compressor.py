"""Checkpoint + dimension plan -> artifact: what ``ciess compress`` runs."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from ciess_prod.compress.artifact import save_artifact
from ciess_prod.compress.ctr_model import CompressedDLRM
from ciess_prod.compress.model import CompressedRecommender
from ciess_prod.compress.ragged import RaggedDtype
from ciess_prod.experiment import load_trained_model
from ciess_prod.io import sha256_file
from ciess_prod.search.plan import MANIFEST_NAME, DimensionPlan, PlanError
from ciess_prod.train.checkpoint import load_trained_dlrm

log = logging.getLogger(__name__)


def check_plan_matches(plan: DimensionPlan, model_sizes: dict[str, torch.Tensor], fingerprint: str, d_max: int) -> None:
    """The checkpoint must be the model trained with this plan: same data, d_max and per-row sizes."""
    if plan.dataset_fingerprint != fingerprint:
        raise PlanError(
            f"plan dataset {plan.dataset_fingerprint[:12]} differs from the checkpoint's {fingerprint[:12]}"
        )
    if plan.d_max != d_max:
        raise PlanError(f"plan d_max {plan.d_max} differs from the checkpoint model's {d_max}")
    if set(plan.sizes) != set(model_sizes):
        raise PlanError(f"plan tables {sorted(plan.sizes)} differ from the model's {sorted(model_sizes)}")
    for side, sizes in model_sizes.items():
        differ = int((plan.sizes[side].to(torch.int64) != sizes.to(torch.int64)).sum())
        if differ:
            raise PlanError(
                f"{differ} {side} rows of the checkpoint have other sizes than the plan: compress the model trained "
                "with this plan (a search writes it to models/cX.XX next to plans/cX.XX)"
            )


def _is_ctr_checkpoint(path: Path) -> bool:
    try:
        return json.loads((Path(path) / "checkpoint.json").read_text()).get("task") == "ctr"
    except (OSError, json.JSONDecodeError, AttributeError):
        return False  # load_trained_model reports what is wrong with it


def compress(
    plan_dir: Path, checkpoint_dir: Path, dtype: RaggedDtype, out: Path, base_dir: Path | None = None
) -> dict[str, Any]:
    """Writes the artifact of the checkpoint's model at the plan's sizes; returns its manifest.

    The checkpoint is a user/item recommender (``ciess train``, a search's ``models/cX.XX``) or a DLRM written by
    the sharded CTR search (``models/cX.XX``, ``task: ctr``).
    """
    plan = DimensionPlan.load(plan_dir)
    if _is_ctr_checkpoint(checkpoint_dir):
        dlrm, meta = load_trained_dlrm(checkpoint_dir)
        sizes = {name: dlrm.row_sizes(i) for i, name in enumerate(dlrm.table_names)}
        check_plan_matches(plan, sizes, meta["metrics"]["dataset_fingerprint"], dlrm.config.d_max)
        compressed = CompressedDLRM.from_model(dlrm, dtype)
        trained_on = "train"
    else:
        trained = load_trained_model(checkpoint_dir, base_dir)
        model, meta = trained.model, trained.meta
        sizes = {side: model.row_sizes(side) for side in ("user", "item")}
        check_plan_matches(plan, sizes, meta["metrics"]["dataset_fingerprint"], model.config.d_max)
        compressed = CompressedRecommender.from_model(model, dtype)
        trained_on = "train+val" if trained.config.protocol == "final" else "train"
    provenance = {
        "plan": {
            "path": str(plan_dir),
            "sha256": sha256_file(Path(plan_dir) / MANIFEST_NAME),
            "target_sparsity": plan.target_sparsity,
            "achieved_sparsity": plan.achieved_sparsity,
            "metrics": plan.metrics,
        },
        "checkpoint": {
            "path": str(checkpoint_dir),
            "tensors_sha256": meta["tensors_sha256"],
            "dataset_fingerprint": meta["metrics"]["dataset_fingerprint"],
            "trained_on": trained_on,
        },
    }
    manifest = save_artifact(compressed, out, provenance)
    b = manifest["bytes"]
    log.info("%s: %s tables %d bytes (ideal %d, dense %d)", out, dtype, b["compressed_bytes"], b["ideal_bytes"],
             b["dense_bytes"])
    return manifest
