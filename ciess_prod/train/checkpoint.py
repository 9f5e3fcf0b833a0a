"""Checkpoints as a directory: ``model.safetensors`` (no pickle) plus ``checkpoint.json`` (config, data
fingerprint, metrics, and the tensor file's sha256)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ciess_prod.io import atomic_directory, read_json_object, sha256_file, write_json_atomic

SCHEMA = "ciess-prod/checkpoint/v1"
TENSORS = "model.safetensors"
MANIFEST = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt or does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # experiment config, dataset fingerprint and summary, metrics


def save_checkpoint(path: Path, model: torch.nn.Module | Mapping[str, torch.Tensor], meta: dict[str, Any]) -> None:
    """Writes a model (or a state dict) and ``meta`` as a checkpoint directory, whole or not at all."""
    source = model.state_dict() if isinstance(model, torch.nn.Module) else model
    state = {k: v.detach().contiguous().clone() for k, v in source.items()}
    with atomic_directory(Path(path)) as tmp:
        save_file(state, str(tmp / TENSORS))
        write_json_atomic(tmp / MANIFEST, {"schema": SCHEMA, "tensors_sha256": sha256_file(tmp / TENSORS), **meta})


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    manifest, tensors = path / MANIFEST, path / TENSORS
    if not manifest.is_file() or not tensors.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (needs {MANIFEST} and {TENSORS})")
    meta = read_json_object(manifest, CheckpointError)
    if meta.get("schema") != SCHEMA:
        raise CheckpointError(f"{manifest}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    if sha256_file(tensors) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensors}: sha256 does not match the manifest (corrupt or modified)")
    return Checkpoint(state=load_file(str(tensors)), meta=meta)


def load_trained_dlrm(path: Path) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A single-process (masked) DLRM from a checkpoint the sharded CTR search wrote (``models/cX.XX``)."""
    from ciess_prod.config import ConfigError, from_dict
    from ciess_prod.models.dlrm import DLRM, DLRMConfig

    checkpoint = load_checkpoint(path)
    meta = checkpoint.meta
    try:
        config = from_dict(DLRMConfig, meta["config"]["model"], where=f"{path}/{MANIFEST} config.model")
        model = DLRM(config, int(meta["n_dense"]), [int(n) for n in meta["table_sizes"]], list(meta["feature_names"]))
    except (KeyError, TypeError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{path}: not a DLRM checkpoint ({exc})") from exc
    try:
        model.load_state_dict(checkpoint.state)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: tensors do not fit the configured DLRM: {exc}") from exc
    return model.eval(), meta
