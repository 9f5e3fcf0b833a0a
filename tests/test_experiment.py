"""End to end on the embedded synthetic data: train, checkpoint, evaluate, CLI, and config validation."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ciess_prod.cli import main
from ciess_prod.config import ConfigError, from_dict, load_yaml
from ciess_prod.data import SplitConfig, SyntheticConfig
from ciess_prod.eval.metrics import rank_users
from ciess_prod.experiment import (
    DataConfig,
    ExperimentConfig,
    SizeConfig,
    evaluate_checkpoint,
    load_dataset,
    run_experiment,
)
from ciess_prod.models import ModelConfig
from ciess_prod.train.checkpoint import CheckpointError
from ciess_prod.train.trainer import TrainConfig

SMALL_DATA = DataConfig(
    synthetic=SyntheticConfig(n_users=400, n_items=300, interactions_per_user=30, n_factors=8, affinity_scale=5.0)
)
FAST_TRAIN = TrainConfig(lr=0.01, batch_size=1024, max_batches=150, eval_every=50, patience=2, progress=False)


def _config(tmp_path: Path, kind: str = "mf", **changes) -> ExperimentConfig:
    config = ExperimentConfig(
        data=SMALL_DATA,
        model=ModelConfig(kind=kind, d_max=16, mlp_layers=(32, 16)),
        train=FAST_TRAIN,
        output_dir=str(tmp_path / "run"),
    )
    return dataclasses.replace(config, **changes)


def test_trained_model_clearly_beats_popularity(tmp_path):
    config = _config(tmp_path, kind="lightgcn")
    metrics = run_experiment(config)
    dataset = load_dataset(config.data)
    popularity = torch.from_numpy(dataset.item_popularity().astype(np.float32))
    pop = rank_users(lambda u: popularity.expand(len(u), -1), dataset.test, [dataset.train, dataset.val]).mean()
    assert metrics["test"]["recall@20"] > 1.3 * pop["recall@20"], (metrics["test"], pop)
    assert metrics["test"]["ndcg@20"] > 1.3 * pop["ndcg@20"]


@pytest.mark.parametrize("kind", ["mf", "neumf", "ngcf", "lightgcn"])
def test_every_model_trains_and_its_checkpoint_reloads(tmp_path, kind):
    config = _config(tmp_path, kind=kind, sizes=SizeConfig("es", 0.75))
    metrics = run_experiment(config)
    assert metrics["achieved_sparsity"] == pytest.approx(0.75)
    assert metrics["test"]["recall@20"] > 0
    reloaded = evaluate_checkpoint(Path(config.output_dir) / "checkpoint", "test")
    assert reloaded == pytest.approx(metrics["test"], abs=1e-9)


def test_final_protocol_retrains_on_train_and_validation(tmp_path):
    config = _config(tmp_path, protocol="final")
    metrics = run_experiment(config)
    assert metrics["protocol"] == "final" and metrics["best_batches"] >= FAST_TRAIN.eval_every
    checkpoint = Path(config.output_dir) / "checkpoint"
    assert evaluate_checkpoint(checkpoint, "test") == pytest.approx(metrics["test"], abs=1e-9)
    with pytest.raises(CheckpointError, match="train\\+validation"):
        evaluate_checkpoint(checkpoint, "val")


def test_final_protocol_tests_the_l2_weight_best_on_validation(tmp_path):
    """retrain.l2: one early-stopped fit per weight (at retrain's cap and patience); the best on validation is the
    one retrained and tested, whatever its place in the list."""
    from ciess_prod.experiment import sized_model
    from ciess_prod.train.protocol import RetrainConfig, fit_on_train

    retrain = RetrainConfig(l2=(30.0, 0.0), max_batches=100, patience=1)
    recipes = retrain.recipes(FAST_TRAIN)
    assert [(r.l2, r.max_batches, r.patience) for r in recipes] == [(30.0, 100, 1), (0.0, 100, 1)]
    assert RetrainConfig().recipes(FAST_TRAIN) == [FAST_TRAIN]  # no departure: the recipe itself
    config = _config(tmp_path, protocol="final", retrain=retrain)
    metrics = run_experiment(config)
    dataset = load_dataset(config.data)
    val = {r.l2: fit_on_train(dataset, lambda d: sized_model(config, d), r)[2]["recall@20"] for r in recipes}
    assert val[0.0] > val[30.0] and metrics["l2"] == 0.0  # the weight that crushes the embeddings loses
    assert metrics["val"]["recall@20"] == pytest.approx(val[0.0], abs=1e-12)
    assert evaluate_checkpoint(Path(config.output_dir) / "checkpoint", "test") == pytest.approx(metrics["test"],
                                                                                               abs=1e-9)


def test_checkpoint_tampering_and_data_changes_are_refused(tmp_path):
    config = _config(tmp_path)
    run_experiment(config)
    checkpoint = Path(config.output_dir) / "checkpoint"
    manifest = json.loads((checkpoint / "checkpoint.json").read_text())
    manifest["config"]["data"]["split"]["seed"] = 1
    (checkpoint / "checkpoint.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="fingerprint"):
        evaluate_checkpoint(checkpoint, "test")
    with open(checkpoint / "model.safetensors", "r+b") as f:
        f.seek(-8, 2)
        f.write(b"\x00" * 8)
    with pytest.raises(CheckpointError, match="sha256"):
        evaluate_checkpoint(checkpoint, "test")


def test_cli_train_then_evaluate(tmp_path, capsys):
    config = _config(tmp_path)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(json.loads(json.dumps(dataclasses.asdict(config)))))
    assert main(["train", "--config", str(path)]) == 0
    assert main(["evaluate", "--checkpoint", str(tmp_path / "run" / "checkpoint"), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert '"split": "val"' in out and "recall@20" in out


def test_cli_reports_bad_config_in_one_line(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text("model: {kind: lightgcn, d_maxx: 64}\n")
    assert main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "d_maxx" in err and str(path) in err and "\n" not in err


def test_cli_search_points_sharded_configs_to_torchrun(tmp_path, capsys):
    path = tmp_path / "ctr.yaml"
    path.write_text((Path(__file__).resolve().parent.parent / "configs" / "ctr-smoke.yaml").read_text())
    assert main(["search", "--config", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "['sharding', 'task']" in err and "training/search.py" in err and str(path) in err and "\n" not in err


@pytest.mark.parametrize(
    "data, message",
    [
        ({"model": {"kind": "transformer"}}, "model.kind"),
        ({"train": {"lr": -1}}, "lr must be > 0"),
        ({"train": {"batch_size": "big"}}, "train.batch_size: expected an integer"),
        ({"sizes": {"method": "es", "sparsity": 1.5}}, "sparsity"),
        ({"data": {"source": "ml-1m"}}, "data.path is required"),
        ({"data": {"split": {"train": 0.9, "val": 0.3, "test": 0.3}}}, "data.split"),
        ({"protocol": "whatever"}, "protocol"),
        ({"retrain": {"l2": [0.001, 0.001]}}, "retrain.l2 must be distinct weights >= 0"),
        ({"retrain": {"l2": [-1.0]}}, "retrain.l2 must be distinct weights >= 0"),
        ({"retrain": {"patience": 0}}, "retrain.patience must be >= 1"),
    ],
)
def test_config_validation_names_the_problem(data, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(ExperimentConfig, data)


def test_committed_configs_load():
    from ciess_prod.distributed.ctr import CTRSearchExperimentConfig
    from ciess_prod.distributed.recommender import ShardedSearchExperimentConfig
    from ciess_prod.search.config import SearchExperimentConfig

    for path in sorted(Path(__file__).resolve().parent.parent.glob("configs/*.yaml")):
        raw = yaml.safe_load(path.read_text())
        if raw.get("task") == "ctr":
            kind = CTRSearchExperimentConfig
        else:
            kind = SearchExperimentConfig if "search" in raw else ExperimentConfig
        assert isinstance(load_yaml(kind, path), kind), path
        if kind is SearchExperimentConfig and path.name in SINGLE_PROCESS_ONLY:  # refused sharded, with the reason
            with pytest.raises(ConfigError, match="not supported by the sharded search"):
                load_yaml(ShardedSearchExperimentConfig, path)
        elif kind is SearchExperimentConfig:  # every other search config runs sharded as well
            assert isinstance(load_yaml(ShardedSearchExperimentConfig, path), ShardedSearchExperimentConfig), path


# fill_budget etc.: one process only
SINGLE_PROCESS_ONLY = {"ml1m-search-scaled.yaml", "ml1m-search-tracked.yaml", "ml1m-search-even.yaml",
                       "ml1m-search-even-spread.yaml", "ml1m-search-even-spread-top3.yaml",
                       "ml1m-search-full-probe.yaml"}


def test_cli_fetch_fails_cleanly_offline(tmp_path, capsys, monkeypatch):
    import urllib.request

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    assert main(["data", "fetch", "ml-100k", "--dest", str(tmp_path), "--timeout", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "ml-100k" in err and "\n" not in err


def test_split_config_is_honoured():
    dataset = load_dataset(dataclasses.replace(SMALL_DATA, split=SplitConfig(0.6, 0.2, 0.2, seed=3)))
    total = dataset.train.nnz + dataset.val.nnz + dataset.test.nnz
    assert dataset.train.nnz / total == pytest.approx(0.6, abs=0.03)


@pytest.mark.parametrize(("change", "message"), [
    ({"environment": {"item_quality": "hits"}}, "item_quality 'hits' is not supported by the sharded search"),
    ({"fill_budget": True}, "fill_budget and search.reward 'code' are not supported"),
    ({"candidates_from": "loosest"}, "candidates_from 'loosest' and search.within_side 'even' are not supported"),
    ({"within_side": "even"}, "candidates_from 'loosest' and search.within_side 'even' are not supported"),
    ({"probe_top": 4}, "probe_top and an adapted search.penalty_control"),
    ({"penalty_control": "loosest"}, "probe_top and an adapted search.penalty_control"),
    ({"penalty_control": "signed"}, "probe_top and an adapted search.penalty_control"),
])
def test_the_ctr_search_refuses_single_process_only_options(change, message):
    from ciess_prod.distributed.ctr import CTRSearchExperimentConfig

    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "configs" / "ctr-smoke.yaml").read_text())
    raw["search"] = {**raw.get("search", {}), **change}
    with pytest.raises(Exception, match=message):
        from_dict(CTRSearchExperimentConfig, raw)
