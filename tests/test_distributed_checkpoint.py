"""Step checkpoints: a step directory is complete or absent; half-written saves are never picked up."""

import pytest
import torch
import torch.distributed as dist

from ciess_prod.distributed import checkpoint
from ciess_prod.distributed.checkpoint import latest_step, load_state, save_state, step_dir


@pytest.fixture
def group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_save_load_and_latest(group, tmp_path):
    root = tmp_path / "ck"
    save_state(root, 1, {"rank": {"x": torch.arange(3), "history": [{"a": 1.0}]}}, per_rank=True)
    save_state(root, 2, {"rank": {"x": torch.arange(5), "history": [{"a": 2.0}]}}, per_rank=True)
    assert latest_step(root) == 2 and not step_dir(root, 1).exists()  # older steps are removed
    state = {}
    load_state(root, 2, state, per_rank=True)
    assert torch.equal(state["rank"]["x"], torch.arange(5)) and state["rank"]["history"] == [{"a": 2.0}]
    tensors = {"w": torch.ones(4)}
    save_state(root, 3, tensors)
    target = {"w": torch.zeros(4)}
    load_state(root, 3, target)
    assert torch.equal(target["w"], torch.ones(4))


def test_a_save_killed_half_way_is_never_picked_up(group, tmp_path, monkeypatch):
    root = tmp_path / "ck"
    save_state(root, 1, {"rank": {"x": 1}}, per_rank=True)
    real_save = checkpoint.dcp.save

    def dies_after_writing(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        raise KeyboardInterrupt("killed before the rename")

    monkeypatch.setattr(checkpoint.dcp, "save", dies_after_writing)
    with pytest.raises(KeyboardInterrupt):
        save_state(root, 2, {"rank": {"x": 2}}, per_rank=True)
    assert (root / "step_000002.partial" / ".metadata").is_file()  # all files written, but never renamed
    assert latest_step(root) == 1
    (root / "step_000003").mkdir()  # a step directory without DCP metadata is not complete either
    assert latest_step(root) == 1
    monkeypatch.setattr(checkpoint.dcp, "save", real_save)
    save_state(root, 2, {"rank": {"x": 2}}, per_rank=True)
    assert latest_step(root) == 2 and not list(root.glob("*.partial"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        load_state(root, 7, {})
