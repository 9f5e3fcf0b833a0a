"""The CIESS search end to end on tiny seeded data: budgets, plans, report, resume, protocols, entry points."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ciess_prod.config import to_dict
from ciess_prod.data import DataConfig, SyntheticConfig, load_dataset
from ciess_prod.eval.metrics import item_hit_quality
from ciess_prod.models import SIDES, ModelConfig, build_model, sparsity
from ciess_prod.search import DimensionPlan
from ciess_prod.search.baselines import frequency_sizes, random_sizes
from ciess_prod.search.config import SPREAD_DEPTH, SearchConfig, SearchExperimentConfig
from ciess_prod.search.environment import EnvironmentConfig, SizeEnvironment
from ciess_prod.search.exploration import ExplorationConfig
from ciess_prod.search.plan import PlanError, budget_for
from ciess_prod.search.record import ConfigurationRecord, Visited
from ciess_prod.search.search import PENALTY_RANGE, STATE_FILE, build_states, next_penalty, reward_terms, run_search
from ciess_prod.search.selection import budget_candidates
from ciess_prod.train.trainer import TrainConfig, evaluate, fit

ROOT = Path(__file__).resolve().parent.parent
TINY = SearchExperimentConfig(
    data=DataConfig(
        synthetic=SyntheticConfig(n_users=200, n_items=150, interactions_per_user=20, n_factors=4, affinity_scale=5.0)
    ),
    model=ModelConfig(kind="lightgcn", d_max=16, n_layers=1),
    train=TrainConfig(lr=0.01, batch_size=512, max_batches=40, eval_every=20, patience=1, progress=False),
    search=SearchConfig(
        budgets=(0.5, 0.8, 0.93),
        episodes=2,
        steps_per_episode=3,
        top_l=1,
        replay_bytes=1 << 20,
        environment=EnvironmentConfig(batches=3),
    ),
    protocol="final",
)


def _tiny(tmp_path: Path, name: str = "run", **search_changes) -> SearchExperimentConfig:
    search = dataclasses.replace(TINY.search, **search_changes)
    return dataclasses.replace(TINY, search=search, output_dir=str(tmp_path / name))


@pytest.fixture(scope="module")
def finished_search(tmp_path_factory):
    config = _tiny(tmp_path_factory.mktemp("search"))
    return config, run_search(config)


def test_every_plan_meets_its_budget_and_reloads(finished_search):
    config, summary = finished_search
    assert summary["finished"] and summary["completed_steps"] == 6
    for c in config.search.budgets:
        plan = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        total = sum(int(s.to(torch.int64).sum()) for s in plan.sizes.values())
        rows = sum(s.numel() for s in plan.sizes.values())
        assert total <= (1 - c) * rows * config.model.d_max + 1e-9
        assert plan.fits_budget() and plan.target_sparsity == c
        assert set(plan.metrics) >= {"val", "test"} and plan.metrics["test"]["recall@20"] > 0
        assert plan.sizes["user"].dtype == torch.int16 and plan.sizes["user"].numel() == 200
    # 0.93 of 16 columns (mean size 1.1) is beyond what the walk visits here: the documented repair derives it.
    assert summary["plans"]["0.93"]["repaired"] is True
    # its sizes were never visited, so it has no mean q; the files stay strict JSON (no NaN)
    assert "mean_q" not in summary["plans"]["0.93"]["selection"] and "mean_q" in summary["plans"]["0.50"]["selection"]
    strict = {"parse_constant": lambda name: pytest.fail(f"{name} in JSON")}
    json.loads((Path(config.output_dir) / "search.json").read_text(), **strict)
    json.loads((Path(config.output_dir) / "plans" / "c0.93" / "plan.json").read_text(), **strict)


def test_each_plan_comes_with_the_model_it_was_tested_with(finished_search):
    from ciess_prod.experiment import evaluate_checkpoint

    config, summary = finished_search
    for c in config.search.budgets:
        plan = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        model_dir = Path(summary["plans"][f"{c:.2f}"]["model"])
        assert evaluate_checkpoint(model_dir, "test") == pytest.approx(plan.metrics["test"], abs=1e-12)


def test_report_has_history_and_plots(finished_search):
    config, _ = finished_search
    report = Path(config.output_dir) / "report"
    history = json.loads((report / "history.json").read_text())["history"]
    assert len(history) == 6
    assert {"mean_reward", "mean_size_user", "mean_size_item", "sparsity", "mean_q"} <= set(history[0])
    for name in ("reward_and_size.png", "size_vs_popularity.png", "size_histograms.png"):
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_resume_gives_the_uninterrupted_result(tmp_path, finished_search):
    reference_config, _ = finished_search
    config = dataclasses.replace(reference_config, output_dir=str(tmp_path / "resumed"))
    partial = run_search(config, stop_after_steps=4)
    assert partial == {"completed_steps": 4, "finished": False}
    first_seconds = torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["seconds"]
    summary = run_search(config, resume=True)
    assert 0 < first_seconds < summary["search_seconds"]  # the steps of both runs, not only the resumed ones
    assert summary["total_seconds"] == pytest.approx(summary["search_seconds"] + summary["retrain_seconds"])
    for c in config.search.budgets:
        a = DimensionPlan.load(Path(reference_config.output_dir) / "plans" / f"c{c:.2f}")
        b = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        for side in a.sizes:
            assert torch.equal(a.sizes[side], b.sizes[side]), (c, side)
        for plan in (a, b):  # wall time is the only field two identical runs may differ in
            assert plan.metrics["selection"].pop("retrain_seconds") > 0
        assert a.metrics == b.metrics
    history = lambda cfg: json.loads((Path(cfg.output_dir) / "report" / "history.json").read_text())["history"]  # noqa: E731
    assert history(config) == history(reference_config)


def test_resume_refuses_a_state_saved_with_other_settings(tmp_path, capsys):
    """A resumed search keeps the settings that decide its steps: a state saved with others is refused, naming every
    key that differs, and is left as it was. The final selection's settings may change, and a state saved before
    settings were kept resumes as before."""
    from ciess_prod.cli import main
    from ciess_prod.config import ConfigError

    config = _tiny(tmp_path, "run")
    run_search(config, stop_after_steps=2)
    state_path = Path(config.output_dir) / STATE_FILE
    saved = state_path.read_bytes()
    other = dataclasses.replace(config, search=dataclasses.replace(config.search, penalty_control="signed", seed=3))
    with pytest.raises(ConfigError) as refused:
        run_search(other, resume=True)
    assert str(state_path) in str(refused.value)
    assert "search.penalty_control: saved 'fixed', now 'signed'" in str(refused.value)
    assert "search.seed: saved 0, now 3" in str(refused.value)
    assert "search.size_penalty" not in str(refused.value)  # only what differs
    assert state_path.read_bytes() == saved

    path = tmp_path / "other.yaml"
    no_l2 = dataclasses.replace(config, train=dataclasses.replace(config.train, l2=0.0))
    path.write_text(yaml.safe_dump(to_dict(no_l2)))
    assert main(["search", "--config", str(path), "--resume"]) == 2
    assert "train.l2: saved 0.0001, now 0.0" in capsys.readouterr().err
    assert state_path.read_bytes() == saved

    selection_only = dataclasses.replace(config, search=dataclasses.replace(config.search, fill_budget=True, top_l=2))
    assert run_search(selection_only, resume=True, stop_after_steps=1)["completed_steps"] == 3
    state = torch.load(state_path, weights_only=True)
    del state["settings"]  # saved before settings were kept: nothing to compare with
    torch.save(state, state_path)
    assert run_search(other, resume=True, stop_after_steps=1)["completed_steps"] == 4


def test_resume_after_the_search_reuses_chosen_plans(tmp_path, finished_search, monkeypatch):
    """An interrupted retraining phase keeps the budgets it finished; a plan of another search is not reused."""
    import shutil

    from ciess_prod.search import selection

    config, _ = finished_search
    copy = dataclasses.replace(config, output_dir=str(tmp_path / "copy"))
    shutil.copytree(config.output_dir, copy.output_dir)
    chosen = []
    real_choose = selection.choose_plan
    monkeypatch.setattr(
        selection, "choose_plan", lambda cfg, d, rec, c: chosen.append(c) or real_choose(cfg, d, rec, c)
    )
    run_search(copy, resume=True)
    assert chosen == list(config.search.budgets)  # the copied plans name the other output_dir: not this search's
    run_search(copy, resume=True)
    assert chosen == list(config.search.budgets)  # now every budget's plan is this search's own: nothing retrained

    # a plan written before a config key existed (here: search.fill_budget) counts that key at its default
    for c in config.search.budgets:
        path = Path(copy.output_dir) / "plans" / f"c{c:.2f}"
        plan = DimensionPlan.load(path)
        del plan.config["search"]["fill_budget"]
        plan.save(path)
    run_search(copy, resume=True)
    assert chosen == list(config.search.budgets)


def test_reference_is_shared_only_with_the_same_recipe(tmp_path, finished_search, monkeypatch):
    from ciess_prod.search import search as search_module

    config, _ = finished_search
    dataset = load_dataset(config.data, ROOT)
    shared = Path(config.output_dir) / "reference"
    fits = []
    real_fit = search_module.fit_on_train
    monkeypatch.setattr(search_module, "fit_on_train", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    search_module.train_reference(config, dataset, shared)
    assert fits == []  # same data, model and training recipe: reused
    other = dataclasses.replace(config, train=dataclasses.replace(config.train, lr=0.02))
    search_module.train_reference(other, dataset, tmp_path / "ref")
    search_module.train_reference(other, dataset, tmp_path / "ref")
    assert fits == [1]  # a different recipe trains once, then reuses its own


def test_fill_budget_uses_the_slack_of_each_budget(tmp_path, finished_search):
    plain, _ = finished_search
    config = _tiny(tmp_path, "filled", fill_budget=True)
    summary = run_search(config)
    for c in config.search.budgets:
        filled = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        unfilled = DimensionPlan.load(Path(plain.output_dir) / "plans" / f"c{c:.2f}")
        assert filled.fits_budget()
        if not summary["plans"][f"{c:.2f}"]["repaired"]:
            assert c <= filled.achieved_sparsity <= unfilled.achieved_sparsity


def test_even_within_side_plans_keep_only_the_split_between_users_and_items(tmp_path, finished_search):
    """`within_side: even` on a finished search's steps (resumed): every saved plan meets its budget with one size,
    or two adjacent ones, per side."""
    plain, _ = finished_search
    config = _tiny(tmp_path, "even", fill_budget=True, candidates_from="loosest", within_side="even")
    Path(config.output_dir).mkdir()
    shutil.copyfile(Path(plain.output_dir) / STATE_FILE, Path(config.output_dir) / STATE_FILE)
    assert run_search(config, resume=True)["completed_steps"] == 6  # the steps reused, only the selection ran
    for c in config.search.budgets:
        plan = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        assert plan.fits_budget() and plan.config["search"]["within_side"] == "even"
        assert all(int(s.max()) - int(s.min()) <= 1 for s in plan.sizes.values())


def test_candidates_from_the_loosest_budget_keep_its_allocation():
    """`loosest`: a tighter budget gets the loosest budget's best configuration shrunk by one common factor (row
    order kept, budget met, step and measured q kept); `budget` keeps each budget's own top-l."""
    gen = torch.Generator().manual_seed(0)
    best = {"user": torch.randint(1, 17, (50,), generator=gen), "item": torch.randint(1, 5, (40,), generator=gen)}
    own = {"user": torch.full((50,), 2), "item": torch.full((40,), 2)}
    record = ConfigurationRecord((0.5, 0.8), keep=1)
    for step, sizes in ((3, best), (7, own)):
        record.add(Visited(step, sparsity(list(sizes.values()), 16), 0.9 if step == 3 else 0.5, sizes))
    assert [v.step for v in record.best[0.5]] == [3] and [v.step for v in record.best[0.8]] == [7]
    config = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, budgets=(0.5, 0.8), top_l=1))
    assert budget_candidates(config, record, 0.8)[0][0].step == 7
    loosest = dataclasses.replace(config, search=dataclasses.replace(config.search, candidates_from="loosest"))
    (candidate,), repaired = budget_candidates(loosest, record, 0.8)
    assert not repaired and candidate.step == 3 and candidate.mean_q == 0.9
    flat, before = torch.cat([candidate.sizes[s].long() for s in SIDES]), torch.cat([best[s] for s in SIDES])
    assert candidate.sparsity >= 0.8 and int(flat.sum()) <= budget_for(90, 16, 0.8)
    assert bool(((before[:, None] > before[None, :]) <= (flat[:, None] >= flat[None, :])).all())  # order kept
    assert int(flat.sum()) > budget_for(90, 16, 0.85)  # shrunk just enough, not to the bottom
    assert budget_candidates(loosest, record, 0.5)[0][0].sizes is best  # the loosest budget's own, untouched
    filled = dataclasses.replace(loosest, search=dataclasses.replace(loosest.search, fill_budget=True))
    (grown,), _ = budget_candidates(filled, record, 0.8)
    assert int(sum(s.long().sum() for s in grown.sizes.values())) >= int(flat.sum())
    evened = dataclasses.replace(filled, search=dataclasses.replace(filled.search, within_side="even"))
    (even,), _ = budget_candidates(evened, record, 0.8)
    for s in SIDES:  # each side's total as filled, shared equally by its rows
        assert int(even.sizes[s].long().sum()) == int(grown.sizes[s].long().sum())
        assert int(even.sizes[s].max() - even.sizes[s].min()) <= 1


def test_probes_rank_the_candidates_by_a_short_retraining(tmp_path):
    """`probe_top`: the best `probe_top` by mean q are ranked by their probes' validation recall, and the top-l of
    that order are the candidates; under `loosest` every budget ranks by the loosest budget's probes."""
    from ciess_prod.search.candidates import CandidateFit, CandidateFits
    from ciess_prod.search.selection import probe_pool

    with pytest.raises(ValueError, match="probe_top must be 0 or >= top_l"):
        SearchConfig(top_l=2, probe_top=1)
    with pytest.raises(ValueError, match="probe_batches must be >= 1"):
        SearchConfig(probe_batches=0)
    assert SearchConfig(top_l=2, probe_top=5).recorded == 5 and SearchConfig(top_l=2).recorded == 2
    record = ConfigurationRecord((0.5, 0.8), keep=3)
    for step, size, q in ((1, 3, 0.9), (2, 2, 0.8), (3, 1, 0.7), (4, 1, 0.6)):  # all meet both budgets (d_max 16)
        record.add(Visited(step, 1 - size / 16, q, {"user": torch.full((5,), size), "item": torch.full((4,), size)}))
    assert [v.step for v in record.best[0.5]] == [1, 2, 3]  # the 4th is outside the pool
    config = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, budgets=(0.5, 0.8), top_l=2,
                                                                  probe_top=3))
    probes = CandidateFits(tmp_path / "probes", {"probe": True})
    with pytest.raises(ValueError, match="pass the probe store"):
        budget_candidates(config, record, 0.8)
    with pytest.raises(RuntimeError, match="step 1 has no probe"):
        budget_candidates(config, record, 0.8, probes)
    for visited, recall in zip(probe_pool(config, record, 0.8), (0.10, 0.30, 0.20), strict=True):
        probes.put(visited.sizes, CandidateFit(val={"recall@20": recall}, best_batches=20, seconds=1.0))
    ranked, repaired = budget_candidates(config, record, 0.8, probes)
    assert [v.step for v in ranked] == [2, 3] and not repaired  # by probe, not by mean q (1, 2)
    loosest = dataclasses.replace(config, search=dataclasses.replace(config.search, candidates_from="loosest"))
    assert [v.step for v in probe_pool(loosest, record, 0.8)] == [1, 2, 3]  # the loosest budget's, at 0.5
    for visited, recall in zip(probe_pool(loosest, record, 0.8), (0.40, 0.10, 0.20), strict=True):
        probes.put(visited.sizes, CandidateFit(val={"recall@20": recall}, best_batches=20, seconds=1.0))
    assert [v.step for v in budget_candidates(loosest, record, 0.8, probes)[0]] == [1, 3]


def test_probe_spread_pools_distinct_prepared_plans_only(tmp_path):
    """`probe_spread`: the pool skips configurations whose prepared (filled, evened) sizes lie within the spacing of
    one pooled before, so near-copies of one split do not fill it; the record keeps a deeper list to draw from."""
    from ciess_prod.search.candidates import CandidateFit, CandidateFits
    from ciess_prod.search.plan import size_distance
    from ciess_prod.search.selection import probe_members

    with pytest.raises(ValueError, match="probe_spread spaces the probe's pool"):
        SearchConfig(probe_spread=0.1)
    with pytest.raises(ValueError, match="probe_spread is a share of columns"):
        SearchConfig(top_l=1, probe_top=2, probe_spread=-0.1)
    assert SearchConfig(top_l=1, probe_top=2, probe_spread=0.1).recorded == 2 * SPREAD_DEPTH
    a = {"user": torch.tensor([4, 4]), "item": torch.tensor([2, 2])}
    b = {"user": torch.tensor([3, 3]), "item": torch.tensor([3, 3])}
    assert size_distance(a, a) == 0 and size_distance(a, b) == pytest.approx(4 / 12)
    with pytest.raises(PlanError, match="same tables and rows"):
        size_distance(a, {"user": torch.tensor([4, 4])})

    def visited(step: int, user: int, item: int, q: float) -> Visited:  # d_max 16, 5 users and 4 items
        return Visited(step, 1 - (5 * user + 4 * item) / (9 * 16), q,
                       {"user": torch.full((5,), user), "item": torch.full((4,), item)})

    record = ConfigurationRecord((0.5,), keep=2 * SPREAD_DEPTH)
    # steps 1-3 split the budget alike (4 item columns move at most); step 4 gives items most of it
    for v in (visited(1, 6, 2, 0.9), visited(2, 6, 3, 0.85), visited(3, 5, 2, 0.8), visited(4, 2, 8, 0.6)):
        record.add(v)
    spaced = dataclasses.replace(TINY, search=dataclasses.replace(
        TINY.search, budgets=(0.5,), top_l=1, probe_top=2, fill_budget=True, within_side="even", probe_spread=0.2))
    near = dataclasses.replace(spaced, search=dataclasses.replace(spaced.search, probe_spread=0.0))
    assert [v.step for v, _ in probe_members(near, record, 0.5)] == [1, 2]  # by mean q: two near-copies
    members = probe_members(spaced, record, 0.5)
    assert [v.step for v, _ in members] == [1, 4]
    assert size_distance(members[0][1].sizes, members[1][1].sizes) >= 0.2
    probes = CandidateFits(tmp_path / "probes", {"probe": True})
    for (_, probed), recall in zip(members, (0.1, 0.3), strict=True):
        probes.put(probed.sizes, CandidateFit(val={"recall@20": recall}, best_batches=20, seconds=1.0))
    assert [v.step for v in budget_candidates(spaced, record, 0.5, probes)[0]] == [4]  # the spaced probe won


def test_probed_search_retrains_each_probe_once_in_one_process_or_workers(tmp_path, monkeypatch):
    """A search with probes chooses the same plans in one process and in workers; every probe runs once, for at
    most `probe_batches`, apart from the full fits, and the plan records its candidate's probe."""
    from ciess_prod.search import selection

    config = _tiny(tmp_path, "probed", top_l=1, probe_top=2, probe_batches=20, candidates_from="loosest")
    lengths = []
    real_fit = selection.fit_on_train
    monkeypatch.setattr(selection, "fit_on_train", lambda d, m, train: lengths.append(train.max_batches)
                        or real_fit(d, m, train))
    summary = run_search(config)
    assert sorted(lengths) == [20, 20, 40, 40, 40]  # 2 probes shared by the budgets, then 1 fit per budget
    parallel = _steps_of(config, tmp_path / "probed-workers")
    assert run_search(parallel, resume=True, retrain_workers=2)["finished"]
    record = ConfigurationRecord(tuple(config.search.budgets), config.search.recorded)
    record.load_state_dict(torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["record"])
    assert len(record.best[0.5]) == 2  # the pool, not the top-l
    for out in (config.output_dir, parallel.output_dir):
        entries = [json.loads(p.read_text()) for p in (Path(out) / "candidates").glob("*.json")]
        short = [e for e in entries if e["best_batches"] <= 20]
        assert len(short) >= 2 and len(entries) == 2 + len(config.search.budgets)  # 2 probes, 1 fit per budget
    for c in config.search.budgets:
        a = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        b = DimensionPlan.load(Path(parallel.output_dir) / "plans" / f"c{c:.2f}")
        assert all(torch.equal(a.sizes[s], b.sizes[s]) for s in a.sizes) and a.fits_budget()
        assert b.metrics["test"] == pytest.approx(a.metrics["test"], abs=1e-9)
        assert 0 <= a.metrics["selection"]["probe_recall@20"] <= 1
        assert summary["plans"][f"{c:.2f}"]["selection"]["step"] == a.metrics["selection"]["step"]
    weights = _steps_of(config, tmp_path / "probed-train-only", protocol="train_only")  # ranked by probes too
    assert run_search(weights, resume=True, retrain_workers=2)["finished"]
    probes = selection.probe_fits(weights, load_dataset(weights.data, ROOT), Path(weights.output_dir))
    assert all(probes.get(v.sizes) is not None for v in selection.probe_pool(weights, record, 0.5))
    for c in config.search.budgets:
        assert "probe_recall@20" in DimensionPlan.load(Path(weights.output_dir) / "plans" / f"c{c:.2f}").metrics[
            "selection"]


def test_full_probes_rank_the_pool_per_budget_at_one_retrain_weight(tmp_path):
    """`probe: full`: the pool is the short probe's (spaced at the source budget), but each member is probed as
    prepared for the budget it serves, so each budget ranks it by its own fits; probe_l2 must be a retrain weight."""
    from ciess_prod.search.candidates import CandidateFit, CandidateFits
    from ciess_prod.search.selection import probe_config, probe_members
    from ciess_prod.train.protocol import RetrainConfig

    with pytest.raises(ValueError, match="it needs probe_top > 0 and probe_l2"):
        SearchConfig(top_l=1, probe_top=2, probe="full")
    with pytest.raises(ValueError, match="it needs probe_top > 0 and probe_l2"):
        SearchConfig(probe="full", probe_l2=1e-3)
    with pytest.raises(ValueError, match="probe_l2 is the full probes' weight"):
        SearchConfig(top_l=1, probe_top=2, probe_l2=1e-3)
    full = SearchConfig(budgets=(0.5, 0.8), top_l=1, probe_top=2, probe="full", probe_l2=1e-3,
                        candidates_from="loosest", fill_budget=True)
    with pytest.raises(ValueError, match=r"probe_l2 0.001 must be one of the retrain weights \[0.0001, 0.0003\]"):
        SearchExperimentConfig(search=full, retrain=RetrainConfig(l2=(1e-4, 3e-4)))
    config = dataclasses.replace(TINY, search=full, retrain=RetrainConfig(l2=(1e-4, 1e-3), max_batches=60))
    assert probe_config(config).train.l2 == 1e-3 and probe_config(config).train.max_batches == 60  # a fit's recipe
    short = dataclasses.replace(config, search=dataclasses.replace(full, probe="short", probe_l2=None))
    record = ConfigurationRecord((0.5, 0.8), keep=2)
    for step, user, item, q in ((1, 6, 2, 0.9), (2, 2, 6, 0.8)):  # d_max 16: two splits, both meeting 0.5
        record.add(Visited(step, 1 - (5 * user + 4 * item) / (9 * 16), q,
                           {"user": torch.full((5,), user), "item": torch.full((4,), item)}))
    probes = CandidateFits(tmp_path / "fits", {"fit": True})
    chosen = {}
    for c, recalls in ((0.5, (0.3, 0.1)), (0.8, (0.1, 0.3))):  # the users-heavy split wins 0.5, the other 0.8
        members = probe_members(config, record, c)
        assert [v.step for v, _ in members] == [v.step for v, _ in probe_members(short, record, c)] == [1, 2]
        for (_, probed), recall in zip(members, recalls, strict=True):
            assert sparsity(list(probed.sizes.values()), 16) >= c  # prepared for c, not for the source 0.5
            probes.put(probed.sizes, CandidateFit(val={"recall@20": recall}, best_batches=20, seconds=1.0))
        (chosen[c],), _ = budget_candidates(config, record, c, probes)
        assert all(torch.equal(chosen[c].sizes[s], members[recalls.index(0.3)][1].sizes[s]) for s in SIDES)
    assert [chosen[c].step for c in (0.5, 0.8)] == [1, 2]
    for (_, at_source), (_, at_budget), (_, as_short) in zip(  # a short probe trains the source budget's sizes
            probe_members(config, record, 0.5), probe_members(config, record, 0.8), probe_members(short, record, 0.8),
            strict=True):
        assert all(torch.equal(at_source.sizes[s], as_short.sizes[s]) for s in SIDES)
        assert not all(torch.equal(at_budget.sizes[s], as_short.sizes[s]) for s in SIDES)


def test_full_probed_search_fits_each_pool_member_once_per_budget(tmp_path, monkeypatch):
    """A search under `probe: full` fits every pool member of every budget once at probe_l2 and only the chosen
    candidates at the other weight, never a fit twice; one process and workers choose the same plans."""
    from ciess_prod.search import selection
    from ciess_prod.search.candidates import fit_key
    from ciess_prod.train.protocol import RetrainConfig

    config = dataclasses.replace(
        _tiny(tmp_path, "full-probed", top_l=1, probe_top=2, probe="full", probe_l2=1e-4, candidates_from="loosest",
              fill_budget=True),
        retrain=RetrainConfig(l2=(5.0, 1e-4), max_batches=60, patience=2))
    fitted = []
    real_fit = selection.fit_candidate
    monkeypatch.setattr(selection, "fit_candidate", lambda recipe, d, sizes, fits: fitted.append(
        (recipe.train.l2, recipe.train.max_batches, fit_key(fits.recipe, sizes))) or real_fit(recipe, d, sizes, fits))
    assert run_search(config)["finished"]
    assert len(set(fitted)) == len(fitted) and {n for _, n, _ in fitted} == {60}  # no fit twice, none short
    record = ConfigurationRecord(tuple(config.search.budgets), config.search.recorded)
    record.load_state_dict(torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["record"])
    dataset = load_dataset(config.data, ROOT)
    stores = {v.train.l2: selection.candidate_fits(v, dataset, Path(config.output_dir))
              for v in selection.fit_configs(config)}
    for c in config.search.budgets:
        pool = selection.probe_pool(config, record, c)
        assert len(pool) == 2 and all(stores[1e-4].get(v.sizes) is not None for v in pool)
        plan = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        assert stores[5.0].get(plan.sizes) is not None  # the chosen candidate, at the other weight too
        assert plan.metrics["selection"]["probe_recall@20"] == stores[1e-4].get(plan.sizes).val["recall@20"]
    at_other = [key for l2, _, key in fitted if l2 == 5.0]
    assert len(at_other) == len(set(at_other)) <= len(config.search.budgets)
    parallel = _steps_of(config, tmp_path / "full-probed-workers")
    assert run_search(parallel, resume=True, retrain_workers=2)["finished"]
    for c in config.search.budgets:
        a = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        b = DimensionPlan.load(Path(parallel.output_dir) / "plans" / f"c{c:.2f}")
        assert all(torch.equal(a.sizes[s], b.sizes[s]) for s in SIDES)
        assert b.metrics["test"] == pytest.approx(a.metrics["test"], abs=1e-9)


def test_states_and_rewards_follow_the_paper():
    pop = torch.tensor([-1.0, 0.0, 1.0])
    states = build_states(pop, torch.tensor([1, 64, 128]), torch.tensor([0.2, 0.5, 1.0]), d_max=128)
    torch.testing.assert_close(states[:, 1], torch.tensor([-1.0, (63 / 127) * 2 - 1, 1.0]))
    from ciess_prod.search.environment import Quality

    quality = Quality(raw={"user": torch.tensor([0.3, 0.1], dtype=torch.float64)},
                      ratio={"user": torch.tensor([1.0, 0.5])})
    sizes = torch.tensor([128, 32])
    gain, cost = reward_terms(SearchConfig(), quality, "user", sizes, 128)
    torch.testing.assert_close(gain - 0.4 * cost, torch.tensor([1.0 - 0.4, 0.5 - 0.4 / 16]))
    gain, cost = reward_terms(SearchConfig(reward="code"), quality, "user", sizes, 128)
    torch.testing.assert_close(gain - 0.01 * cost,
                               torch.tensor([0.3 - 0.01 * (127 / 128) ** 2, 0.1 - 0.01 * (31 / 128) ** 2]))


def test_penalty_control_steps_lambda_towards_the_loosest_budget():
    """`loosest`: a visit denser than the loosest budget plus the margin raises lambda, a sparser one lowers it, by
    exp(rate * relative gap) with the gap clipped to +-1, within PENALTY_RANGE; `fixed` never moves it."""
    import math

    def step(config: SearchConfig, integral: float, sparsity: float) -> float:
        new_integral, penalty = next_penalty(config, integral, sparsity)
        assert new_integral == penalty  # no proportional gain: lambda is the integral
        return penalty

    fixed = SearchConfig(budgets=(0.8, 0.9), size_penalty=0.4)
    assert step(fixed, 0.4, 0.1) == 0.4
    track = dataclasses.replace(fixed, penalty_control="loosest", penalty_rate=0.5, penalty_margin=0.02)
    target_density = 1 - 0.82
    assert step(track, 0.4, 1 - 0.5 * target_density) == pytest.approx(0.4 * math.exp(-0.25))  # gap -0.5
    assert step(track, 0.4, 1 - 1.5 * target_density) == pytest.approx(0.4 * math.exp(0.25))  # gap +0.5
    assert step(track, 0.4, 0.82) == pytest.approx(0.4)
    assert step(track, 0.4, 0.0) == pytest.approx(0.4 * math.exp(0.5))  # gap 4.6, clipped to 1
    assert step(track, PENALTY_RANGE[1], 0.0) == PENALTY_RANGE[1]
    signed = dataclasses.replace(track, penalty_control="signed")
    assert step(signed, 0.4, 1 - 0.5 * target_density) == pytest.approx(0.4 - 0.25)  # gap -0.5, on lambda
    assert step(signed, 0.1, 1 - 0.5 * target_density) == pytest.approx(0.1 - 0.25)  # may go below 0
    assert step(signed, -0.3, 0.0) == pytest.approx(-0.3 + 0.5)  # gap clipped to 1
    assert step(signed, -PENALTY_RANGE[1], 0.99) == -PENALTY_RANGE[1]
    assert dataclasses.replace(signed, size_penalty=0.0).size_penalty == 0.0  # may start from 0
    for bad, message in (({"penalty_rate": 0.0}, "penalty_rate must be > 0"),
                         ({"penalty_margin": 0.2}, "penalty_margin must lie in"),
                         ({"penalty_gain": -1.0}, "penalty_gain must be >= 0"),
                         ({"penalty_control": "loosest", "size_penalty": 0.0}, "needs size_penalty > 0")):
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(fixed, **bad)


def test_penalty_gain_adds_a_proportional_term_to_the_stepped_integral():
    """With penalty_gain, the integral takes the dual-ascent step and lambda adds gain * gap to it (loosest: times
    exp(gain * gap)), so lambda answers a gap at once and falls back as soon as the gap closes."""
    import math

    target_density = 1 - 0.82
    signed = SearchConfig(budgets=(0.8, 0.9), size_penalty=0.4, penalty_control="signed", penalty_rate=0.5,
                          penalty_gain=2.0)
    integral, penalty = next_penalty(signed, 0.4, 1 - 1.5 * target_density)  # gap +0.5
    assert (integral, penalty) == (pytest.approx(0.4 + 0.25), pytest.approx(0.4 + 0.25 + 1.0))
    assert next_penalty(signed, integral, 0.82) == (pytest.approx(0.65), pytest.approx(0.65))  # on target: no P term
    assert next_penalty(signed, 0.4, 0.0)[1] == pytest.approx(0.4 + 0.5 + 2.0)  # gap clipped to 1
    assert next_penalty(signed, 999.8, 0.0) == (1000.0, 1000.0)  # both bounded
    loosest = dataclasses.replace(signed, penalty_control="loosest")
    integral, penalty = next_penalty(loosest, 0.4, 1 - 0.5 * target_density)  # gap -0.5
    assert integral == pytest.approx(0.4 * math.exp(-0.25))
    assert penalty == pytest.approx(0.4 * math.exp(-0.25) * math.exp(-1.0))
    with pytest.raises(ValueError, match="penalty_gain needs an adapted penalty_control"):
        dataclasses.replace(signed, penalty_control="fixed")  # it would have no effect


@pytest.mark.parametrize("control,gain", [("loosest", 0.0), ("signed", 0.0), ("signed", 2.0)])
def test_a_tracking_search_records_and_resumes_its_lambda(tmp_path, control, gain):
    """Every step records the lambda it used, the next one follows next_penalty from the running integral, and a
    resumed run continues from the saved lambda and integral to the uninterrupted result."""
    changes = {"penalty_control": control, "penalty_rate": 1.0, "size_penalty": 0.1, "penalty_gain": gain}
    whole = _tiny(tmp_path, "track", **changes)
    run_search(whole, stop_after_steps=5)
    history = torch.load(Path(whole.output_dir) / STATE_FILE, weights_only=True)["history"]
    assert history[0]["size_penalty"] == 0.1
    integral = 0.1
    for before, after in zip(history, history[1:], strict=False):
        integral, penalty = next_penalty(whole.search, integral, before["sparsity"])
        assert after["size_penalty"] == pytest.approx(penalty)
    assert len({e["size_penalty"] for e in history}) > 1
    split = _tiny(tmp_path, "track-split", **changes)
    run_search(split, stop_after_steps=2)
    run_search(split, resume=True, stop_after_steps=3)
    resumed = torch.load(Path(split.output_dir) / STATE_FILE, weights_only=True)["history"]
    assert [e["size_penalty"] for e in resumed] == [e["size_penalty"] for e in history]
    assert [e["mean_reward"] for e in resumed] == [e["mean_reward"] for e in history]


def test_a_signed_lambda_below_zero_pays_a_too_sparse_search_for_size(tmp_path):
    """Under `signed`, a search sparser than its target (here: the dense budget 0) drives lambda below 0, and from
    then on every row's reward exceeds its q: the size term pays instead of charging."""
    config = _tiny(tmp_path, budgets=(0.0, 0.8), penalty_control="signed", penalty_rate=1.0, penalty_margin=0.0,
                   size_penalty=0.05)
    run_search(config, stop_after_steps=4)
    history = torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["history"]
    assert all(e["sparsity"] > 0 for e in history)
    paid = [e for e in history if e["size_penalty"] < 0]
    assert paid, [e["size_penalty"] for e in history]
    for entry in paid:
        for side in ("user", "item"):
            assert entry[f"mean_reward_{side}"] > entry[f"mean_q_{side}"]


@pytest.mark.parametrize("protocol", ["warm", "paper"])
def test_environment_protocols_measure_quality(protocol):
    dataset = load_dataset(TINY.data)
    reference = build_model(TINY.model, dataset.n_users, dataset.n_items, dataset.train)
    env = SizeEnvironment(dataset, TINY.model, TINY.train, EnvironmentConfig(protocol=protocol, batches=3), reference)
    sizes = {"user": torch.full((dataset.n_users,), 2), "item": torch.full((dataset.n_items,), 2)}
    quality = env.evaluate(sizes, step_seed=0)
    for side in ("user", "item"):
        assert quality.ratio[side].min() >= 0 and quality.ratio[side].max() <= 1
    again = env.evaluate(sizes, step_seed=0)
    assert torch.equal(quality.ratio["user"], again.ratio["user"])  # seeded: a step is reproducible
    assert 0 <= quality.mean_ratio <= 1


def test_item_quality_hits_credits_an_items_own_size():
    dataset = load_dataset(TINY.data)
    reference = build_model(TINY.model, dataset.n_users, dataset.n_items, dataset.train)
    fit(reference, dataset, TINY.train)
    config = EnvironmentConfig(batches=1, lr=1e-9, item_quality="hits")  # a fine-tune that changes nothing
    env = SizeEnvironment(dataset, TINY.model, TINY.train, config, reference)
    torch.testing.assert_close(env.reference_quality["item"],
                               item_hit_quality(evaluate(reference, dataset, "val"), dataset.val))
    full = {"user": torch.full((dataset.n_users,), 16), "item": torch.full((dataset.n_items,), 16)}
    shrunk = torch.zeros(dataset.n_items, dtype=torch.bool)
    shrunk[::2] = True  # half the items to size 1, each user keeps 16
    sizes = {**full, "item": torch.where(shrunk, 1, 16)}
    hits = env.evaluate(sizes, step_seed=0).ratio["item"]
    assert hits[shrunk].mean() < hits[~shrunk].mean()  # the shrunk items lose their own hits
    paper = SizeEnvironment(dataset, TINY.model, TINY.train, dataclasses.replace(config, item_quality="users"),
                            reference).evaluate(sizes, step_seed=0).ratio["item"]
    assert not torch.equal(paper, hits)
    with pytest.raises(ValueError, match="item_quality"):
        EnvironmentConfig(item_quality="rank")


def test_a_principal_reference_basis_keeps_the_reference_and_more_of_it_when_cut():
    dataset = load_dataset(TINY.data)
    reference = build_model(TINY.model, dataset.n_users, dataset.n_items, dataset.train)
    fit(reference, dataset, TINY.train)
    as_trained = reference.table_weight("user").detach().clone()
    config = EnvironmentConfig(batches=1, lr=1e-9, item_quality="hits")  # a fine-tune that changes nothing
    trained = SizeEnvironment(dataset, TINY.model, TINY.train, config, reference)
    principal = SizeEnvironment(dataset, TINY.model, TINY.train,
                                dataclasses.replace(config, reference_basis="principal"), reference)
    for side in ("user", "item"):  # same scores, so the same full-size quality
        torch.testing.assert_close(principal.reference_quality[side], trained.reference_quality[side], atol=1e-6,
                                   rtol=0)
    cut = {"user": torch.full((dataset.n_users,), 3), "item": torch.full((dataset.n_items,), 3)}
    # the data has 4 latent factors: the first 3 principal columns keep most of them, 3 trained columns do not
    assert principal.evaluate(cut, step_seed=0).mean_ratio > trained.evaluate(cut, step_seed=0).mean_ratio + 0.1
    assert torch.equal(reference.table_weight("user"), as_trained)  # the caller's reference is not rotated
    with pytest.raises(ValueError, match="reference_basis"):
        EnvironmentConfig(reference_basis="pca")
    # refused before any training
    principal = dataclasses.replace(TINY.search, environment=EnvironmentConfig(reference_basis="principal"))
    with pytest.raises(ValueError, match="keeps scores only for \\('mf', 'lightgcn'\\), not ngcf"):
        dataclasses.replace(TINY, model=dataclasses.replace(TINY.model, kind="ngcf"), search=principal)


def test_random_warm_up_steps_size_rows_uniformly_then_hand_over_to_the_actor(tmp_path):
    from ciess_prod.search.exploration import Explorer

    exploration = ExplorationConfig(random_steps=2)
    config = _tiny(tmp_path, episodes=1, steps_per_episode=4, exploration=exploration, budgets=(0.5,))
    run_search(config, stop_after_steps=3)
    history = torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["history"]
    dataset = load_dataset(TINY.data)
    for i, (side, n) in enumerate((("user", dataset.n_users), ("item", dataset.n_items))):
        # the side's explorer (seed + 10 i + 1) draws each warm-up step's sizes, nothing else touches them
        explorer = Explorer(exploration, TINY.model.d_max, n, seed=config.search.seed + 10 * i + 1)
        for entry in history[:2]:
            assert entry[f"mean_size_{side}"] == pytest.approx(float(explorer.uniform(n).double().mean()))
        assert history[2][f"mean_size_{side}"] != pytest.approx(float(explorer.uniform(n).double().mean()))
    assert run_search(config, resume=True)["finished"]  # the warm-up's draws are in the explorer's saved state


def test_walk_ablation_runs(tmp_path):
    config = _tiny(tmp_path, episodes=1, exploration=ExplorationConfig(walk=False), budgets=(0.5,))
    assert run_search(config)["finished"]


def test_heuristic_baselines_meet_the_budget():
    rng = np.random.default_rng(0)
    popularity = {"user": rng.zipf(1.5, 300).astype(np.int64), "item": rng.zipf(1.5, 200).astype(np.int64)}
    for c in (0.8, 0.9, 0.95):
        for sizes in (random_sizes({"user": 300, "item": 200}, 128, c, seed=1), frequency_sizes(popularity, 128, c)):
            total = sum(int(s.to(torch.int64).sum()) for s in sizes.values())
            assert total <= budget_for(500, 128, c) and min(int(s.min()) for s in sizes.values()) >= 1
        freq = frequency_sizes(popularity, 128, c)
        order = np.argsort(popularity["user"], kind="stable")
        assert (np.diff(freq["user"].numpy()[order]) >= 0).all()  # more popular rows never get fewer columns


def test_cli_and_torchrun_entry_points(tmp_path):
    config = _tiny(tmp_path, name="cli", episodes=1, budgets=(0.5,))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=1", "--master_port=29517"]
    done = subprocess.run([*torchrun, str(ROOT / "training" / "search.py"), "--config", str(path)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "c=0.50" in done.stdout
    assert DimensionPlan.load(tmp_path / "cli" / "plans" / "c0.50").fits_budget()


def _steps_of(finished: SearchExperimentConfig, out: Path, **changes) -> SearchExperimentConfig:
    """A copy of a finished search's steps (reference and state) in ``out``, so a test can retrain it its own way."""
    import shutil

    shutil.copytree(Path(finished.output_dir) / "reference", out / "reference")
    shutil.copyfile(Path(finished.output_dir) / STATE_FILE, out / STATE_FILE)
    return dataclasses.replace(finished, output_dir=str(out), **changes)


def test_retrain_fits_each_candidate_at_each_l2_weight_and_tests_the_best(tmp_path, finished_search):
    """`retrain.l2`: every candidate is fitted at each weight (in one process or in workers, each fit its own unit);
    the (candidate, weight) best on validation is tested, and its model saved with that recipe. A finished search
    resumes into another retraining without redoing its steps."""
    from ciess_prod.search import selection
    from ciess_prod.train.protocol import RetrainConfig

    config, _ = finished_search
    retrain = RetrainConfig(l2=(5.0, 1e-4), max_batches=60, patience=2)
    grid = _steps_of(config, tmp_path / "grid", retrain=retrain)
    summary = run_search(grid, resume=True)
    assert summary["finished"] and summary["completed_steps"] == 6  # the steps were read, not rerun
    parallel = _steps_of(config, tmp_path / "grid-workers", retrain=retrain)
    assert run_search(parallel, resume=True, retrain_workers=2)["finished"]
    dataset = load_dataset(config.data, ROOT)
    recipes = selection.fit_configs(grid)
    assert [(v.train.l2, v.train.max_batches, v.train.patience) for v in recipes] == [(5.0, 60, 2), (1e-4, 60, 2)]
    for c in config.search.budgets:
        plan = DimensionPlan.load(Path(grid.output_dir) / "plans" / f"c{c:.2f}")
        fits = {v.train.l2: selection.candidate_fits(v, dataset, Path(grid.output_dir)).get(plan.sizes)
                for v in recipes}
        assert all(f is not None for f in fits.values())  # the chosen candidate was fitted at both weights
        best = max(fits, key=lambda w: fits[w].val["recall@20"])
        assert best == 1e-4  # the second weight: 5.0 crushes the embeddings
        assert plan.metrics["selection"]["l2"] == best and plan.metrics["val"] == fits[best].val
        saved = json.loads((Path(grid.output_dir) / "models" / f"c{c:.2f}" / "checkpoint.json").read_text())
        assert saved["config"]["train"]["l2"] == best and saved["config"]["train"]["patience"] == 2
        other = DimensionPlan.load(Path(parallel.output_dir) / "plans" / f"c{c:.2f}")
        assert all(torch.equal(plan.sizes[s], other.sizes[s]) for s in plan.sizes)
        assert other.metrics["selection"]["l2"] == best
        assert other.metrics["test"] == pytest.approx(plan.metrics["test"], abs=1e-9)
    with pytest.raises(ValueError, match="retrain .* is not supported by the sharded search"):
        from ciess_prod.distributed.recommender import ShardedSearchExperimentConfig

        ShardedSearchExperimentConfig(retrain=retrain)


def test_budgets_retrained_by_separate_processes(tmp_path, finished_search):
    """Two runs on one finished search, each retraining some budgets, give the plans one run gives."""
    config, _ = finished_search
    split = _steps_of(config, tmp_path / "split")
    first, *rest = config.search.budgets
    partial = run_search(split, resume=True, retrain_budgets=[first])
    assert {k: partial[k] for k in ("finished", "completed_steps", "pending_budgets")} == {
        "finished": False, "completed_steps": 6, "pending_budgets": rest}
    assert partial["search_seconds"] > 0 and partial["process_seconds"] > 0
    assert not (Path(split.output_dir) / "search.json").exists()
    summary = run_search(split, resume=True, retrain_budgets=rest)
    assert summary["finished"] and set(summary["plans"]) == {f"{c:.2f}" for c in config.search.budgets}
    for c in config.search.budgets:
        a = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        b = DimensionPlan.load(Path(split.output_dir) / "plans" / f"c{c:.2f}")
        assert all(torch.equal(a.sizes[s], b.sizes[s]) for s in a.sizes)
        assert a.metrics["test"] == b.metrics["test"]


def test_budgets_retrained_by_worker_processes(tmp_path, finished_search, caplog, capfd):
    """retrain_workers spawns processes that retrain the budgets at once and give the plans one process gives."""
    import logging

    caplog.set_level(logging.INFO)  # the workers log at the caller's level
    config, _ = finished_search
    parallel = _steps_of(config, tmp_path / "workers")
    summary = run_search(parallel, resume=True, retrain_workers=2)
    assert summary["finished"] and set(summary["plans"]) == {f"{c:.2f}" for c in config.search.budgets}
    for c in config.search.budgets:
        a = DimensionPlan.load(Path(config.output_dir) / "plans" / f"c{c:.2f}")
        b = DimensionPlan.load(Path(parallel.output_dir) / "plans" / f"c{c:.2f}")
        assert all(torch.equal(a.sizes[s], b.sizes[s]) for s in a.sizes)
        assert b.metrics["test"] == pytest.approx(a.metrics["test"], abs=1e-9)
    assert (Path(parallel.output_dir) / "report").is_dir()
    # the candidates were fitted as units of their own, each distinct one once, and each budget's test read them
    record = ConfigurationRecord(tuple(config.search.budgets), config.search.recorded)
    record.load_state_dict(torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)["record"])
    candidates = {c: budget_candidates(parallel, record, c)[0] for c in config.search.budgets}
    distinct = {tuple(torch.cat([v.sizes[s] for s in sorted(v.sizes)]).tolist()) for cs in candidates.values()
                for v in cs}
    assert len(list((Path(parallel.output_dir) / "candidates").glob("*.json"))) == len(distinct) > 0
    for c in config.search.budgets:
        selection = DimensionPlan.load(Path(parallel.output_dir) / "plans" / f"c{c:.2f}").metrics["selection"]
        assert selection["reused_fits"] == len(candidates[c])
    assert f"{len(distinct)} probe(s) and candidate fit(s) first, then the tests" in caplog.text
    worker_log = capfd.readouterr().err  # the workers write to the inherited stderr, each line naming its budget
    assert all(f"[c={c:.2f}]" in worker_log for c in config.search.budgets), worker_log[-2000:]
    with pytest.raises(ValueError, match="retrain_workers must be >= 1"):
        run_search(parallel, resume=True, retrain_workers=0)


def test_train_only_workers_retrain_whole_budgets(tmp_path, finished_search, caplog):
    """`train_only` tests the fitted weights, which a fit store does not keep: each worker fits its own budget."""
    import logging

    caplog.set_level(logging.INFO)
    config, _ = finished_search
    weights = _steps_of(config, tmp_path / "train-only", protocol="train_only")
    summary = run_search(weights, resume=True, retrain_workers=2)
    assert summary["finished"] and "0 probe(s) and candidate fit(s) first, then the tests" in caplog.text
    for c in config.search.budgets:
        plan = DimensionPlan.load(Path(weights.output_dir) / "plans" / f"c{c:.2f}")
        assert plan.fits_budget() and plan.metrics["selection"]["reused_fits"] == 0


def test_a_failed_worker_names_its_budget(tmp_path, finished_search):
    """A worker's error reaches the caller with its budget; a budget whose worker succeeded keeps its plan."""
    config, _ = finished_search
    broken = _steps_of(config, tmp_path / "broken")
    state = torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)
    state["record"]["best"]["0.80"] = []  # no candidate and ...
    state["record"]["sparsest"] = None  # ... nothing to repair from: c = 0.80 (and 0.93, repaired) cannot be chosen
    torch.save(state, Path(broken.output_dir) / STATE_FILE)
    with pytest.raises(RuntimeError, match=r"budgets \[0.8, 0.93\]: c=0.8: RuntimeError\('the search visited no"):
        run_search(broken, resume=True, retrain_workers=2)
    assert DimensionPlan.load(Path(broken.output_dir) / "plans" / "c0.50").fits_budget()


def test_retrain_budgets_refuses_what_it_cannot_do(tmp_path, finished_search):
    config, _ = finished_search
    with pytest.raises(ValueError, match="unknown: \\[0.7\\]"):
        run_search(config, resume=True, retrain_budgets=[0.7])
    with pytest.raises(ValueError, match="resume=False"):
        run_search(config, retrain_budgets=[0.5])
    unfinished = dataclasses.replace(config, output_dir=str(tmp_path / "unfinished"))
    run_search(unfinished, stop_after_steps=2)
    with pytest.raises(ValueError, match="has 2 of 6 steps"):
        run_search(unfinished, resume=True, retrain_budgets=[0.5])


def test_cli_retrains_budgets_in_groups(tmp_path, finished_search, capsys):
    from ciess_prod.cli import main

    config = _steps_of(finished_search[0], tmp_path / "cli-split")
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    assert main(["search", "--config", str(path), "--resume", "--retrain-budgets", "0.5", "0.93"]) == 0
    assert "budgets still to retrain (by other processes): [0.8]" in capsys.readouterr().out
    assert main(["search", "--config", str(path), "--resume", "--retrain-budgets", "0.8"]) == 0
    out = capsys.readouterr().out
    assert "c=0.50" in out and "c=0.80" in out and "c=0.93" in out
    with pytest.raises(SystemExit):
        main(["search", "--config", str(path), "--resume", "--retrain-workers", "0"])
    assert "--retrain-workers: expected an integer >= 1, got '0'" in capsys.readouterr().err


def test_a_state_saved_before_timing_reports_unknown_seconds(tmp_path, finished_search):
    """An older search_state.pt has no "seconds": search.json says null, not NaN or 0."""
    config, _ = finished_search
    old = _steps_of(config, tmp_path / "old")
    state = torch.load(Path(config.output_dir) / STATE_FILE, weights_only=True)
    del state["seconds"]
    torch.save(state, Path(old.output_dir) / STATE_FILE)
    summary = run_search(old, resume=True)
    assert summary["search_seconds"] is None and summary["total_seconds"] is None
    assert summary["retrain_seconds"] > 0
    saved = json.loads((Path(old.output_dir) / "search.json").read_text())
    assert saved["search_seconds"] is None and saved["total_seconds"] is None


@pytest.mark.parametrize("protocol", ["final", "train_only"])
def test_a_candidate_shared_by_two_budgets_is_retrained_once(tmp_path, monkeypatch, protocol, caplog):
    """Under `final` the second budget reads the first one's retraining (same plan); `train_only` must retrain."""
    from ciess_prod.search import selection

    config = dataclasses.replace(_tiny(tmp_path, budgets=(0.5, 0.8)), protocol=protocol)
    dataset = load_dataset(config.data, ROOT)
    sizes = {"user": torch.full((dataset.n_users,), 2, dtype=torch.int16),
             "item": torch.full((dataset.n_items,), 3, dtype=torch.int16)}
    record = ConfigurationRecord(config.search.budgets, keep=1)
    record.add(Visited(4, 0.85, 0.6, sizes))  # meets both budgets
    fits = []
    real_fit = selection.fit_on_train
    monkeypatch.setattr(selection, "fit_on_train", lambda *a, **k: fits.append(1) or real_fit(*a, **k))
    config = dataclasses.replace(config, output_dir=str(tmp_path / "out"))
    first, _, _ = selection.choose_plan(config, dataset, record, 0.5)
    second, _, _ = selection.choose_plan(config, dataset, record, 0.8)
    assert len(fits) == (1 if protocol == "final" else 2)
    assert second.metrics["selection"]["reused_fits"] == (1 if protocol == "final" else 0)
    assert second.metrics["val"] == first.metrics["val"] and second.metrics["test"] == first.metrics["test"]
    assert second.metrics["selection"]["best_batches"] == first.metrics["selection"]["best_batches"]

    # a damaged entry is reported and retrained, then rewritten whole
    (entry,) = (tmp_path / "out" / "candidates").glob("*.json")
    entry.write_text('{"key": "')
    third, _, _ = selection.choose_plan(config, dataset, record, 0.8)
    assert len(fits) == (2 if protocol == "final" else 3)
    assert ("ignoring the unreadable candidate fit" in caplog.text) == (protocol == "final")  # train_only never reads
    assert third.metrics["test"] == first.metrics["test"]
    assert json.loads(entry.read_text())["best_batches"] == first.metrics["selection"]["best_batches"]


def test_restarts_pool_their_records_and_probe_each_restarts_best(tmp_path):
    """Pooled records keep every restart's configurations, tagged with the restart and ranked by mean q; the probe
    pool takes each restart's best `probe_top`, and the candidates are ranked by probe across restarts."""
    from ciess_prod.search.candidates import CandidateFit, CandidateFits
    from ciess_prod.search.selection import probe_pool

    with pytest.raises(ValueError, match="restarts must be >= 1"):
        SearchConfig(restarts=0)

    def visited(step: int, size: int, q: float) -> Visited:
        return Visited(step, 1 - size / 16, q, {"user": torch.full((5,), size), "item": torch.full((4,), step + 1)})

    first, second = ConfigurationRecord((0.5,), keep=2), ConfigurationRecord((0.5,), keep=2)
    for v in (visited(0, 4, 0.9), visited(1, 3, 0.8), visited(2, 7, 0.7)):
        first.add(v)
    for v in (visited(0, 5, 0.95), visited(1, 1, 0.5)):
        second.add(v)
    pooled = ConfigurationRecord.pooled([first, second])
    assert [(v.restart, v.step) for v in pooled.best[0.5]] == [(1, 0), (0, 0), (0, 1), (1, 1)]
    assert (pooled.sparsest.restart, pooled.sparsest.step) == (1, 1) and pooled.keep == 4
    alone = ConfigurationRecord.pooled([first])  # what a search without restarts selects from: its own record
    assert alone.keep == first.keep and alone.sparsest == first.sparsest
    assert [(v.restart, v.step) for v in alone.best[0.5]] == [(0, v.step) for v in first.best[0.5]]
    reloaded = ConfigurationRecord((0.5,), keep=4)
    reloaded.load_state_dict(pooled.state_dict())
    assert [(v.restart, v.step) for v in reloaded.best[0.5]] == [(1, 0), (0, 0), (0, 1), (1, 1)]

    config = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, budgets=(0.5,), top_l=1, probe_top=1,
                                                                  restarts=2))
    pool = probe_pool(config, pooled, 0.5)
    assert [(v.restart, v.step) for v in pool] == [(1, 0), (0, 0)]  # each restart's best by mean q
    probes = CandidateFits(tmp_path / "probes", {"probe": True})
    for v, recall in zip(pool, (0.10, 0.30), strict=True):
        probes.put(v.sizes, CandidateFit(val={"recall@20": recall}, best_batches=20, seconds=1.0))
    ranked, _ = budget_candidates(config, pooled, 0.5, probes)
    assert [(v.restart, v.step) for v in ranked] == [(0, 0)]  # restart 0's, by its probe, though its mean q is lower


def test_restarts_run_whole_searches_at_successive_seeds_and_choose_from_all(tmp_path):
    """`restarts`: the first restart is the search at its own seed (a finished one's steps are kept), the next run
    the steps a search alone at seed + 1 runs, and every budget's plan is the best probe over all restarts."""
    from ciess_prod.search import selection

    settings = {"budgets": (0.3, 0.6), "top_l": 1, "probe_top": 2, "probe_batches": 20, "candidates_from": "loosest"}
    one = _tiny(tmp_path, "restarts", **settings)
    assert run_search(one)["finished"]
    first = torch.load(Path(one.output_dir) / STATE_FILE, weights_only=True)
    two = dataclasses.replace(one, search=dataclasses.replace(one.search, restarts=2))
    assert run_search(two, resume=True, stop_after_steps=2) == {"completed_steps": 8, "finished": False}
    kept = torch.load(Path(one.output_dir) / STATE_FILE, weights_only=True)
    assert kept["seconds"] == first["seconds"] and kept["step"] == 6  # restart 0's steps were not run again
    summary = run_search(two, resume=True)
    assert summary["finished"] and summary["completed_steps"] == 12
    assert [(r["seed"], r["completed_steps"]) for r in summary["restarts"]] == [(0, 6), (1, 6)]
    assert summary["search_seconds"] == pytest.approx(sum(r["search_seconds"] for r in summary["restarts"]))

    alone = _tiny(tmp_path, "seed1", seed=1, **settings)
    assert run_search(alone, stop_after_steps=5)["finished"] is False  # its steps only
    restart = torch.load(Path(one.output_dir) / "restart1" / STATE_FILE, weights_only=True)
    solo = torch.load(Path(alone.output_dir) / STATE_FILE, weights_only=True)
    assert restart["history"][:5] == solo["history"] and restart["settings"] == solo["settings"]

    records = []
    for state in (kept, restart):
        record = ConfigurationRecord(tuple(one.search.budgets), one.search.recorded)
        record.load_state_dict(state["record"])
        records.append(record)
    pooled = ConfigurationRecord.pooled(records)
    dataset = load_dataset(two.data, ROOT)
    probes = selection.probe_fits(two, dataset, Path(two.output_dir))
    pool = selection.probe_pool(two, pooled, 0.3)
    recalls = {(v.restart, v.step): probes.get(v.sizes).val["recall@20"] for v in pool}
    assert {r for r, _ in recalls} == {0, 1}  # both restarts were probed
    history = json.loads((Path(two.output_dir) / "report" / "history.json").read_text())["history"]
    assert [h["restart"] for h in history] == [0] * 6 + [1] * 6 and history[6]["global_step"] == 6
    for c in two.search.budgets:
        plan = DimensionPlan.load(Path(two.output_dir) / "plans" / f"c{c:.2f}")
        chosen = plan.metrics["selection"]
        assert chosen["probe_recall@20"] == max(recalls.values()) and plan.fits_budget()
        assert recalls[chosen["restart"], chosen["step"]] == chosen["probe_recall@20"]
        assert plan.seed == chosen["restart"]  # the seed of the restart that visited it (seed 0 + restart)
