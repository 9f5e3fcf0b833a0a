"""Checkpoints as a directory: ``model.safetensors`` (no pickle) plus ``checkpoint.json`` (config, data
fingerprint, metrics, and the tensor file's sha256)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ciess_prod.io import atomic_directory, sha256_file, write_json_atomic

SCHEMA = "ciess-prod/checkpoint/v1"
TENSORS = "model.safetensors"
MANIFEST = "checkpoint.json"


class CheckpointError(ValueError):
    """A checkpoint directory is missing, corrupt or does not fit the model it is loaded into."""


@dataclass
class Checkpoint:
    state: dict[str, torch.Tensor]
    meta: dict[str, Any]  # experiment config, dataset fingerprint and summary, metrics


def save_checkpoint(path: Path, model: torch.nn.Module, meta: dict[str, Any]) -> None:
    state = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
    with atomic_directory(Path(path)) as tmp:
        save_file(state, str(tmp / TENSORS))
        write_json_atomic(tmp / MANIFEST, {"schema": SCHEMA, "tensors_sha256": sha256_file(tmp / TENSORS), **meta})


def load_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    manifest, tensors = path / MANIFEST, path / TENSORS
    if not manifest.is_file() or not tensors.is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (needs {MANIFEST} and {TENSORS})")
    try:
        meta = json.loads(manifest.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{manifest}: not valid JSON ({exc})") from exc
    if meta.get("schema") != SCHEMA:
        raise CheckpointError(f"{manifest}: schema {meta.get('schema')!r}, expected {SCHEMA!r}")
    if sha256_file(tensors) != meta.get("tensors_sha256"):
        raise CheckpointError(f"{tensors}: sha256 does not match the manifest (corrupt or modified)")
    return Checkpoint(state=load_file(str(tensors)), meta=meta)
