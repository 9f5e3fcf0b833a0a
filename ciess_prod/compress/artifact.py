"""The compressed-model artifact: a self-checking directory that serving and the ONNX exporter load.

Layout (no pickle anywhere; written into a temporary directory and renamed when complete)::

    manifest.json        schema, model kind and config, row counts, dtype, per-table size histogram and bytes,
                         byte totals, plan and checkpoint provenance, sha256 and length of every other file
    tables.safetensors   per table ``{name}.values``, ``{name}.block_offsets``, ``{name}.local_offsets`` (+
                         ``{name}.scale_bias`` for int8/int4): the ``RaggedEmbedding`` state
    dense.safetensors    the dense head's weights as ``head.*`` (NeuMF's head, NGCF's layers, a DLRM's MLPs) and,
                         for graph models, the normalised adjacency as ``graph.indptr`` / ``graph.indices`` /
                         ``graph.data`` (absent when the model has neither)

``manifest["architecture"]`` is ``recommender`` (user/item models: ``n_users``, ``n_items``) or ``dlrm`` (CTR:
``n_dense``, ``feature_names``; tables ``t_<feature>``).

``load_artifact`` re-validates everything (schema version, file set, checksums, tensor names, shapes, dtypes,
layouts) and raises ``ArtifactError`` naming the file and the problem.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ciess_prod import __version__
from ciess_prod.compress.ctr_model import CompressedDLRM
from ciess_prod.compress.model import TABLES, CompressedRecommender, build_head, graph_arrays, graph_from_arrays
from ciess_prod.compress.ragged import STATE_SCHEMA, RaggedEmbedding
from ciess_prod.config import ConfigError, from_dict, to_dict
from ciess_prod.io import atomic_directory, read_json_object, sha256_file, write_json_atomic
from ciess_prod.models import ModelConfig
from ciess_prod.models.dlrm import DLRMConfig

ARTIFACT_SCHEMA = "ciess-prod/artifact/v1"
MANIFEST = "manifest.json"
TABLES_FILE = "tables.safetensors"
DENSE_FILE = "dense.safetensors"


class ArtifactError(ValueError):
    """An artifact directory is missing, corrupt, tampered with or of another schema version."""


@dataclass
class Artifact:
    model: CompressedRecommender | CompressedDLRM
    manifest: dict[str, Any]


def size_histogram(sizes: torch.Tensor, d_max: int) -> dict[str, int]:
    """Rows per size, for the sizes present: {"0": rows of size 0, ..., "d_max": ...}."""
    counts = torch.bincount(sizes.to(torch.int64), minlength=d_max + 1)
    return {str(d): int(n) for d, n in enumerate(counts.tolist()) if n}


CompressedModel = CompressedRecommender | CompressedDLRM


def _architecture(model: CompressedModel) -> dict[str, Any]:
    """What rebuilds the model besides its tables: kind-specific manifest fields and dense tensors."""
    if isinstance(model, CompressedDLRM):
        head = {f"head.{k}": v for k, v in model.head_state().items()}
        return {"fields": {"architecture": "dlrm", "n_dense": model.n_dense, "feature_names": model.feature_names},
                "dense": head}
    dense = {}
    if model.head is not None:
        dense.update({f"head.{k}": v for k, v in model.head.state_dict().items()})
    if model.adjacency is not None:
        dense.update({f"graph.{k}": torch.from_numpy(v) for k, v in graph_arrays(model.adjacency).items()})
    return {"fields": {"architecture": "recommender", "n_users": model.n_users, "n_items": model.n_items},
            "dense": dense}


def save_artifact(model: CompressedModel, out: Path, provenance: dict[str, Any]) -> dict[str, Any]:
    """Writes ``model`` to the directory ``out`` (replacing it whole); returns the manifest."""
    tables, table_info = {}, {}
    for name, table in model.tables.items():
        for key, tensor in table.state_tensors().items():
            tables[f"{name}.{key}"] = tensor.detach().cpu().contiguous().clone()
        table_info[name] = {
            "rows": table.num_rows,
            "state": table.meta(),
            "size_histogram": size_histogram(table.sizes, table.d_max),
            "bytes": table.nbytes(),
            "ideal_bytes": table.ideal_bytes(),
            "dense_bytes": table.dense_bytes(),
        }
    parts = _architecture(model)
    dense = {k: v.detach().cpu().contiguous().clone() for k, v in parts["dense"].items()}
    manifest: dict[str, Any] = {
        "schema": ARTIFACT_SCHEMA,
        **parts["fields"],
        "model": to_dict(model.config),
        "dtype": model.dtype,
        "tables": table_info,
        "bytes": model.nbytes(),
        "provenance": provenance,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "version": __version__,
    }
    with atomic_directory(Path(out)) as tmp:
        safetensors.torch.save_file(tables, str(tmp / TABLES_FILE), metadata={"schema": ARTIFACT_SCHEMA})
        files = [TABLES_FILE]
        if dense:
            safetensors.torch.save_file(dense, str(tmp / DENSE_FILE), metadata={"schema": ARTIFACT_SCHEMA})
            files.append(DENSE_FILE)
        manifest["files"] = {f: {"sha256": sha256_file(tmp / f), "bytes": (tmp / f).stat().st_size} for f in files}
        write_json_atomic(tmp / MANIFEST, manifest)
    return manifest


def _read_manifest(directory: Path) -> dict[str, Any]:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an artifact directory (no {MANIFEST})")
    manifest = read_json_object(path, ArtifactError)
    if manifest.get("schema") != ARTIFACT_SCHEMA:
        raise ArtifactError(
            f"{path}: schema version mismatch: found {manifest.get('schema')!r}, expected {ARTIFACT_SCHEMA!r}"
        )
    if manifest.get("architecture") not in ("recommender", "dlrm"):
        found = manifest.get("architecture")
        raise ArtifactError(f"{path}: architecture must be 'recommender' or 'dlrm', got {found!r}")
    counts = ("n_users", "n_items") if manifest["architecture"] == "recommender" else ("n_dense", "feature_names")
    required = ("model", "dtype", "tables", "files", *counts)
    missing = [k for k in required if k not in manifest]
    if missing:
        raise ArtifactError(f"{path}: missing keys {missing}")
    return manifest


def _load_tensors(directory: Path, manifest: dict[str, Any], name: str) -> dict[str, torch.Tensor]:
    """One listed file, after checking its length and sha256 against the manifest."""
    path = directory / name
    entry = manifest["files"].get(name)
    if not isinstance(entry, dict) or not {"sha256", "bytes"} <= set(entry):
        raise ArtifactError(f"{directory / MANIFEST}: no sha256/bytes entry for {name}")
    if not path.is_file():
        raise ArtifactError(f"{path}: missing artifact file")
    if path.stat().st_size != entry["bytes"]:
        raise ArtifactError(f"{path}: {path.stat().st_size} bytes, manifest says {entry['bytes']} (truncated?)")
    if sha256_file(path) != entry["sha256"]:
        raise ArtifactError(f"{path}: sha256 does not match the manifest (corrupt or modified)")
    try:
        return safetensors.torch.load_file(str(path))
    except (safetensors.SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{path}: unreadable safetensors file ({exc})") from exc


def _load_tables(directory: Path, manifest: dict[str, Any], names: list[str]) -> dict[str, RaggedEmbedding]:
    """Every listed table from tables.safetensors, each validated against its manifest entry."""
    where = directory / MANIFEST
    stored = _load_tensors(directory, manifest, TABLES_FILE)
    if not isinstance(manifest["tables"], dict) or set(manifest["tables"]) != set(names):
        raise ArtifactError(f"{where}: tables {sorted(manifest['tables'])}, the model has {sorted(names)}")
    tables, used = {}, set()
    for name in names:
        info = manifest["tables"][name]
        state = info.get("state") if isinstance(info, dict) else None
        valid = isinstance(state, dict) and state.get("schema") == STATE_SCHEMA
        if not valid or state.get("dtype") != manifest["dtype"]:
            raise ArtifactError(f"{where}: table {name} has no valid {manifest['dtype']} state entry")
        keys = {k for k in stored if k.startswith(f"{name}.")}
        used |= keys
        try:
            tables[name] = RaggedEmbedding.from_state_tensors({k[len(name) + 1 :]: stored[k] for k in keys}, state)
        except ValueError as exc:
            raise ArtifactError(f"{directory / TABLES_FILE}: table {name}: {exc}") from exc
    if used != set(stored):
        raise ArtifactError(f"{directory / TABLES_FILE}: unexpected tensors {sorted(set(stored) - used)}")
    return tables


def _check_files(directory: Path, manifest: dict[str, Any], expected: set[str], what: str) -> None:
    if not isinstance(manifest["files"], dict) or set(manifest["files"]) != expected:
        raise ArtifactError(
            f"{directory / MANIFEST}: lists files {sorted(manifest['files'])}, a {what} artifact has {sorted(expected)}"
        )


def _load_dlrm(directory: Path, manifest: dict[str, Any]) -> CompressedDLRM:
    where = directory / MANIFEST
    try:
        config = from_dict(DLRMConfig, manifest["model"], where=f"{where} model")
    except (ConfigError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: model config unusable: {exc}") from exc
    features, n_dense = manifest["feature_names"], manifest["n_dense"]
    if not isinstance(features, list) or not features or not all(isinstance(f, str) for f in features):
        raise ArtifactError(f"{where}: feature_names must be a non-empty list of strings")
    if isinstance(n_dense, bool) or not isinstance(n_dense, int) or n_dense < 0:
        raise ArtifactError(f"{where}: n_dense must be an integer >= 0")
    _check_files(directory, manifest, {TABLES_FILE, DENSE_FILE}, "dlrm")
    tables = _load_tables(directory, manifest, [f"t_{f}" for f in features])
    dense = _load_tensors(directory, manifest, DENSE_FILE)
    strays = sorted(k for k in dense if not k.startswith("head."))
    if strays:
        raise ArtifactError(f"{directory / DENSE_FILE}: unexpected tensors {strays}")
    try:
        return CompressedDLRM(config, n_dense, features, tables, {k[len("head.") :]: v for k, v in dense.items()})
    except (ValueError, RuntimeError) as exc:
        raise ArtifactError(f"{directory}: {exc}") from exc


def load_artifact(directory: str | Path) -> Artifact:
    """Loads and fully validates an artifact written by ``save_artifact``."""
    directory = Path(directory)
    manifest = _read_manifest(directory)
    if manifest["architecture"] == "dlrm":
        return Artifact(_load_dlrm(directory, manifest), manifest)
    where = f"{directory / MANIFEST}"
    try:
        config = from_dict(ModelConfig, manifest["model"], where=f"{where} model")
    except (ConfigError, TypeError, ValueError) as exc:
        raise ArtifactError(f"{where}: model config unusable: {exc}") from exc
    n_users, n_items = manifest["n_users"], manifest["n_items"]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (n_users, n_items)):
        raise ArtifactError(f"{where}: n_users/n_items must be positive integers")
    expected_files = {TABLES_FILE} | ({DENSE_FILE} if config.kind in ("neumf", "ngcf", "lightgcn") else set())
    _check_files(directory, manifest, expected_files, config.kind)
    tables = _load_tables(directory, manifest, list(TABLES[config.kind]))

    head, adjacency = build_head(config), None
    dense = _load_tensors(directory, manifest, DENSE_FILE) if DENSE_FILE in expected_files else {}
    strays = sorted(k for k in dense if not k.startswith(("head.", "graph.")))
    if strays:
        raise ArtifactError(f"{directory / DENSE_FILE}: unexpected tensors {strays}")
    if head is not None:
        state = {k[len("head.") :]: v for k, v in dense.items() if k.startswith("head.")}
        try:
            head.load_state_dict(state)
        except RuntimeError as exc:
            raise ArtifactError(f"{directory / DENSE_FILE}: head weights do not fit {config.kind}: {exc}") from exc
    if config.kind in ("lightgcn", "ngcf"):
        arrays = {k[len("graph.") :]: v.numpy() for k, v in dense.items() if k.startswith("graph.")}
        if set(arrays) != {"indptr", "indices", "data"}:
            raise ArtifactError(f"{directory / DENSE_FILE}: graph tensors missing (found {sorted(arrays)})")
        dtypes = {"indptr": np.int64, "indices": np.int32, "data": np.float32}
        if any(arrays[k].dtype != t or arrays[k].ndim != 1 for k, t in dtypes.items()):
            raise ArtifactError(f"{directory / DENSE_FILE}: graph tensors must be 1-D int64/int32/float32")
        try:
            adjacency = graph_from_arrays(arrays, n_users + n_items)
        except ValueError as exc:
            raise ArtifactError(f"{directory / DENSE_FILE}: {exc}") from exc
    try:
        model = CompressedRecommender(config, n_users, n_items, tables, head, adjacency)
    except ValueError as exc:
        raise ArtifactError(f"{directory}: {exc}") from exc
    return Artifact(model, manifest)
