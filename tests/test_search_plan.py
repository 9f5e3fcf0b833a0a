"""Dimension plans: they round-trip exactly, and any damaged or inconsistent plan directory is refused on load."""

import json
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ciess_prod.io import sha256_file
from ciess_prod.search.plan import (
    MANIFEST_NAME,
    PLAN_SCHEMA,
    TENSORS_NAME,
    DimensionPlan,
    PlanError,
    budget_for,
    repair_to_budget,
)

D = 16
FINGERPRINT = "ab" * 32


def _sizes(seed: int = 0, users: int = 30, items: int = 50, hi: int = D) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "user": torch.randint(1, hi + 1, (users,), generator=g),
        "item": torch.randint(1, hi + 1, (items,), generator=g),
    }


def _plan(**kw) -> DimensionPlan:
    args = dict(
        sizes=_sizes(),
        d_max=D,
        model="lightgcn",
        dataset_fingerprint=FINGERPRINT,
        target_sparsity=0.5,
        metrics={"val": {"recall@20": 0.125, "ndcg@20": 0.25}, "test": {"recall@20": 0.1}},
        seed=7,
        config={"episodes": 3, "walk": {"t": 5, "steps": 5}},
    )
    args.update(kw)
    return DimensionPlan(**args)


def _saved(tmp_path: Path) -> Path:
    return _plan().save(tmp_path / "plan")


def _edit_manifest(directory: Path, **changes) -> None:
    path = directory / MANIFEST_NAME
    manifest = json.loads(path.read_text())
    manifest.update(changes)
    path.write_text(json.dumps(manifest))


def _rewrite_tensors(directory: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Replaces the tensor file and fixes the checksum, so only the deeper checks can catch the change."""
    safetensors.torch.save_file(tensors, str(directory / TENSORS_NAME))
    _edit_manifest(directory, tensors_sha256=sha256_file(directory / TENSORS_NAME))


# --- construction ---------------------------------------------------------------------------------------------


def test_sizes_become_int16_and_properties_match_the_definition():
    plan = _plan(sizes={"user": torch.tensor([1, 2, 3]), "item": torch.tensor([16, 16], dtype=torch.int64)})
    assert all(s.dtype == torch.int16 for s in plan.sizes.values())
    assert plan.achieved_sparsity == pytest.approx(1 - 38 / (5 * D))
    assert plan.budget == 40  # floor(0.5 * 5 * 16)
    assert plan.fits_budget()
    assert not _plan(sizes={"user": torch.full((5,), 9)}).fits_budget()  # 45 > 40


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        (dict(sizes={}), "non-empty"),
        (dict(sizes={"user": torch.tensor([1.0, 2.0])}), "'user': sizes must be an integer tensor"),
        (dict(sizes={"user": torch.tensor([True])}), "integer tensor"),
        (dict(sizes={"user": torch.ones(2, 2, dtype=torch.int32)}), "1-D"),
        (dict(sizes={"item": torch.tensor([0, 3])}), "'item': sizes must lie in [1, 16]"),
        (dict(sizes={"item": torch.tensor([17])}), "[1, 16]"),
        (dict(sizes={"item": torch.tensor([40000])}), "[1, 16]"),  # would wrap to negative as int16
        (dict(sizes={"item": torch.tensor([], dtype=torch.int32)}), "no rows"),
        (dict(d_max=0), "d_max"),
        (dict(d_max=40000), "d_max"),
        (dict(target_sparsity=1.0), "target_sparsity"),
        (dict(target_sparsity=-0.1), "target_sparsity"),
        (dict(target_sparsity=float("nan")), "target_sparsity"),
        (dict(metrics={"val": {"recall": "high"}}), "metrics"),
        (dict(metrics={"selection": {"mean_q": float("nan")}}), "selection.mean_q is nan, not a finite number"),
        (dict(metrics={"test": {"recall@20": float("inf")}}), "test.recall@20 is inf"),
    ],
)
def test_constructor_rejects(kw, message):
    with pytest.raises(PlanError, match=message.replace("[", r"\[").replace("]", r"\]")):
        _plan(**kw)


def test_budget_uses_the_decimal_value_of_c():
    # (1 - 0.9) * 10 is 0.9999999999999998 in floats; the budget must still allow one column per row.
    assert budget_for(1000, 10, 0.9) == 1000
    assert budget_for(3, 7, 0.0) == 21


# --- save / load ----------------------------------------------------------------------------------------------


def test_round_trip(tmp_path):
    plan = _plan()
    out = plan.save(tmp_path / "plan")
    assert out == tmp_path / "plan"
    assert plan.created  # filled on save
    loaded = DimensionPlan.load(out)
    assert list(loaded.sizes) == list(plan.sizes)
    for name in plan.sizes:
        assert loaded.sizes[name].dtype == torch.int16
        assert torch.equal(loaded.sizes[name], plan.sizes[name])
    for name in ("d_max", "model", "dataset_fingerprint", "target_sparsity", "metrics", "seed", "config"):
        assert getattr(loaded, name) == getattr(plan, name), name
    assert (loaded.repaired, loaded.code_version, loaded.created) == (plan.repaired, plan.code_version, plan.created)
    assert loaded.achieved_sparsity == plan.achieved_sparsity
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    total = sum(int(s.sum()) for s in plan.sizes.values())
    assert manifest["achieved_sparsity"] == pytest.approx(1 - total / (80 * D), abs=1e-12)
    assert manifest["budget"] == plan.budget == 640
    assert manifest["tables"]["user"]["rows"] == 30
    assert manifest["tables"]["item"]["sum"] == int(plan.sizes["item"].sum())
    assert manifest["tensors_sha256"] == sha256_file(out / TENSORS_NAME)
    assert (out / MANIFEST_NAME).read_text() == json.dumps(manifest, indent=2, sort_keys=True) + "\n"


def test_save_accepts_tables_sharing_storage(tmp_path):
    buffer = torch.randint(1, D + 1, (20,), dtype=torch.int16)
    plan = _plan(sizes={"user": buffer[:8], "item": buffer[8:]})
    assert torch.equal(DimensionPlan.load(plan.save(tmp_path / "p")).sizes["item"], buffer[8:])


def test_save_rejects_unserialisable_config(tmp_path):
    with pytest.raises(PlanError, match="JSON"):
        _plan(config={"fn": object()}).save(tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_failed_save_keeps_the_old_plan_and_leaves_no_temp_dir(tmp_path, monkeypatch):
    out = _saved(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        _plan(sizes=_sizes(seed=1)).save(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["plan"]
    monkeypatch.undo()
    assert torch.equal(DimensionPlan.load(out).sizes["user"], _plan().sizes["user"])


def test_missing_directory_and_files(tmp_path):
    with pytest.raises(PlanError, match="does not exist"):
        DimensionPlan.load(tmp_path / "nope")
    for name in (MANIFEST_NAME, TENSORS_NAME):
        out = _plan().save(tmp_path / name)
        (out / name).unlink()
        with pytest.raises(PlanError, match=f"{name}: missing plan file"):
            DimensionPlan.load(out)


def test_invalid_json(tmp_path):
    out = _saved(tmp_path)
    (out / MANIFEST_NAME).write_text('{"schema": ')
    with pytest.raises(PlanError, match="plan.json: invalid JSON"):
        DimensionPlan.load(out)
    (out / MANIFEST_NAME).write_text("[1, 2]")
    with pytest.raises(PlanError, match="JSON object"):
        DimensionPlan.load(out)


def test_schema_version_mismatch(tmp_path):
    out = _saved(tmp_path)
    _edit_manifest(out, schema="ciess-prod/dimension-plan/v0")
    with pytest.raises(PlanError, match=r"version mismatch: found 'ciess-prod/dimension-plan/v0', expected"):
        DimensionPlan.load(out)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest["schema"]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PlanError, match="missing 'schema'"):
        DimensionPlan.load(out)


@pytest.mark.parametrize("key", ["d_max", "dataset_fingerprint", "tensors_sha256", "tables", "achieved_sparsity"])
def test_missing_required_key(tmp_path, key):
    out = _saved(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    del manifest[key]
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PlanError, match=f"missing required keys \\['{key}'\\]"):
        DimensionPlan.load(out)


def test_wrongly_typed_key(tmp_path):
    out = _saved(tmp_path)
    _edit_manifest(out, d_max="16")
    with pytest.raises(PlanError, match="'d_max' must be int"):
        DimensionPlan.load(out)


def test_flipped_byte_is_a_checksum_mismatch(tmp_path):
    out = _saved(tmp_path)
    data = bytearray((out / TENSORS_NAME).read_bytes())
    data[-3] ^= 0x01
    (out / TENSORS_NAME).write_bytes(bytes(data))
    with pytest.raises(PlanError, match="sizes.safetensors: checksum mismatch"):
        DimensionPlan.load(out)


def test_truncated_file(tmp_path):
    out = _saved(tmp_path)
    path = out / TENSORS_NAME
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(PlanError, match="checksum mismatch"):
        DimensionPlan.load(out)
    _edit_manifest(out, tensors_sha256=sha256_file(path))  # a consistent checksum of a broken file
    with pytest.raises(PlanError, match="sizes.safetensors: unreadable safetensors file"):
        DimensionPlan.load(out)


def test_table_names_differ(tmp_path):
    out = _saved(tmp_path)
    sizes = _plan().sizes
    _rewrite_tensors(out, {"user": sizes["user"], "items": sizes["item"]})
    with pytest.raises(PlanError, match="differ from the manifest"):
        DimensionPlan.load(out)


def test_row_count_differs(tmp_path):
    out = _saved(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    manifest["tables"]["user"]["rows"] = 31
    (out / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(PlanError, match=r"'user' has shape \[30\], manifest says 31 rows"):
        DimensionPlan.load(out)


def test_float_dtype(tmp_path):
    out = _saved(tmp_path)
    sizes = _plan().sizes
    _rewrite_tensors(out, {"user": sizes["user"].float(), "item": sizes["item"]})
    with pytest.raises(PlanError, match="'user' has dtype torch.float32, expected torch.int16"):
        DimensionPlan.load(out)


@pytest.mark.parametrize("bad", [0, D + 1])
def test_value_out_of_range(tmp_path, bad):
    out = _saved(tmp_path)
    sizes = {k: v.clone() for k, v in _plan().sizes.items()}
    sizes["item"][4] = bad
    _rewrite_tensors(out, sizes)
    with pytest.raises(PlanError, match=rf"'item' has sizes in \[\d+, \d+\], outside \[1, {D}\]"):
        DimensionPlan.load(out)


def test_edited_statistics(tmp_path):
    out = _saved(tmp_path)
    sizes = {k: v.clone() for k, v in _plan().sizes.items()}
    sizes["item"][4] = 1 if sizes["item"][4] > 1 else 2  # in range, checksum fixed, but sum changes
    _rewrite_tensors(out, sizes)
    with pytest.raises(PlanError, match="statistics"):
        DimensionPlan.load(out)


def test_achieved_sparsity_differs(tmp_path):
    out = _saved(tmp_path)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    _edit_manifest(out, achieved_sparsity=manifest["achieved_sparsity"] + 1e-6)
    with pytest.raises(PlanError, match="achieved_sparsity .* differs"):
        DimensionPlan.load(out)


def test_budget_differs(tmp_path):
    out = _saved(tmp_path)
    _edit_manifest(out, budget=1)
    with pytest.raises(PlanError, match="budget 1 differs"):
        DimensionPlan.load(out)


def test_manifest_value_errors_name_the_directory(tmp_path):
    out = _saved(tmp_path)
    _edit_manifest(out, target_sparsity=1.5)
    with pytest.raises(PlanError, match=rf"{out.name}: target_sparsity must lie in \[0, 1\)"):
        DimensionPlan.load(out)


def test_schema_constant_is_written(tmp_path):
    assert json.loads((_saved(tmp_path) / MANIFEST_NAME).read_text())["schema"] == PLAN_SCHEMA


# --- repair ---------------------------------------------------------------------------------------------------


def _total(sizes: dict[str, torch.Tensor]) -> int:
    return sum(int(s.sum(dtype=torch.int64)) for s in sizes.values())


def _keeps_order(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    """Sorting all rows by old size (ties by new size) must leave the new sizes non-decreasing."""
    old = torch.cat([before[k].to(torch.int64) for k in before])
    new = torch.cat([after[k].to(torch.int64) for k in before])
    order = torch.argsort(old * 100_000 + new)
    return bool((new[order].diff() >= 0).all())


def test_repair_fits_keeps_order_and_is_deterministic():
    sizes = _sizes(seed=3, users=300, items=500)
    repaired = repair_to_budget(sizes, D, 0.8)
    budget = budget_for(800, D, 0.8)
    assert _total(sizes) > budget >= _total(repaired)
    assert _total(repaired) > 0.9 * budget  # shrinks only as much as needed
    assert all(repaired[k].shape == sizes[k].shape and repaired[k].dtype == torch.int16 for k in sizes)
    assert all(int(s.min()) >= 1 for s in repaired.values())
    assert _keeps_order(sizes, repaired)
    again = repair_to_budget(sizes, D, 0.8)
    assert all(torch.equal(repaired[k], again[k]) for k in sizes)
    plan = _plan(sizes=repaired, target_sparsity=0.8, repaired=True)
    assert plan.fits_budget()


def test_repair_leaves_fitting_sizes_alone():
    sizes = _sizes(seed=4, hi=4)
    repaired = repair_to_budget(sizes, D, 0.5)
    for k in sizes:
        assert repaired[k].dtype == torch.int16
        assert torch.equal(repaired[k], sizes[k].to(torch.int16))
        assert repaired[k].data_ptr() != sizes[k].data_ptr()


def test_repair_raises_below_one_column_per_row():
    with pytest.raises(PlanError, match="below one column per row"):
        repair_to_budget(_sizes(), D, 1 - 0.5 / D)  # budget of half a column per row
    ones = repair_to_budget(_sizes(), D, 1 - 1 / D)  # exactly one column per row is still possible
    assert all(bool((s == 1).all()) for s in ones.values())


def test_repair_random_cases():
    rng = torch.Generator().manual_seed(123)
    for case in range(50):
        d_max = int(torch.randint(1, 300, (1,), generator=rng))
        tables = {
            f"t{i}": torch.randint(1, d_max + 1, (int(torch.randint(1, 200, (1,), generator=rng)),), generator=rng)
            for i in range(int(torch.randint(1, 4, (1,), generator=rng)))
        }
        c = round(float(torch.rand(1, generator=rng)) * 0.999, 3)
        rows = sum(int(s.numel()) for s in tables.values())
        budget = budget_for(rows, d_max, c)
        if budget < rows:
            with pytest.raises(PlanError):
                repair_to_budget(tables, d_max, c)
            continue
        out = repair_to_budget(tables, d_max, c)
        assert _total(out) <= budget, case
        assert all(int(s.min()) >= 1 and int(s.max()) <= d_max for s in out.values()), case
        assert _keeps_order(tables, out), case
        assert all(bool((out[k] <= tables[k]).all()) for k in tables), case
        if _total(tables) <= budget:
            assert all(torch.equal(out[k], tables[k].to(torch.int16)) for k in tables), case


def test_table_order_must_list_the_tables(tmp_path):
    out = _saved(tmp_path)
    _edit_manifest(out, table_order=["user"])
    with pytest.raises(PlanError, match="table_order"):
        DimensionPlan.load(out)


def test_fill_to_budget_grows_into_the_slack_keeping_order():
    from ciess_prod.search.plan import fill_to_budget

    g = torch.Generator().manual_seed(0)
    sizes = {"user": torch.randint(1, 20, (300,), generator=g).to(torch.int16),
             "item": torch.randint(1, 40, (200,), generator=g).to(torch.int16)}
    filled = fill_to_budget(sizes, 64, 0.6)
    before, after = torch.cat(list(sizes.values())).long(), torch.cat(list(filled.values())).long()
    budget = budget_for(500, 64, 0.6)
    assert int(after.sum()) <= budget < int(before.sum()) + budget  # fits
    assert int(after.sum()) > 0.97 * budget  # and uses nearly all of it
    assert bool((after >= before).all()) and int(after.max()) <= 64
    order = torch.argsort(before, stable=True)
    assert bool((after[order].diff() >= 0).all())  # rows keep their order
    assert all(f.dtype == torch.int16 for f in filled.values())
    full = {"user": torch.full((10,), 64, dtype=torch.int16)}
    assert torch.equal(fill_to_budget(full, 64, 0.0)["user"], full["user"])  # nothing to fill
    with pytest.raises(PlanError, match="exceeds the budget"):
        fill_to_budget(full, 64, 0.5)


def test_even_within_tables_keeps_each_total_and_gives_the_remainder_to_the_largest():
    from ciess_prod.search.plan import even_within_tables

    sizes = {"user": torch.tensor([1, 9, 4, 9, 4], dtype=torch.int16), "item": torch.full((3,), 3, dtype=torch.int16)}
    even = even_within_tables(sizes, 16)
    assert even["user"].tolist() == [5, 6, 5, 6, 5]  # 27 over 5 rows: the two 9s take the remainder
    assert even["item"].tolist() == [3, 3, 3] and all(e.dtype == torch.int16 for e in even.values())
    g = torch.Generator().manual_seed(1)
    wide = {"user": torch.randint(1, 64, (301,), generator=g).to(torch.int16)}
    out = even_within_tables(wide, 64)["user"].long()
    assert int(out.sum()) == int(wide["user"].long().sum()) and int(out.max() - out.min()) <= 1
    up = out > out.min()
    assert int(wide["user"][up].min()) >= int(wide["user"][~up].max())  # the +1s went to the largest rows
    with pytest.raises(PlanError, match=r"sizes must lie in \[1, 16\]"):
        even_within_tables({"user": torch.tensor([0, 3])}, 16)
