"""bench/ml1m_search.py's search variants (ciess_fill reuses the finished ciess search) and summarize's side-by-side
table of the size methods."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from bench import ml1m_baselines, ml1m_search, summarize
from bench.ml1m_search import STATE_FILE, reuse_search_state, variant, with_l2, with_search_settings
from ciess_prod.config import to_dict
from ciess_prod.experiment import load_dataset
from ciess_prod.search import DimensionPlan
from ciess_prod.search.environment import SizeEnvironment
from ciess_prod.search.search import run_search
from ciess_prod.search.selection import FITS_DIR
from tests.test_search import TINY


def test_variants_change_only_their_switch():
    base = dataclasses.replace(TINY, output_dir="/data/run")
    assert variant(base, "ciess") is base
    no_walk, fill = variant(base, "ciess_no_walk"), variant(base, "ciess_fill")
    assert no_walk.search.exploration.walk is False and no_walk.search.fill_budget is False
    assert fill.search.fill_budget is True and fill.search.exploration == base.search.exploration
    scaled = variant(base, "ciess_scaled")
    assert scaled.search == dataclasses.replace(base.search, fill_budget=True, candidates_from="loosest")
    assert scaled.output_dir == "/data/run-scaled" and scaled.reference_dir == "/data/run/reference"
    even = variant(base, "ciess_even")
    assert even.search == dataclasses.replace(scaled.search, within_side="even") and even.output_dir == "/data/run-even"
    assert (no_walk.output_dir, fill.output_dir) == ("/data/run-no-walk", "/data/run-fill")
    assert no_walk.reference_dir == fill.reference_dir == "/data/run/reference"  # one reference model for all


def test_another_lambda_or_gamma_searches_in_its_own_directory_with_the_shared_reference():
    base = dataclasses.replace(TINY, output_dir="/data/run")
    assert with_search_settings(base) is base
    assert with_search_settings(base, base.search.size_penalty, base.search.td3.gamma) is base
    other = with_search_settings(base, 2.0)
    assert other.search.size_penalty == 2.0 and other.output_dir == "/data/run-lambda2"
    assert other.reference_dir == "/data/run/reference"  # same training recipe: the reference model is shared
    assert dataclasses.replace(other, search=base.search, output_dir=base.output_dir, reference_dir=None) == base
    no_walk = variant(other, "ciess_no_walk")
    assert no_walk.output_dir == "/data/run-lambda2-no-walk" and no_walk.search.size_penalty == 2.0
    assert no_walk.reference_dir == "/data/run/reference"
    bandit = with_search_settings(base, 2.0, gamma=0.0)
    assert bandit.output_dir == "/data/run-lambda2-gamma0" and bandit.reference_dir == "/data/run/reference"
    assert (bandit.search.size_penalty, bandit.search.td3.gamma) == (2.0, 0.0)
    assert dataclasses.replace(bandit.search, td3=base.search.td3, size_penalty=base.search.size_penalty) == base.search
    assert with_search_settings(base, gamma=0.5).output_dir == "/data/run-gamma0.5"
    hits = with_search_settings(base, 2.0, item_quality="hits")
    assert hits.output_dir == "/data/run-lambda2-items-hits" and hits.search.environment.item_quality == "hits"
    assert with_search_settings(base, item_quality="users") is base
    warm_up = with_search_settings(base, 2.0, item_quality="hits", random_steps=20)
    assert warm_up.output_dir == "/data/run-lambda2-items-hits-random20"
    assert warm_up.search.exploration.random_steps == 20 and warm_up.search.exploration.walk
    principal = with_search_settings(base, 2.0, item_quality="hits", reference_basis="principal")
    assert principal.output_dir == "/data/run-lambda2-items-hits-principal"
    assert principal.search.environment.reference_basis == "principal" and principal.search.environment.protocol == \
        base.search.environment.protocol
    assert with_search_settings(base, reference_basis="trained") is base
    probed = with_search_settings(base, probe_top=4)
    assert probed.output_dir == "/data/run-probe4" and probed.search.probe_top == 4
    assert probed.reference_dir == "/data/run/reference" and with_search_settings(base, probe_top=0) is base
    tracked = with_search_settings(base, probe_top=4, penalty_control="loosest")
    assert tracked.output_dir == "/data/run-probe4-track" and tracked.search.penalty_control == "loosest"
    assert with_search_settings(base, penalty_control="fixed") is base
    reseeded = with_search_settings(base, penalty_control="loosest", seed=1)
    assert reseeded.output_dir == "/data/run-track-seed1" and reseeded.search.seed == 1
    assert reseeded.data == base.data and reseeded.reference_dir == "/data/run/reference"  # same split and reference
    assert with_search_settings(base, seed=base.search.seed) is base
    signed = with_search_settings(base, penalty_control="signed", seed=2)
    assert signed.output_dir == "/data/run-signed-seed2" and signed.search.penalty_control == "signed"
    damped = with_search_settings(base, penalty_control="signed", seed=2, penalty_gain=1.5)
    assert damped.output_dir == "/data/run-signed-gain1.5-seed2" and damped.search.penalty_gain == 1.5
    assert with_search_settings(base, penalty_gain=0.0) is base
    pooled = with_search_settings(base, seed=2, restarts=3)
    assert pooled.output_dir == "/data/run-seed2-restarts3" and pooled.search.restarts == 3
    assert pooled.reference_dir == "/data/run/reference" and with_search_settings(base, restarts=1) is base


def test_another_l2_trains_its_own_reference_in_its_own_directory():
    base = dataclasses.replace(TINY, output_dir="/data/run", reference_dir="/data/shared/reference")
    assert with_l2(base, None) is base and with_l2(base, base.train.l2) is base
    other = with_l2(base, 1e-3)
    assert other.train == dataclasses.replace(base.train, l2=1e-3) and other.search == base.search
    assert other.output_dir == "/data/run-l20.001" and other.reference_dir is None  # a reference of its recipe
    signed = with_search_settings(other, penalty_control="signed")
    assert signed.output_dir == "/data/run-l20.001-signed" and signed.reference_dir == "/data/run-l20.001/reference"
    assert variant(signed, "ciess_no_walk").reference_dir == "/data/run-l20.001/reference"


@pytest.mark.parametrize("text", ["-0.5", "nan", "inf", "lots"])
def test_l2_flags_refuse_what_is_not_a_finite_weight(text, capsys):
    for script in (ml1m_baselines, ml1m_search):
        with pytest.raises(SystemExit) as exit_info:
            script.main(["--l2", text])
        assert exit_info.value.code == 2 and f"expected a number >= 0, got '{text}'" in capsys.readouterr().err


def test_reuse_refuses_a_search_whose_steps_are_unfinished(tmp_path):
    with pytest.raises(SystemExit, match="has 0: run --methods ciess first"):
        reuse_search_state(tmp_path / "ciess", tmp_path / "fill", 300)
    (tmp_path / "ciess").mkdir()
    torch.save({"step": 299}, tmp_path / "ciess" / STATE_FILE)
    with pytest.raises(SystemExit, match="300 steps; .* has 299"):
        reuse_search_state(tmp_path / "ciess", tmp_path / "fill", 300)
    assert not (tmp_path / "fill").exists()
    torch.save({"step": 300}, tmp_path / "ciess" / STATE_FILE)  # steps done, its own retraining not: enough
    reuse_search_state(tmp_path / "ciess", tmp_path / "fill", 300)
    assert torch.load(tmp_path / "fill" / STATE_FILE, weights_only=True) == {"step": 300}


def test_ciess_fill_retrains_the_finished_search_into_the_unused_budget(tmp_path, monkeypatch, one_torch_thread):
    base = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    run_search(base)
    fill = variant(base, "ciess_fill")
    steps = TINY.search.episodes * TINY.search.steps_per_episode
    reuse_search_state(Path(base.output_dir), Path(fill.output_dir), steps)
    state = (Path(fill.output_dir) / STATE_FILE).read_bytes()
    reuse_search_state(Path(base.output_dir), Path(fill.output_dir), steps)  # a second call keeps what is there
    assert (Path(fill.output_dir) / STATE_FILE).read_bytes() == state

    def no_search_step(*args, **kwargs):
        raise AssertionError("ciess_fill ran a search step; it must only retrain")

    monkeypatch.setattr(SizeEnvironment, "evaluate", no_search_step)
    summary = run_search(fill, resume=True)
    assert summary["finished"] and summary["completed_steps"] == steps
    grown = 0
    for c in TINY.search.budgets:
        plain = DimensionPlan.load(Path(base.output_dir) / "plans" / f"c{c:.2f}")
        filled = DimensionPlan.load(Path(fill.output_dir) / "plans" / f"c{c:.2f}")
        assert c - 1e-9 <= filled.achieved_sparsity <= plain.achieved_sparsity  # grown, still within the budget
        for side, sizes in filled.sizes.items():
            assert bool((sizes >= plain.sizes[side]).all())  # no row shrinks
        grown += filled.achieved_sparsity < plain.achieved_sparsity
    assert grown > 0  # the tiny search leaves budget unused somewhere, and fill_budget takes it


def test_compare_table_takes_the_latest_epoch_row_per_method_and_budget(monkeypatch, capsys):
    def row(method, c, r20, achieved, length="epochs", model="lightgcn", sha="a" * 40):
        return {"model": model, "method": method, "target_sparsity": c, "recall@20": r20, "ndcg@20": r20 * 2,
                "achieved_sparsity": achieved, "final_length": length, "git_sha": sha}

    rows = [row("es", 0.8, 0.1, 0.805, sha="0" * 40), row("es", 0.8, 0.2, 0.805),
            row("es", 0.9, 0.3, 0.906, length="batches"), row("ciess", 0.9, 0.15, 0.933, sha="b" * 40),
            {**row("ciess", 0.9, 0.25, 0.91), "size_penalty": 2.0},
            {**row("ciess", 0.9, 0.05, 0.95), "size_penalty": summarize.DEFAULT_SIZE_PENALTY,
             "gamma": summarize.DEFAULT_GAMMA},
            {**row("ciess", 0.8, 0.3, 0.82), "size_penalty": 2.0, "gamma": 0.0},
            {**row("ciess", 0.95, 0.1, 0.95), "size_penalty": 2.0, "gamma": 0.99, "item_quality": "hits",
             "random_steps": 0},
            {**row("ciess", 0.95, 0.12, 0.96), "size_penalty": 2.0, "item_quality": "hits", "random_steps": 20},
            {**row("ciess", 0.95, 0.11, 0.95), "reference_basis": "trained"},
            {**row("ciess", 0.9, 0.14, 0.9), "reference_basis": "principal"},
            {**row("ciess", 0.9, 0.16, 0.9), "probe_top": 6, "probe_spread": 0.2, "candidates_from": "budget",
             "penalty_control": "loosest"},
            {**row("ciess", 0.9, 0.17, 0.9), "probe_top": 0, "probe_spread": 0.0, "penalty_control": "fixed"},
            row("full", 0.0, 0.5, 0.0), row("es", 0.8, 0.9, 0.8, model="ngcf"),
            {**row("es", 0.8, 0.21, 0.805), "seed": 1}, {**row("es", 0.8, 0.19, 0.805), "seed": 0}]
    monkeypatch.setattr(summarize, "read", lambda name: rows)
    summarize.ml1m_compare_table()
    lines = capsys.readouterr().out.splitlines()
    # the default settings' rows stay `ciess`; another seed gets its own column beside seed 0's
    labels = ["es", "es seed=1", "ciess", "ciess basis=principal", "ciess probe=6 spread=0.2 per-budget λ:loosest",
              "ciess λ=2", "ciess λ=2 items=hits", "ciess λ=2 items=hits random=20", "ciess λ=2 γ=0"]
    assert lines[0] == "| c | " + " | ".join(labels) + " |"
    assert lines[2] == ("| 0.8 | 0.1900 / 0.3800 (0.805) | 0.2100 / 0.4200 (0.805) | - | - | - | - | - | - "
                        "| 0.3000 / 0.6000 (0.820) |")
    # the default probe_top, probe_spread and penalty_control (0, 0, fixed) stay `ciess`: the latest such row replaces
    # 0.05
    assert lines[3] == ("| 0.9 | - | - | 0.1700 / 0.3400 (0.900) | 0.1400 / 0.2800 (0.900) | 0.1600 / 0.3200 (0.900) "
                        "| 0.2500 / 0.5000 (0.910) | - | - | - |")
    assert lines[4] == ("| 0.95 | - | - | 0.1100 / 0.2200 (0.950) | - | - | - | 0.1000 / 0.2000 (0.950) "
                        "| 0.1200 / 0.2400 (0.960) | - |")
    # the shown rows' code, not the replaced ones'
    assert lines[5] == "| git | " + " | ".join(["aaaaaaa"] * 9) + " |"
    assert len(lines) == 6
    damped = {**row("ciess", 0.8, 0.2, 0.8), "penalty_control": "signed", "penalty_gain": 1.5, "seed": 2}
    assert summarize.method_label(damped) == "ciess λ:signed Kp=1.5 seed=2"
    assert summarize.method_label({**damped, "penalty_gain": 0.0}) == "ciess λ:signed seed=2"
    # the paper's top-l shows once more than one candidate per budget was fitted in full
    assert summarize.method_label({**damped, "top_l": 1}) == "ciess λ:signed Kp=1.5 seed=2"
    top3 = {**damped, "top_l": 3, "probe_top": 6}
    assert summarize.method_label(top3) == "ciess top=3 probe=6 λ:signed Kp=1.5 seed=2"
    full = {**top3, "top_l": 1, "probe": "full", "probe_l2": 1e-3}  # the default short probe carries no label
    assert summarize.method_label(full) == "ciess probe=6 full@0.001 λ:signed Kp=1.5 seed=2"
    assert summarize.method_label({**top3, "probe": "short"}) == summarize.method_label(top3)
    assert summarize.method_label({**damped, "l2": 1e-3}) == "ciess λ:signed Kp=1.5 L2=0.001 seed=2"
    assert summarize.method_label({**damped, "l2": summarize.DEFAULT_L2}) == summarize.method_label(damped)
    assert summarize.method_label({**damped, "restarts": 3}) == "ciess λ:signed Kp=1.5 seed=2 restarts=3"
    assert summarize.method_label({**damped, "restarts": 1}) == summarize.method_label(damped)


def test_search_diagnosis_reads_a_finished_search(tmp_path, one_torch_thread):
    from bench.search_diagnosis import main as diagnose

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    run_search(config)
    config_file = tmp_path / "search.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    results = tmp_path / "diagnosis.jsonl"
    assert diagnose([str(tmp_path / "run"), "--config", str(config_file), "--results", str(results)]) == 0
    records = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["side"] for r in records] == ["user", "item"]
    for r in records:
        buckets = [v for v in r["reward_by_size"].values() if v is not None]
        assert r["transitions"] > 0 and buckets  # every transition falls in some bucket
        assert 1 <= r["probes"]["from_full"]["actor_mean_size"] <= TINY.model.d_max  # each episode starts at full size
        assert list(r["probes"]["from_full"]["critic_q"]) == ["1", "4", "16"]  # sizes up to d_max (JSON keys)
        assert list(r["mean_reward_by_steps"]) == list(r["mean_sparsity_by_steps"]) == ["0-10"]  # 6 steps
        history = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)["history"]
        assert r["visited_meeting_budget"] == {f"{c}": sum(e["sparsity"] >= c for e in history)
                                               for c in TINY.search.budgets}
        plans = {f"{c}": DimensionPlan.load(tmp_path / "run" / "plans" / f"c{c:.2f}") for c in TINY.search.budgets}
        assert list(r["plan_scatter"]) == list(plans)  # every saved plan, its own mean size
        for c, scatter in r["plan_scatter"].items():
            assert scatter["mean"] == pytest.approx(plans[c].sizes[r["side"]].double().mean().item(), abs=1e-3)


def test_search_diagnosis_measures_the_random_warm_up(tmp_path, one_torch_thread):
    from bench.search_diagnosis import main as diagnose

    exploration = dataclasses.replace(TINY.search.exploration, random_steps=2)
    config = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, exploration=exploration),
                                 output_dir=str(tmp_path / "run"))
    run_search(config, stop_after_steps=3)
    config_file = tmp_path / "search.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(TINY)))  # the warm-up comes from the flag, as for the bench's runs
    results = tmp_path / "diagnosis.jsonl"
    args = [str(tmp_path / "run"), "--config", str(config_file), "--results", str(results)]
    assert diagnose([*args, "--random-steps", "2"]) == 0
    state = torch.load(tmp_path / "run" / STATE_FILE, weights_only=True)
    history = state["history"]
    for r in (json.loads(line) for line in results.read_text().splitlines()):
        warm_up = r["warm_up"]
        assert warm_up["transitions"] == 2 * len(state["sizes"][r["side"]])  # the first two steps, every row
        # the same rows' q as the history's per-step means, read from the buffer instead
        want = (history[0][f"mean_q_{r['side']}"] + history[1][f"mean_q_{r['side']}"]) / 2
        assert warm_up["mean_q"] == pytest.approx(want, abs=1e-4)
        assert all(0 <= q <= 1 for q in warm_up["q_by_size"].values() if q is not None)
    assert diagnose(args + ["--results", str(tmp_path / "plain.jsonl")]) == 0  # no warm-up: nothing to measure
    assert all("warm_up" not in json.loads(line) for line in (tmp_path / "plain.jsonl").read_text().splitlines())


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--size-penalty", "-1", "--size-penalty must be a number >= 0"),
    ("--size-penalty", "nan", "--size-penalty must be a number >= 0"),
    ("--gamma", "-0.1", "--gamma must lie in [0, 1]"),
    ("--gamma", "1.5", "--gamma must lie in [0, 1]"),
    ("--gamma", "nan", "--gamma must lie in [0, 1]"),
    ("--item-quality", "rank", "invalid choice: 'rank'"),
    ("--random-steps", "-1", "--random-steps must be >= 0"),
    ("--retrain-workers", "0", "expected an integer >= 1"),
    ("--probe-top", "-1", "--probe-top must be 0 or >= the config's top_l"),
    ("--penalty-control", "pid", "invalid choice: 'pid'"),
    ("--penalty-gain", "-1", "--penalty-gain must be a number >= 0"),
    ("--penalty-gain", "nan", "--penalty-gain must be a number >= 0"),
])
def test_a_bad_lambda_or_gamma_is_refused_before_any_work(flag, value, message, capsys):
    from bench.ml1m_search import main

    with pytest.raises(SystemExit):
        main(["--methods", "ciess", flag, value])
    assert message in capsys.readouterr().err


def test_own_steps_without_a_retrained_method_is_refused(capsys):
    from bench.ml1m_search import main

    with pytest.raises(SystemExit):
        main(["--methods", "ciess", "mr", "--own-steps"])
    assert "--own-steps applies to ciess_fill, ciess_scaled, ciess_even only" in capsys.readouterr().err


def test_the_bench_retrains_budgets_in_workers_and_records_it(tmp_path, one_torch_thread):
    from bench.ml1m_search import main

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    results = tmp_path / "ml1m.jsonl"
    assert main(["--config", str(path), "--methods", "ciess", "--results", str(results), "--retrain-workers", "2"]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["target_sparsity"] for r in rows] == list(config.search.budgets)
    for r in rows:
        plan = DimensionPlan.load(tmp_path / "run" / "plans" / f"c{r['target_sparsity']:.2f}")
        assert r["recall@20"] == plan.metrics["test"]["recall@20"] and r["retrain_workers"] == 2
        assert r["top_l"] == config.search.top_l and r["probe_spread"] == config.search.probe_spread
        assert r["probe"] == "short" and "probe_l2" not in r  # the full probe's weight only where it ran
        assert 0 < r["retrain_seconds"] and 0 < r["process_seconds"]


def test_processes_given_budgets_each_write_those_budgets_rows(tmp_path, one_torch_thread):
    """--retrain-budgets: each process writes the rows of the budgets it retrained, none twice, with that budget's
    retraining seconds; together they are the rows one process writes."""
    from bench.ml1m_search import main
    from tests.test_search import _steps_of

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "whole"))
    path = tmp_path / "whole.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    whole = tmp_path / "whole.jsonl"
    assert main(["--config", str(path), "--methods", "ciess", "--results", str(whole)]) == 0
    (tmp_path / "split").mkdir()
    split = _steps_of(config, tmp_path / "split")
    path.write_text(yaml.safe_dump(to_dict(split)))
    results = tmp_path / "split.jsonl"
    first, *rest = config.search.budgets
    for group in ([first], rest):
        assert main(["--config", str(path), "--methods", "ciess", "--results", str(results), "--resume",
                     "--retrain-budgets", *map(str, group)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["target_sparsity"] for r in rows] == list(config.search.budgets)
    for r, w in zip(rows, (json.loads(line) for line in whole.read_text().splitlines()), strict=True):
        plan = DimensionPlan.load(tmp_path / "split" / "plans" / f"c{r['target_sparsity']:.2f}")
        assert r["recall@20"] == w["recall@20"] and r["search_seconds"] == w["search_seconds"]
        assert 0 < r["retrain_seconds"] == round(plan.metrics["selection"]["retrain_seconds"], 1)
        group = [first] if r["target_sparsity"] == first else rest
        assert r["retrain_budgets"] == group and "retrain_budgets" not in w
        assert r["wall_seconds"] == pytest.approx(r["search_seconds"] + r["retrain_seconds"], abs=0.11)


def test_the_bench_retrains_at_several_l2_weights_and_records_the_one_tested(tmp_path, one_torch_thread):
    """--retrain-l2: the searches' candidates and mr/freq are fitted at each weight, the best on validation tested;
    rows record that weight as l2 and the grid as retrain_l2, and get a column of their own."""
    from bench.ml1m_search import main

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    results = tmp_path / "ml1m.jsonl"
    assert main(["--config", str(path), "--methods", "ciess", "mr", "--results", str(results), "--retrain-l2", "5",
                 "1e-4", "--retrain-patience", "2"]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["method"] for r in rows] == ["ciess"] * 3 + ["mr"] * 3
    (out,) = tmp_path.glob("run-retrain*")  # not the config's output_dir: its plans would be replaced
    for r in rows:
        assert r["l2"] == 1e-4 and r["retrain_l2"] == [5.0, 1e-4] and r["retrain_patience"] == 2
        assert "retrain_max_batches" not in r  # the recipe's cap
        assert summarize.method_label(r) == f"{r['method']} L2∈{{5,0.0001}} patience=2"
    for r in rows[:3]:
        plan = DimensionPlan.load(out / "plans" / f"c{r['target_sparsity']:.2f}")
        assert plan.metrics["selection"]["l2"] == r["l2"] and r["recall@20"] == plan.metrics["test"]["recall@20"]


@pytest.mark.parametrize("flags,message", [
    (["--retrain-l2", "-1"], "expected a number >= 0, got '-1'"),
    (["--retrain-l2", "1e-3", "1e-3"], "retrain.l2 must be distinct weights >= 0"),
    (["--retrain-patience", "0"], "retrain.patience must be >= 1"),
    (["--retrain-max-batches", "0"], "retrain.max_batches must be >= 1"),
])
def test_bad_retrain_flags_are_refused_before_any_work(flags, message, capsys):
    for script in (ml1m_baselines, ml1m_search):
        with pytest.raises(SystemExit) as exit_info:
            script.main(flags)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_own_size_response_buckets_each_rows_quality_by_its_own_size():
    from bench.own_size_response import side_response

    sizes = torch.tensor([1.0, 2.0, 5.0, 20.0, 40.0, 100.0, 128.0])
    q = sizes / 128
    popularity = torch.tensor([1, 1, 1, 1, 5, 9, 9])
    response = side_response(sizes, q, 2 * q, popularity, 128)
    assert response["rows"] == 7 and response["mean_q"] == pytest.approx(float(q.mean()), abs=1e-4)
    assert response["q_by_size"] == {"[1,4)": round(1.5 / 128, 4), "[4,8)": round(5 / 128, 4), "[8,16)": None,
                                     "[16,32)": round(20 / 128, 4), "[32,64)": round(40 / 128, 4),
                                     "[64,129)": round(114 / 128, 4)}
    assert response["raw_by_size"]["[64,129)"] == round(228 / 128, 4)
    # popularity's 2/3 quantile is 5: the rows of sizes 40, 100 and 128
    assert response["q_by_size_popular_third"] == {"[1,4)": None, "[4,8)": None, "[8,16)": None, "[16,32)": None,
                                                   "[32,64)": round(40 / 128, 4), "[64,129)": round(114 / 128, 4)}


@pytest.mark.parametrize("protocol", ["warm", "paper"])
def test_own_size_response_runs_either_protocol(tmp_path, protocol, one_torch_thread):
    from bench.own_size_response import main

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    results = tmp_path / "own_size.jsonl"
    args = ["--config", str(path), "--protocol", protocol, "--batches", "3", "--draws", "2", "--item-quality", "hits"]
    assert main([*args, "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [r["side"] for r in rows] == ["user", "item"]
    dataset = load_dataset(config.data)
    for r, n in zip(rows, (dataset.n_users, dataset.n_items), strict=True):
        assert (r["protocol"], r["batches"], r["item_quality"], r["draws"]) == (protocol, 3, "hits", 2)
        assert r["reference_basis"] == "trained"
        assert r["rows"] == 2 * n and 0 <= r["mean_q"] <= 1
        assert all(v is None or 0 <= v <= 1 for v in r["q_by_size"].values())
    assert (tmp_path / "run" / "reference" / "checkpoint.json").is_file()  # trained once, then reused


def test_own_size_table_orders_buckets_by_size(monkeypatch, capsys):
    row = {"side": "item", "protocol": "warm", "batches": 40, "seed": 0, "git_sha": "c" * 40,
           "q_by_size": {"[16,32)": 0.9, "[1,4)": 0.5, "[4,8)": None},
           "q_by_size_popular_third": {"[16,32)": 0.8, "[1,4)": 0.2, "[4,8)": None}}
    monkeypatch.setattr(summarize, "read", lambda name: [row, {**row, "reference_basis": "principal"}])
    summarize.own_size_table()
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("| side | protocol | basis | batches | seed | q [1,4) | q [4,8) | q [16,32) |")
    assert lines[2] == "| item | warm | trained | 40 | 0 | 0.500 | - | 0.900 | 0.200 / - / 0.800 | ccccccc |"
    assert lines[3].startswith("| item | warm | principal |")


def test_own_steps_times_a_whole_scaled_search_without_the_ciess_run(tmp_path, one_torch_thread):
    from bench.ml1m_search import main

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    results = tmp_path / "ml1m.jsonl"
    with pytest.raises(SystemExit, match="run --methods ciess first"):  # without the flag it copies `ciess`'s steps
        main(["--config", str(path), "--methods", "ciess_scaled", "--results", str(results)])
    assert main(["--config", str(path), "--methods", "ciess_scaled", "--own-steps", "--results", str(results)]) == 0
    # the steps ran in the variant's own directory; the base's holds only the shared reference model
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["reference"]
    steps = TINY.search.episodes * TINY.search.steps_per_episode
    assert torch.load(tmp_path / "run-scaled" / STATE_FILE, weights_only=True)["step"] == steps
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["method"], r["target_sparsity"], r["own_steps"]) for r in rows] == [
        ("ciess_scaled", c, True) for c in TINY.search.budgets]
    # the variant's selection settings, which its method name implies, are recorded too
    assert all(r["fill_budget"] is True and r["candidates_from"] == "loosest" for r in rows)
    for r in rows:
        assert 0 < r["search_seconds"] <= r["process_seconds"]  # the steps ran in this process


def test_probe_ranking_probes_the_pool_and_fits_both_picks_once(tmp_path, one_torch_thread, capsys):
    """bench/probe_ranking.py probes the record's pool, fully fits the probe's and mean q's picks into the search's
    stores (read back, not rerun, the second time), and records both picks' full recall."""
    from bench.probe_ranking import main as probe_ranking

    config = dataclasses.replace(TINY, search=dataclasses.replace(TINY.search, top_l=3),
                                 output_dir=str(tmp_path / "run"))
    run_search(config)
    config_file = tmp_path / "search.yaml"
    config_file.write_text(yaml.safe_dump(to_dict(config)))
    results = tmp_path / "probe.jsonl"
    args = [str(tmp_path / "run"), "--config", str(config_file), "--pool", "3", "--probe-batches", "20",
            "--results", str(results)]
    assert probe_ranking([*args, "--workers", "2"]) == 0
    stored = sorted((tmp_path / "run" / "candidates").glob("*.json"))
    (first,) = [json.loads(line) for line in results.read_text().splitlines()]
    assert first["pool"] == 3 and first["probe_batches"] == 20 and first["budget"] == 0.5
    entries = first["configurations"]
    assert [e["mean_q"] for e in entries] == sorted((e["mean_q"] for e in entries), reverse=True)
    assert all(0 <= e["probe_recall@20"] <= 1 and e["probe_best_batches"] <= 20 for e in entries)
    by_probe = max(entries, key=lambda e: e["probe_recall@20"])
    assert first["probe_pick_step"] == by_probe["step"] and first["q_pick_step"] == entries[0]["step"]
    assert first["q_pick_full_recall@20"] == entries[0]["full_recall@20"]
    assert first["probe_pick_full_recall@20"] == by_probe["full_recall@20"]
    assert sum("full_recall@20" in e for e in entries) == len({by_probe["step"], entries[0]["step"]})
    assert "probe's pick: step" in capsys.readouterr().out
    assert probe_ranking(args) == 0  # everything is read from the stores
    assert sorted((tmp_path / "run" / "candidates").glob("*.json")) == stored
    second = json.loads(results.read_text().splitlines()[1])
    assert second["configurations"] == entries  # the seconds too: the stored fits, not new ones
    with pytest.raises(SystemExit):
        probe_ranking([str(tmp_path / "nothing"), "--config", str(config_file), "--results", str(results)])
    assert "search_state.pt does not exist" in capsys.readouterr().err


def test_sparse_product_bench_times_both_products_at_both_thread_counts(tmp_path, capsys):
    from bench.sparse_product import main

    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(TINY)))
    results = tmp_path / "sparse_product.jsonl"
    threads = torch.get_num_threads()
    assert main(["--config", str(path), "--repeats", "2", "--results", str(results)]) == 0
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert [(r["implementation"], r["threads"]) for r in rows] == [
        ("scipy", 1), ("torch_csr", 1), ("scipy", 2), ("torch_csr", 2)]
    assert all(r["ms_per_product"] > 0 and r["d"] == TINY.model.d_max for r in rows)
    assert torch.get_num_threads() == threads  # the caller's thread count is restored
    assert capsys.readouterr().out.count("| torch_csr |") == 2


def test_summarize_names_an_unknown_table(capsys):
    with pytest.raises(SystemExit) as stop:
        summarize.main(["ml1m-compre"])
    assert stop.value.code == 2
    assert "invalid choice: 'ml1m-compre'" in capsys.readouterr().err


def test_plan_scatter_separates_a_popularity_trend_from_noise():
    from bench.search_diagnosis import plan_scatter

    popularity = torch.arange(1, 401)
    trend = 1 + torch.arange(400) // 20  # one size per popularity bin: popularity explains all of the spread
    scatter = plan_scatter(trend, popularity)
    assert scatter["std_within_popularity_bins"] == 0 and scatter["std"] > 5 and scatter["corr_log_popularity"] > 0.8
    assert scatter["mean_by_popularity_bin"] == [float(b) for b in range(1, 21)]
    noise = torch.randint(1, 40, (400,), generator=torch.Generator().manual_seed(0))
    scatter = plan_scatter(noise, popularity)  # none of it
    assert scatter["std_within_popularity_bins"] > 0.9 * scatter["std"] and abs(scatter["corr_log_popularity"]) < 0.2
    assert plan_scatter(torch.full((400,), 3), popularity)["corr_log_popularity"] == 0  # no spread, no correlation


def test_steps_from_retrains_another_runs_steps_under_new_settings(tmp_path, monkeypatch, one_torch_thread, capsys):
    """--steps-from: no step runs again, the first run's fits at an unchanged recipe are read back, the new weight is
    fitted, and the rows record where the steps came from."""
    from bench.ml1m_search import main

    config = dataclasses.replace(TINY, output_dir=str(tmp_path / "run"))
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(to_dict(config)))
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    assert main(["--config", str(path), "--methods", "ciess", "--results", str(first)]) == 0

    def no_search_step(*args, **kwargs):
        raise AssertionError("a search step ran; --steps-from must only retrain")

    monkeypatch.setattr(SizeEnvironment, "evaluate", no_search_step)
    assert main(["--config", str(path), "--methods", "ciess", "--results", str(second), "--steps-from",
                 str(tmp_path / "run"), "--retrain-l2", str(TINY.train.l2), "5"]) == 0
    (out,) = tmp_path.glob("run-retrain*")
    reused = []
    for before, after in zip(*([json.loads(x) for x in f.read_text().splitlines()] for f in (first, second)),
                             strict=True):
        assert after["steps_from"] == "run" and after["own_steps"] is False and "steps_from" not in before
        assert after["search_seconds"] == before["search_seconds"] and after["retrain_l2"] == [TINY.train.l2, 5.0]
        selection = DimensionPlan.load(out / "plans" / f"c{after['target_sparsity']:.2f}").metrics["selection"]
        reused.append(selection["reused_fits"])
    assert reused[0] >= 1  # the first budget's fit at the config's weight: read back from the first run's store
    assert {p.name for p in (tmp_path / "run" / FITS_DIR).glob("*.json")} < {
        p.name for p in (out / FITS_DIR).glob("*.json")}  # kept, and the new weight's fits added
    with pytest.raises(SystemExit):
        main(["--config", str(path), "--methods", "mr", "--steps-from", str(tmp_path / "run")])
    assert "--steps-from applies to searches" in capsys.readouterr().err
