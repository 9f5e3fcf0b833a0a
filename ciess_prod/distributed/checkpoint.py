"""Step checkpoints of a distributed run with torch.distributed.checkpoint (DCP), never picked up half-written.

Layout: ``<dir>/step_000012/`` holds one DCP checkpoint (``.metadata`` plus one file per rank). It is written as
``step_000012.partial`` and renamed by rank 0 only after every rank has finished writing (two barriers), so a
directory named ``step_*`` is always complete: a run killed while saving leaves a ``.partial`` that is ignored
and removed by the next save. Older complete steps are removed after a new one lands.

Sharded tensors (model shards, fused optimizer state) go through DCP as they are, resharded on load if the plan
changed. Per-rank state that differs between ranks (replay buffers, explorers, the rows a rank keeps) is stored
under a per-rank key as one serialized object, so a rank restores exactly its own state (same world size).
"""

from __future__ import annotations

import io
import os
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

_STEP = re.compile(r"^step_(\d{6,})$")


def step_dir(directory: Path, step: int) -> Path:
    return Path(directory) / f"step_{step:06d}"


def latest_step(directory: Path) -> int | None:
    """The newest complete step in ``directory`` (None when there is none)."""
    directory = Path(directory)
    if not directory.is_dir():
        return None
    steps = [
        int(m.group(1))
        for p in directory.iterdir()
        if (m := _STEP.match(p.name)) and (p / ".metadata").is_file()
    ]
    return max(steps) if steps else None


def _per_rank(state: dict[str, Any]) -> dict[str, Any]:
    """Per-rank entries become one bytes object under a rank-specific key."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return {f"rank{dist.get_rank()}": buffer.getvalue()}


def save_state(directory: Path, step: int, state: dict[str, Any], per_rank: bool = False) -> Path:
    """Collective: every rank calls it with its state; returns the complete step directory."""
    directory = Path(directory)
    final = step_dir(directory, step)
    partial = final.with_name(final.name + ".partial")
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        for stale in directory.glob("*.partial"):
            shutil.rmtree(stale, ignore_errors=True)
        partial.mkdir()
    dist.barrier()
    dcp.save(_per_rank(state) if per_rank else state, checkpoint_id=str(partial))
    dist.barrier()
    if dist.get_rank() == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        for old in directory.iterdir():
            m = _STEP.match(old.name)
            if m and int(m.group(1)) < step:
                shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def load_state(directory: Path, step: int, state: dict[str, Any], per_rank: bool = False) -> None:
    """Collective: fills ``state`` in place from a complete step (tensors and sharded tensors in place; per-rank
    state replaced by this rank's saved object)."""
    path = step_dir(directory, step)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path}: no complete checkpoint")
    if not per_rank:
        dcp.load(state, checkpoint_id=str(path))
        return
    key = f"rank{dist.get_rank()}"
    holder: dict[str, Any] = {key: b""}
    dcp.load(holder, checkpoint_id=str(path))
    blob = holder[key]
    loaded = torch.load(io.BytesIO(blob.getvalue() if isinstance(blob, io.BytesIO) else blob), weights_only=False)
    state.clear()
    state.update(loaded)
