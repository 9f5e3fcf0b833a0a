"""The sharded CTR search under torchrun: 1 vs 2 processes, every sharding type, kill-and-resume, checkpoints."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from searchrun import ROOT, TINY_SEARCH, assert_same_search, launch, run_search

from ciess_prod.distributed.checkpoint import latest_step
from ciess_prod.search import DimensionPlan

TINY = {
    "task": "ctr",
    "data": {
        "source": "synthetic",
        "synthetic": {"n_examples": 6000, "n_dense": 3, "table_sizes": [800, 200, 60], "bag_lengths": [1, 2, 3]},
    },
    "model": {"d_max": 32, "bottom_mlp": [16, 32], "top_mlp": [16]},
    "sharding": {"default": "auto"},
    "train": {"batch_size": 256, "reference_batches": 40, "final_batches": 40, "eval_batch": 2048},
    "search": TINY_SEARCH,
}


def run(tmp_path: Path, name: str, nproc: int, extra_args=(), env_extra=None, **changes) -> Path:
    return run_search(TINY, tmp_path, name, nproc, extra_args, env_extra, **changes)


def plans(out: Path) -> dict[float, DimensionPlan]:
    return {c: DimensionPlan.load(out / "plans" / f"c{c:.2f}") for c in TINY["search"]["budgets"]}


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ctr")
    return run(tmp, "one", 1), run(tmp, "two", 2)


@pytest.mark.distributed
def test_one_and_two_processes_agree_within_the_documented_tolerance(one_and_two):
    one, two = one_and_two
    s1, s2 = (json.loads((o / "search.json").read_text()) for o in (one, two))
    # The same model: hashed initialisation, the same global batches; only float reduction order differs.
    assert s2["reference_val_logloss"] == pytest.approx(s1["reference_val_logloss"], abs=1e-3)
    for c, p1 in plans(one).items():
        p2 = plans(two)[c]
        assert set(p1.sizes) == set(p2.sizes) and len(p1.sizes) == 3  # one table per synthetic feature
        assert p1.fits_budget() and p2.fits_budget()
        assert p2.achieved_sparsity == pytest.approx(p1.achieved_sparsity, abs=0.05)
        assert p2.metrics["test"]["logloss"] == pytest.approx(p1.metrics["test"]["logloss"], rel=0.03)
    assert s2["world_size"] == 2 and len(s2["peak_rss_mb_per_rank"]) == 2
    assert s2["agent_replicas_identical"] is True  # all-reduced gradients keep the replicated agents equal


@pytest.mark.distributed
def test_plans_have_the_single_process_format(one_and_two):
    _, two = one_and_two
    for c, plan in plans(two).items():
        assert plan.model == "dlrm" and plan.target_sparsity == c
        assert all(s.dtype == torch.int16 and int(s.min()) >= 1 for s in plan.sizes.values())
        assert {"logloss", "auc"} <= set(plan.metrics["test"])


@pytest.mark.distributed
@pytest.mark.parametrize("kind", ["table_wise", "row_wise", "column_wise", "table_row_wise"])
def test_every_sharding_type_runs_the_search(kind, tmp_path):
    out = run(tmp_path, kind, 2, sharding={"default": kind}, search={"episodes": 1})
    summary = json.loads((out / "search.json").read_text())
    assert set(summary["sharding"].values()) == {kind}
    assert all(plan.fits_budget() for plan in plans(out).values())


@pytest.mark.distributed
def test_killed_rank_resumes_to_the_uninterrupted_plan(tmp_path, one_and_two):
    """Rank 1 SIGKILLs itself after step 2 on the first attempt; torchrun restarts the group, which resumes."""
    _, two = one_and_two
    out = run(tmp_path, "killed", 2, extra_args=["--max-restarts=1"], env_extra={"CIESS_FAIL_AT_STEP": "2"})
    assert_same_search(out, two, TINY["search"]["budgets"])


@pytest.mark.distributed
def test_resume_refuses_checkpoints_saved_with_other_settings(tmp_path, one_and_two):
    """--resume keeps what decided the saved steps, the number of ranks included; a fresh start in the same
    directory retrains a reference of another recipe and leaves no later step of the old run to resume."""
    one, _ = one_and_two
    shutil.copytree(one, tmp_path / "copy")
    saved = (tmp_path / "copy" / "settings.json").read_text()
    done, _ = launch(TINY, tmp_path, "copy", 1, script_args=["--resume"], search={"seed": 5})
    assert done.returncode != 0 and "exitcode  : 2" in done.stderr, done.stderr[-3000:]  # torchrun's own code: 1
    assert f"the checkpoints in {tmp_path / 'copy'} was saved with other settings" in done.stderr
    assert "search.seed: saved 0, now 5" in done.stderr and "world_size" not in done.stderr
    done, _ = launch(TINY, tmp_path, "copy", 2, script_args=["--resume"])
    assert done.returncode != 0 and "world_size: saved 1, now 2" in done.stderr, done.stderr[-3000:]
    assert (tmp_path / "copy" / "settings.json").read_text() == saved

    out = run(tmp_path, "copy", 1, train={"reference_batches": 20}, search={"episodes": 1})
    fresh, old = (json.loads((o / "search.json").read_text()) for o in (out, one))
    assert fresh["reference_val_logloss"] != old["reference_val_logloss"]  # retrained with 20 batches, not reused
    assert latest_step(out / "checkpoints") == 3  # the old run's step 6 is gone with it
    assert json.loads((out / "settings.json").read_text())["train"]["reference_batches"] == 20


@pytest.mark.distributed
def test_paper_protocol_trains_each_step_from_scratch(tmp_path):
    out = run(tmp_path, "paper", 1, search={"episodes": 1, "environment": {"protocol": "paper", "batches": 5}})
    history = json.loads((out / "history.json").read_text())["history"]
    summary = json.loads((out / "search.json").read_text())
    # five batches from a fresh model score far worse than the trained reference they would warm-start from
    assert min(h["val_logloss"] for h in history) > summary["reference_val_logloss"]
    assert all(plan.fits_budget() for plan in plans(out).values())


def test_auc_matches_pairwise_counting():
    from ciess_prod.distributed.ctr import auc

    g = torch.Generator().manual_seed(0)
    scores = torch.randint(0, 5, (60,), generator=g).double()  # many ties
    labels = (torch.rand(60, generator=g) < 0.4).double()
    pos, neg = scores[labels > 0.5], scores[labels < 0.5]
    pairs = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    assert auc(scores, labels) == pytest.approx(float(pairs.mean()), abs=1e-12)
    assert auc(scores, torch.ones(60)) != auc(scores, torch.ones(60))  # NaN with one class


@pytest.mark.distributed
def test_compress_and_export_the_sharded_search_model(one_and_two, tmp_path):
    """plans/cX + models/cX of a 2-rank run -> artifact whose test log-loss is the plan's, -> ONNX."""
    import onnxruntime as ort
    import torch.nn.functional as F

    from ciess_prod.cli import main
    from ciess_prod.compress.artifact import load_artifact
    from ciess_prod.config import from_dict
    from ciess_prod.distributed.ctr import CTRSearchExperimentConfig, load_ctr_data

    _, two = one_and_two
    plan_dir, model_dir = two / "plans" / "c0.90", two / "models" / "c0.90"
    assert main(["compress", "--plan", str(plan_dir), "--checkpoint", str(model_dir), "--dtype", "fp32",
                 "--out", str(tmp_path / "art")]) == 0
    plan = DimensionPlan.load(plan_dir)
    config = from_dict(CTRSearchExperimentConfig, plan.config)
    data = load_ctr_data(config.data, ROOT)
    _, _, test = data.split_indices(config.data.split, config.data.split_seed)
    batch = data.batch(test)
    model = load_artifact(tmp_path / "art").model
    logits = model(batch["dense"], batch["sparse"])
    loss = F.binary_cross_entropy_with_logits(logits, batch["labels"]).item()
    assert loss == pytest.approx(plan.metrics["test"]["logloss"], abs=1e-5)
    assert main(["export", "--artifact", str(tmp_path / "art"), "--out", str(tmp_path / "m.onnx")]) == 0
    feeds = {"dense": batch["dense"].numpy()}
    for f, jt in batch["sparse"].to_dict().items():
        feeds[f"{f}.ids"], feeds[f"{f}.offsets"] = jt.values().numpy(), jt.offsets().long().numpy()
    (onnx_logits,) = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["logits"], feeds)
    torch.testing.assert_close(torch.from_numpy(onnx_logits), logits, rtol=0, atol=1e-5)


@pytest.mark.distributed
def test_ranks_with_unequal_evaluation_chunks_do_not_deadlock(tmp_path):
    """601 validation examples split 301 / 300 over 2 ranks, 300 per chunk: rank 0 needs one more forward."""
    data = {**TINY["data"], "synthetic": {**TINY["data"]["synthetic"], "n_examples": 6010}}
    out = run(tmp_path, "uneven", 2, data=data, train={"eval_batch": 300}, search={"episodes": 1})
    assert all(plan.fits_budget() for plan in plans(out).values())


def test_the_sharded_search_refuses_restarts_by_name():
    """The sharded search runs one search; a config asking for restarts is refused before any work starts."""
    from ciess_prod.config import ConfigError
    from ciess_prod.distributed.search import run_sharded_search
    from ciess_prod.search.config import SearchConfig

    with pytest.raises(ConfigError, match="search.restarts 3: the sharded search runs one search"):
        run_sharded_search(None, SearchConfig(restarts=3), d_max=16, output_dir="unused", settings={})
