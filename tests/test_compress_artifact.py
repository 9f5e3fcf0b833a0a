"""Compressed recommenders and their artifact: scores equal the masked model, bytes add up, bad artifacts refused."""

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from ciess_prod.cli import main
from ciess_prod.compress.artifact import ARTIFACT_SCHEMA, ArtifactError, load_artifact, save_artifact
from ciess_prod.compress.compressor import compress
from ciess_prod.compress.model import CompressedRecommender
from ciess_prod.data import DataConfig, SyntheticConfig, load_dataset
from ciess_prod.experiment import ExperimentConfig, SizeConfig, run_experiment
from ciess_prod.models import SIDES, ModelConfig, build_model
from ciess_prod.search.plan import DimensionPlan, PlanError
from ciess_prod.train.trainer import TrainConfig

KINDS = ("mf", "neumf", "ngcf", "lightgcn")
DATA = DataConfig(synthetic=SyntheticConfig(n_users=120, n_items=90, interactions_per_user=12, n_factors=4))


def sized_model(kind: str, seed: int = 0):
    """A model with random weights (larger than the init so quantisation error is visible) and sizes in [1, 16]."""
    dataset = load_dataset(DATA)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(kind=kind, d_max=16, n_layers=2, mlp_layers=(24, 8)), 120, 90, dataset.train)
    with torch.no_grad():
        for name in model.tables:
            model.table_weight(name).normal_()
    for side, n in (("user", 120), ("item", 90)):
        sizes = torch.randint(1, 17, (n,), dtype=torch.int32)
        sizes[:2] = torch.tensor([1, 16], dtype=torch.int32)
        model.set_row_sizes(side, sizes)
    return model.eval()


@pytest.mark.parametrize("kind", KINDS)
def test_fp32_scores_equal_the_masked_model_bit_for_bit(kind, one_torch_thread):
    model = sized_model(kind)
    compressed = CompressedRecommender.from_model(model, "fp32")
    users = torch.tensor([0, 1, 5, 119, 5])
    with torch.no_grad():
        expected = model.score_users(users)
    assert torch.equal(compressed.score_users(users), expected)


def test_lightgcn_propagates_and_holds_only_the_widest_rows_columns(one_torch_thread):
    model = sized_model("lightgcn")
    for side in SIDES:
        model.set_row_sizes(side, model.row_sizes(side).clamp(max=6))
    compressed = CompressedRecommender.from_model(model, "fp32")
    users = torch.arange(120)
    with torch.no_grad():
        expected = model.score_users(users)
    assert torch.equal(compressed.score_users(users), expected)
    user_final, item_final = compressed.propagated()
    assert user_final.shape == (120, 6) and item_final.shape == (90, 6)
    assert compressed.nbytes()["propagated_bytes"] == (120 + 90) * 6 * 4


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("dtype", "tolerance"), [("fp16", 2e-2), ("int8", 0.15), ("int4", 2.5)])
def test_quantised_scores_stay_close(kind, dtype, tolerance, one_torch_thread):
    """Loose bounds (scores are sums of ~16 products of N(0, 1) values); the ML-1M benchmark measures the metrics."""
    model = sized_model(kind)
    users = torch.arange(0, 120, 7)
    with torch.no_grad():
        expected = model.score_users(users)
    got = CompressedRecommender.from_model(model, dtype).score_users(users)
    scale = float(expected.abs().max())
    assert float((got - expected).abs().max()) <= tolerance * max(scale, 1.0)


@pytest.mark.parametrize("kind", KINDS)
def test_artifact_round_trip_and_byte_accounting(kind, tmp_path, one_torch_thread):
    model = sized_model(kind)
    compressed = CompressedRecommender.from_model(model, "int8")
    manifest = save_artifact(compressed, tmp_path / "a", {"note": "test"})
    loaded = load_artifact(tmp_path / "a")
    users = torch.arange(120)
    assert torch.equal(loaded.model.score_users(users), compressed.score_users(users))
    b = manifest["bytes"]
    sizes = {s: model.row_sizes(s).to(torch.int64) for s in SIDES}
    n_tables = len(model.tables)
    total_values = sum(int(sizes[side].sum()) for side in model.tables.values())
    assert b["ideal_bytes"] == total_values  # int8: one byte per kept value
    rows = sum(model.n_rows[side] for side in model.tables.values())
    offsets = n_tables * 8 + (rows + n_tables) * 2  # one int64 block offset (d_max 16: 4096 rows) + uint16 locals
    assert b["compressed_bytes"] == total_values + offsets + rows * 8  # + offsets, fp32 scale/bias
    assert b["dense_bytes"] == rows * 16 * 4
    hist = manifest["tables"][next(iter(model.tables))]["size_histogram"]
    assert sum(hist.values()) == model.n_rows[next(iter(model.tables.values()))]
    assert (b["graph_bytes"] > 0) == (kind in ("ngcf", "lightgcn"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", ["fp32", "int4"])
def test_cuda_scores_and_lookups_match_cpu(kind, dtype):
    cpu = CompressedRecommender.from_model(sized_model(kind), dtype)
    users = torch.arange(0, 120, 3)
    expected = cpu.score_users(users)
    table = next(iter(cpu.tables.values()))
    ids, bags = torch.randint(0, table.num_rows, (200,)), torch.arange(0, 200, 5)
    lookup, pooled = table.lookup(ids), table.pooled(ids, bags, mode="mean")
    gpu = cpu.to("cuda")
    gpu_table = next(iter(gpu.tables.values()))
    assert torch.equal(gpu_table.lookup(ids.cuda()).cpu(), lookup)
    torch.testing.assert_close(gpu_table.pooled(ids.cuda(), bags.cuda(), mode="mean").cpu(), pooled)
    torch.testing.assert_close(gpu.score_users(users.cuda()).cpu(), expected, rtol=1e-5, atol=1e-5)


# ---- refusing bad artifacts -----------------------------------------------------------------------------------
@pytest.fixture
def artifact(tmp_path):
    compressed = CompressedRecommender.from_model(sized_model("ngcf"), "fp32")
    save_artifact(compressed, tmp_path / "good", {})
    return tmp_path / "good"


def _rewrite_manifest(path: Path, change) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    change(manifest)
    (path / "manifest.json").write_text(json.dumps(manifest))


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))


def _retensor(directory: Path, edit) -> None:
    """Rewrites tables.safetensors through ``edit`` and re-signs it, so only the content check can object."""
    path = directory / "tables.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    edit(tensors)
    safetensors.torch.save_file(tensors, str(path))
    from ciess_prod.io import sha256_file

    _rewrite_manifest(
        directory,
        lambda m: m["files"].update({path.name: {"sha256": sha256_file(path), "bytes": path.stat().st_size}}),
    )


CORRUPTIONS = {
    "no manifest": (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    "manifest not JSON": (lambda p: (p / "manifest.json").write_text("{oops"), "invalid JSON"),
    "other schema version": (
        lambda p: _rewrite_manifest(p, lambda m: m.update(schema="ciess-prod/artifact/v0")),
        "schema version mismatch",
    ),
    "tampered tables": (lambda p: _flip_byte(p / "tables.safetensors"), "sha256 does not match"),
    "truncated dense": (
        lambda p: (p / "dense.safetensors").write_bytes((p / "dense.safetensors").read_bytes()[:100]),
        "truncated",
    ),
    "missing file": (lambda p: (p / "dense.safetensors").unlink(), "missing artifact file"),
    "unknown model kind": (
        lambda p: _rewrite_manifest(p, lambda m: m["model"].update(kind="bert")),
        "model config unusable",
    ),
    "wrong row count": (lambda p: _rewrite_manifest(p, lambda m: m.update(n_users=121)), "rows"),
    "extra tensor": (lambda p: _retensor(p, lambda t: t.update(extra=torch.zeros(3))), "unexpected tensors"),
    "wrong dtype": (
        lambda p: _retensor(p, lambda t: t.update({"user.values": t["user.values"].double()})),
        "values must be",
    ),
    "offsets out of order": (
        lambda p: _retensor(p, lambda t: t["item.local_offsets"].__setitem__(3, 30000)),
        "table item",
    ),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_bad_artifacts_are_refused_with_a_clear_error(name, artifact):
    corrupt, message = CORRUPTIONS[name]
    corrupt(artifact)
    with pytest.raises(ArtifactError, match=message):
        load_artifact(artifact)


def test_failed_save_keeps_the_previous_artifact(artifact, monkeypatch):
    before = (artifact / "manifest.json").read_text()
    compressed = CompressedRecommender.from_model(sized_model("mf"), "fp16")

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        save_artifact(compressed, artifact, {})
    assert (artifact / "manifest.json").read_text() == before
    assert load_artifact(artifact).manifest["schema"] == ARTIFACT_SCHEMA
    assert not [p for p in artifact.parent.iterdir() if p.name.startswith(".")]  # no temp directory left


# ---- checkpoint + plan -> artifact (the `ciess compress` path) ----------------------------------------------------
@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny LightGCN trained at uniform sizes under the final protocol, and the plan of those sizes."""
    root = tmp_path_factory.mktemp("compress")
    config = ExperimentConfig(
        data=DATA,
        model=ModelConfig(kind="lightgcn", d_max=16, n_layers=1),
        train=TrainConfig(lr=0.01, batch_size=512, max_batches=20, eval_every=10, patience=1, progress=False),
        sizes=SizeConfig(method="es", sparsity=0.75),
        protocol="final",
        output_dir=str(root / "run"),
    )
    metrics = run_experiment(config)
    sizes = {side: torch.full((n,), 4, dtype=torch.int16) for side, n in (("user", 120), ("item", 90))}
    plan = DimensionPlan(
        sizes=sizes, d_max=16, model="lightgcn", dataset_fingerprint=metrics["dataset_fingerprint"],
        target_sparsity=0.75, metrics={"test": metrics["test"]}, seed=0, config={},
    )
    plan.save(root / "plan")
    return root, metrics


def test_compress_writes_an_artifact_that_scores_like_the_checkpoint(trained, one_torch_thread):
    root, metrics = trained
    manifest = compress(root / "plan", root / "run" / "checkpoint", "fp32", root / "artifact")
    assert manifest["provenance"]["checkpoint"]["trained_on"] == "train+val"
    assert manifest["bytes"]["compressed_bytes"] <= 1.10 * manifest["bytes"]["ideal_bytes"] + 4 * (210 + 2)
    from ciess_prod.train.protocol import split_metrics

    dataset = load_dataset(DATA).with_validation_merged()
    model = load_artifact(root / "artifact").model
    assert split_metrics(model, dataset, "test", 1024) == pytest.approx(metrics["test"], abs=1e-12)


def test_compress_refuses_a_plan_the_checkpoint_was_not_trained_with(trained, tmp_path):
    root, _ = trained
    plan = DimensionPlan.load(root / "plan")
    plan = dataclasses.replace(plan, sizes={**plan.sizes, "user": torch.full((120,), 3, dtype=torch.int16)})
    plan.save(tmp_path / "other")
    with pytest.raises(PlanError, match="120 user rows of the checkpoint have other sizes"):
        compress(tmp_path / "other", root / "run" / "checkpoint", "fp32", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_compress_cli(trained, tmp_path, capsys):
    root, _ = trained
    code = main(["compress", "--plan", str(root / "plan"), "--checkpoint", str(root / "run" / "checkpoint"),
                 "--dtype", "int4", "--out", str(tmp_path / "a")])
    assert code == 0 and "int4 tables" in capsys.readouterr().out
    assert load_artifact(tmp_path / "a").model.dtype == "int4"
    shutil.copy(tmp_path / "a" / "manifest.json", tmp_path / "a" / "tables.safetensors")  # garbage in place
    code = main(["compress", "--plan", str(tmp_path / "a"), "--checkpoint", str(root / "run" / "checkpoint"),
                 "--out", str(tmp_path / "b")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ciess: error:") and len(err.strip().splitlines()) == 1
