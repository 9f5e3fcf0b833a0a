"""The sharded user/item recommender search under torchrun: 1 vs 2 processes, exported models, sharding types,
kill-and-resume, and what the sharded path refuses."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from searchrun import ROOT, TINY_SEARCH, assert_same_search, run_search

from ciess_prod.experiment import evaluate_checkpoint
from ciess_prod.search import DimensionPlan
from ciess_prod.search.config import SearchConfig
from ciess_prod.search.exploration import ExplorationConfig, Explorer

TINY = {
    "data": {
        "source": "synthetic",
        "synthetic": {"n_users": 300, "n_items": 200, "interactions_per_user": 20, "n_factors": 8,
                      "affinity_scale": 5.0, "seed": 0},
    },
    "model": {"kind": "lightgcn", "d_max": 16, "n_layers": 2},
    "train": {"lr": 0.01, "batch_size": 512, "max_batches": 80, "eval_every": 20, "patience": 2, "eval_chunk": 64},
    "sharding": {"default": "row_wise", "lr": 0.05},
    "item_piece": 48,  # several pieces per owner: the streamed ranking merges across pieces and ranks
    "search": TINY_SEARCH,
    "protocol": "final",
}


def run(tmp_path: Path, name: str, nproc: int, extra_args=(), env_extra=None, script_args=(), **changes) -> Path:
    return run_search(TINY, tmp_path, name, nproc, extra_args, env_extra, script_args, **changes)


def plans(out: Path) -> dict[float, DimensionPlan]:
    return {c: DimensionPlan.load(out / "plans" / f"c{c:.2f}") for c in TINY["search"]["budgets"]}


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rec")
    return run(tmp, "one", 1, script_args=["--sharded"]), run(tmp, "two", 2)


@pytest.mark.distributed
def test_one_and_two_processes_agree_within_the_documented_tolerance(one_and_two):
    one, two = one_and_two
    s1, s2 = (json.loads((o / "search.json").read_text()) for o in (one, two))
    assert s1["world_size"] == 1 and s2["world_size"] == 2
    # The same model: hashed initialisation, the same global batches; only float reduction order differs.
    assert s2["reference_val_recall@20"] == pytest.approx(s1["reference_val_recall@20"], abs=2e-3)
    for c, p1 in plans(one).items():
        p2 = plans(two)[c]
        assert p1.fits_budget() and p2.fits_budget()
        assert p2.achieved_sparsity == pytest.approx(p1.achieved_sparsity, abs=0.05)
        assert p2.metrics["test"]["recall@20"] == pytest.approx(p1.metrics["test"]["recall@20"], rel=0.15)
    assert s2["agent_replicas_identical"] is True


@pytest.mark.distributed
def test_plans_have_the_single_process_format_and_their_models_reproduce_the_test_metrics(one_and_two):
    _, two = one_and_two
    for c, plan in plans(two).items():
        assert plan.model == "lightgcn" and plan.target_sparsity == c
        assert {t: len(s) for t, s in plan.sizes.items()} == {"user": 300, "item": 200}
        assert all(s.dtype == torch.int16 and int(s.min()) >= 1 for s in plan.sizes.values())
        # the exported single-process LightGCN, scored by the single-process ranking (train+validation merged
        # under "final"), gives exactly the metrics the sharded, streamed ranking measured
        model_dir = two / "models" / f"c{c:.2f}"
        assert evaluate_checkpoint(model_dir, "test") == pytest.approx(plan.metrics["test"], abs=1e-9)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["table_wise", "column_wise", "table_row_wise"])
def test_every_sharding_type_runs_the_search(kind, tmp_path):
    # step 0 takes uniform sizes: this runs the sharded warm-up path on two ranks (its draws are checked exactly on
    # one rank below, since an untrained actor's sizes have about the same mean here)
    search = {**TINY["search"], "episodes": 1, "exploration": {"random_steps": 1}}
    out = run(tmp_path, kind, 2, sharding={"default": kind}, search=search, protocol="train_only")
    summary = json.loads((out / "search.json").read_text())
    assert set(summary["sharding"].values()) == {kind}
    for c, plan in plans(out).items():
        assert plan.fits_budget()
        assert evaluate_checkpoint(out / "models" / f"c{c:.2f}", "test") == pytest.approx(plan.metrics["test"],
                                                                                           abs=1e-9)


@pytest.mark.distributed
def test_the_sharded_warm_up_takes_the_seeded_explorers_uniform_draws(tmp_path):
    # one process holds every row, in table order, so step 0's sizes are exactly its explorer's draws (seed + 1)
    search = {**TINY["search"], "episodes": 1, "exploration": {"random_steps": 1}}
    out = run(tmp_path, "warm-up", 1, script_args=["--sharded"], search=search, protocol="train_only")
    history = json.loads((out / "history.json").read_text())["history"]
    d_max, n_rows = TINY["model"]["d_max"], 300 + 200
    explorer = Explorer(ExplorationConfig(random_steps=1), d_max, n_rows, seed=SearchConfig().seed + 1)
    drawn = explorer.uniform(n_rows).double().sum().item()
    assert history[0]["sparsity"] == pytest.approx(1 - drawn / (n_rows * d_max), abs=1e-12)
    assert history[1]["sparsity"] != pytest.approx(1 - explorer.uniform(n_rows).double().sum().item()
                                                   / (n_rows * d_max), abs=1e-12)  # step 1: the actor's sizes


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["mf", "ngcf", "neumf"])
def test_every_other_sharded_model_kind_runs(kind, tmp_path):
    model = {"kind": kind, "d_max": 16, "n_layers": 2, "dropout": 0.1, "mlp_layers": [32, 16]}
    out = run(tmp_path, kind, 2, model=model, search={**TINY["search"], "episodes": 1})
    for c, plan in plans(out).items():
        assert plan.model == kind and plan.fits_budget()
        # NGCF's layers and NeuMF's head (replicated) travel with the gathered tables into the single-process model
        assert evaluate_checkpoint(out / "models" / f"c{c:.2f}", "test") == pytest.approx(plan.metrics["test"],
                                                                                           abs=1e-9)


@pytest.mark.distributed
def test_neumf_tables_of_one_side_may_be_sharded_differently(tmp_path):
    """A user's GMF row (table-wise, on one rank) and MLP row (row-wise, split) share one size: the rank keeping
    the user's state sends it to wherever the other table holds the row."""
    model = {"kind": "neumf", "d_max": 16, "mlp_layers": [32, 16]}
    sharding = {"default": "table_wise", "tables": {"user_mlp": "row_wise", "item_mlp": "column_wise"}, "lr": 0.05}
    out = run(tmp_path, "mixed", 2, model=model, sharding=sharding, search={**TINY["search"], "episodes": 1},
              protocol="train_only")
    summary = json.loads((out / "search.json").read_text())
    assert summary["sharding"]["user_mlp"] == "row_wise" and summary["sharding"]["user_gmf"] == "table_wise"
    for c, plan in plans(out).items():
        assert plan.fits_budget() and set(plan.sizes) == {"user", "item"}
        assert evaluate_checkpoint(out / "models" / f"c{c:.2f}", "test") == pytest.approx(plan.metrics["test"],
                                                                                           abs=1e-9)


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["lightgcn", "ngcf"])
def test_killed_rank_resumes_to_the_uninterrupted_plan(kind, tmp_path, one_and_two):
    """Rank 1 SIGKILLs itself after step 2; the restarted group reloads the reference (NGCF: its layer weights
    too) and the step checkpoint, and ends exactly where an uninterrupted run does."""
    model = {**TINY["model"], "kind": kind}
    uninterrupted = one_and_two[1] if kind == "lightgcn" else run(tmp_path, "whole", 2, model=model)
    out = run(tmp_path, "killed", 2, extra_args=["--max-restarts=1"], env_extra={"CIESS_FAIL_AT_STEP": "2"},
              model=model)
    assert_same_search(out, uninterrupted, TINY["search"]["budgets"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sharding": {"default": "diagonal"}}, "sharding.default: 'diagonal' is not one of"),
        ({"search": {**TINY["search"], "fill_budget": True}}, "fill_budget"),
        ({"search": {**TINY["search"], "candidates_from": "loosest"}}, "candidates_from 'loosest' and"),
        ({"search": {**TINY["search"], "within_side": "even"}}, "within_side 'even' are not supported"),
        ({"search": {**TINY["search"], "environment": {"item_quality": "hits"}}}, "item_quality 'hits'"),
        ({"search": {**TINY["search"], "environment": {"reference_basis": "principal"}}}, "reference_basis"),
        ({"item_piece": 0}, "item_piece"),
    ],
)
def test_the_sharded_config_refuses_what_it_cannot_run(change, message):
    from ciess_prod.config import from_dict
    from ciess_prod.distributed.recommender import ShardedSearchExperimentConfig

    with pytest.raises(Exception, match=message):
        from_dict(ShardedSearchExperimentConfig, {**TINY, **change})


@pytest.mark.distributed
def test_the_smoke_config_runs_on_two_processes(tmp_path):
    """The README's command: the smoke config as shipped, only the output redirected."""
    smoke = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    out = run_search(smoke, tmp_path, "smoke", 2)
    summary = json.loads((out / "search.json").read_text())
    assert summary["world_size"] == 2 and summary["completed_steps"] == 20
    for c in smoke["search"]["budgets"]:
        plan = DimensionPlan.load(out / "plans" / f"c{c:.2f}")
        assert plan.model == "lightgcn" and plan.fits_budget()
        assert (out / "models" / f"c{c:.2f}" / "checkpoint.json").is_file()
