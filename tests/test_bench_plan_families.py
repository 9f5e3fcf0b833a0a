"""bench/plan_families.py: its plans meet their budgets, its plain-torch LightGCN equals the project's, its sampler
draws what BPRSampler draws, and a job writes a row."""

import json
from dataclasses import asdict

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torchrec import KeyedJaggedTensor

from bench import plan_families as pf
from bench import summarize
from ciess_prod.eval.metrics import rank_users
from ciess_prod.models import SIDES, ModelConfig, build_model

N_USERS, N_ITEMS = 40, 60


def _pairs(seed: int, density: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    dense = rng.random((N_USERS, N_ITEMS)) < density
    dense[np.arange(N_USERS), rng.integers(0, N_ITEMS, N_USERS)] = True  # every user has a train item
    return np.stack(np.nonzero(dense)).astype(np.int32)


@pytest.fixture
def split_path(tmp_path):
    train = _pairs(0, 0.15)
    rest = _pairs(1, 0.2)
    taken = set(map(tuple, train.T))
    rest = np.array([p for p in rest.T if tuple(p) not in taken]).T
    val, test = rest[:, ::2], rest[:, 1::2]
    path = tmp_path / "split.npz"
    np.savez_compressed(path, n_users=N_USERS, n_items=N_ITEMS, train=train, val=val, test=test, fingerprint="tiny")
    return path


@pytest.mark.parametrize("job", [
    pf.Job("es", 0.9, 1e-3), pf.Job("split", 0.8, 1e-3, share=0.95), pf.Job("split", 0.95, 1e-3, share=0.45),
    pf.Job("pop", 0.8, 1e-3, alpha=0.5), pf.Job("pop", 0.9, 1e-3, alpha=-0.5, share=0.8),
])
def test_plans_meet_their_budget_within_one_column_per_row(job):
    rng = np.random.default_rng(0)
    users, items = torch.from_numpy(rng.zipf(1.5, 500)), torch.from_numpy(rng.zipf(1.5, 300))
    sizes = pf.plan_sizes(job, users, items)
    assert sizes.shape == (800,) and sizes.min() >= 1 and sizes.max() <= pf.D_MAX
    budget = (1 - job.c) * 800 * pf.D_MAX
    assert sizes.sum() <= budget and sizes.sum() >= budget - 800 - (800 if job.plan == "es" else 0)
    if job.plan == "split":  # each side takes its share, to within a column per row
        assert abs(sizes[:500].sum().item() - job.share * budget) <= 500
    if job.plan == "pop" and job.alpha > 0:  # the most popular row is at least as wide as the least popular
        assert sizes[:500][users.argmax()] >= sizes[:500][users.argmin()]


def test_plain_torch_lightgcn_equals_the_projects_model(split_path):
    split = pf.Split.load(split_path)
    data = pf.Interactions(N_USERS, N_ITEMS, split.train, torch.device("cpu"))
    train = sp.csr_matrix((np.ones(split.train.shape[1], np.float32), split.train), shape=(N_USERS, N_ITEMS))
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind="lightgcn", d_max=pf.D_MAX), N_USERS, N_ITEMS, train)
    sizes = torch.randint(1, pf.D_MAX + 1, (N_USERS + N_ITEMS,))
    for side, part in zip(SIDES, sizes.split([N_USERS, N_ITEMS]), strict=True):
        model.set_row_sizes(side, part)
    weights = torch.cat([model.table_weight("user"), model.table_weight("item")]).detach()
    ego = weights * (torch.arange(pf.D_MAX) < sizes[:, None]).float()
    final = pf.lightgcn(data.adjacency, ego)
    u, p, n = (torch.randint(0, k, (32,), generator=torch.Generator().manual_seed(2)) for k in (N_USERS, N_ITEMS,
                                                                                                N_ITEMS))
    out = model(KeyedJaggedTensor.from_lengths_sync(keys=["user", "pos_item", "neg_item"], values=torch.cat([u, p, n]),
                                                    lengths=torch.ones(96, dtype=torch.int32)))
    torch.testing.assert_close(out.pos_scores, (final[u] * final[p + N_USERS]).sum(-1))
    torch.testing.assert_close(out.neg_scores, (final[u] * final[n + N_USERS]).sum(-1))
    l2 = (ego[u].pow(2).sum() + ego[p + N_USERS].pow(2).sum() + ego[n + N_USERS].pow(2).sum()) / 2 / 32
    torch.testing.assert_close(out.l2, l2)


def test_ranking_equals_the_projects_metric(split_path):
    split = pf.Split.load(split_path)
    data = pf.Interactions(N_USERS, N_ITEMS, split.train, torch.device("cpu"))
    users, items = torch.randn(N_USERS, 8), torch.randn(N_ITEMS, 8)
    val = pf.dense(split.val, N_USERS, N_ITEMS, torch.device("cpu"))
    as_csr = sp.csr_matrix(val.numpy().astype(np.float32))
    train = sp.csr_matrix(data.mask.numpy().astype(np.float32))
    expected = rank_users(lambda rows: users[rows] @ items.T, as_csr, [train], ks=pf.KS).mean()
    assert pf.ranking(users, items, val, data.mask) == pytest.approx(expected, abs=1e-12)


def test_sampler_draws_a_train_positive_and_a_non_train_negative_uniformly(split_path):
    split = pf.Split.load(split_path)
    data = pf.Interactions(N_USERS, N_ITEMS, split.train, torch.device("cpu"))
    users, pos, neg = data.sample(200_000, torch.Generator().manual_seed(0))
    assert data.mask[users, pos].all() and not data.mask[users, neg].any()
    # users are uniform over the eligible ones, and a user's negatives uniform over its non-items
    counts = torch.bincount(users, minlength=N_USERS).double()
    assert counts.std() / counts.mean() < 0.05
    heavy = int(torch.argmax(data.degree))
    free = (~data.mask[heavy]).sum().item()
    drawn = torch.bincount(neg[users == heavy], minlength=N_ITEMS).double()[~data.mask[heavy]]
    assert len(drawn) == free and drawn.min() > 0 and drawn.std() / drawn.mean() < 0.3
    positives = torch.bincount(pos[users == heavy], minlength=N_ITEMS).double()[data.mask[heavy]]
    assert positives.min() > 0 and positives.std() / positives.mean() < 0.2


def test_a_job_writes_a_row_with_its_test_metrics(split_path, tmp_path):
    runner = pf.Runner(pf.Split.load(split_path), torch.device("cpu"))
    row = runner.run(pf.Job("split", 0.9, 1e-3, share=0.8, max_batches=4, eval_every=2, patience=1))
    assert row["best_batches"] in (2, 4) and row["final_batches"] >= row["best_batches"]
    assert 0.9 <= row["achieved"] < 0.91 and row["users_mean"] > row["items_mean"]
    assert set(row["test"]) == {f"{m}@{k}" for m in ("recall", "ndcg") for k in pf.KS}
    assert all(0 <= v <= 1 for v in row["test"].values()) and json.dumps(row)
    fit_only = runner.run(pf.Job("es", 0.8, 1e-3, max_batches=2, eval_every=2, fit_only=True))
    assert "test" not in fit_only and fit_only["history"] == [(2, fit_only["val"]["recall@20"])]


def test_bad_input_is_refused_with_its_reason(tmp_path, split_path):
    with pytest.raises(ValueError, match="plan must be one of"):
        pf.Job("uniform", 0.8, 1e-3)
    with pytest.raises(ValueError, match="share must lie"):
        pf.Job("split", 0.8, 1e-3, share=1.5)
    with pytest.raises(ValueError, match="unknown grid"):
        pf.grid("nope")
    np.savez(tmp_path / "bad.npz", n_users=2)
    with pytest.raises(ValueError, match="missing"):
        pf.Split.load(tmp_path / "bad.npz")
    with np.load(split_path) as z:
        parts = dict(z)
    parts["test"] = np.array([[0], [N_ITEMS]])
    np.savez(tmp_path / "out_of_range.npz", **parts)
    with pytest.raises(ValueError, match="test must be"):
        pf.Split.load(tmp_path / "out_of_range.npz")
    with pytest.raises(SystemExit):
        pf.main(["run", "--split", str(tmp_path / "bad.npz"), "--grid", "sweep"])


def test_the_grids_put_the_calibration_first_and_build():
    sweep = pf.grid("sweep")
    assert sweep[:3] == [pf.Job("es", 0.8, 1e-4), pf.Job("es", 0.8, 1e-3), pf.Job("es", 0.8, 1e-3, seed=1)]
    assert len(sweep) == len(set(sweep)) == 91
    assert all(job.fit_only and job.max_batches == 10_000 for job in pf.grid("convergence"))
    tilts = pf.grid("tilts")
    assert all(job.c == 0.8 and job.fit_only for job in tilts) and {-0.5, 0.1} <= {job.alpha for job in tilts}
    # every converged users-heavy plan has uniform sizes at its budget, weight and cap to be compared with
    uniform = {(job.c, job.l2, job.max_batches) for job in pf.grid("converged_es")}
    assert all(job.plan == "es" for job in pf.grid("converged_es"))
    assert {(job.c, job.l2, job.max_batches) for job in pf.grid("converged") if job.plan == "split"} <= uniform
    ceiling = pf.grid("uniform_ceiling")
    assert all(job.plan == "es" and job.c == 0.8 for job in ceiling) and {j.patience for j in ceiling} == {4, 12}
    # the nearest tilts are trained exactly like the patient es row, so summarize compares them with it
    tilts_ceiling = pf.grid("tilts_ceiling")
    assert {summarize.recipe(asdict(j)) for j in tilts_ceiling} <= {summarize.recipe(asdict(j)) for j in ceiling}
    assert sorted(j.alpha for j in tilts_ceiling) == [-0.1, 0.1, 0.1] and not any(j.fit_only for j in tilts_ceiling)
    # a second seed for the closest pair: the patient es row and the tilt that came nearest it
    assert {(j.plan, j.seed) for j in ceiling + tilts_ceiling if j.seed == 1} == {("es", 1), ("pop", 1)}
    with pytest.raises(ValueError, match="tilts_ceiling"):
        pf.grid("no-such-grid")


def test_summary_tables_read_the_prototype_and_the_script_rows(monkeypatch, capsys, split_path):
    from bench import summarize

    runner = pf.Runner(pf.Split.load(split_path), torch.device("cpu"))
    meta = {"git": "0123456789abcdef", "device": "cpu"}
    uniform = {**runner.run(pf.Job("es", 0.8, 1e-3, max_batches=2, eval_every=2)), **meta}
    split = {**runner.run(pf.Job("split", 0.8, 1e-3, share=0.95, max_batches=2, eval_every=2)), **meta}
    run = {"grid": "tilts", "split": "s1"}
    curve = {**runner.run(pf.Job("es", 0.8, 1e-3, max_batches=4, eval_every=2, fit_only=True)), **meta, **run}
    # the tilt comes from a resumed run on later code: still the same grid and split, so still compared with es
    tilt = {**runner.run(pf.Job("pop", 0.8, 1e-3, alpha=-0.5, max_batches=4, eval_every=2, fit_only=True)), **meta,
            **run, "git": "fedcba9876543210"}
    other_split = {**tilt, "split": "s2"}
    prototype = {"plan": "pop", "c": 0.9, "l2": 3e-4, "params": {"alpha": 0.5, "share": 0.8}, "seed": 0,
                 "hist": [[250, 0.1]], **{k: split[k] for k in ("achieved", "users_mean", "items_mean",
                                                                "best_batches", "val", "test")}}
    # uniform sizes with more patience: labelled, and not what the split is compared with
    patient = {**uniform, "patience": 12, "test": {**uniform["test"], "recall@20": 0.5}}
    files = {"plan_families_prototype.jsonl": [prototype],
             "plan_families.jsonl": [uniform, patient, split, curve, tilt, other_split]}
    monkeypatch.setattr(summarize, "read", lambda name: files[name])
    summarize.plan_families_table()
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 + 4  # the fit-only rows have no test
    by_plan = {line.split(" | ")[2]: line for line in lines[2:]}
    assert set(by_plan) == {"es", "es (patience 12)", "split users 0.95", "pop α=0.5 users 0.8"}
    ratio = split["test"]["recall@20"] / uniform["test"]["recall@20"] - 1
    assert f"{ratio:+.1%}" in by_plan["split users 0.95"] and "| prototype |" in by_plan["pop α=0.5 users 0.8"]
    assert f"{split['test']['recall@20'] / 0.2436:.1%}" in by_plan["split users 0.95"]
    summarize.plan_curves_table()
    curves = capsys.readouterr().out.splitlines()
    assert len(curves) == 5 and "| 0123456 |" in curves[2] and "| fedcba9 |" in curves[3]
    gain = tilt["val"]["recall@20"] / curve["val"]["recall@20"] - 1
    assert f"| {gain:+.1%} | cpu |" in curves[3]
    assert curves[4].endswith("| - | - | cpu | fedcba9 |")  # another split: no es to compare with; cap 4: no gain


def test_resume_runs_only_the_jobs_not_yet_recorded_for_the_split(monkeypatch, tmp_path, split_path):
    jobs = [pf.Job("es", 0.8, 1e-3, max_batches=2), pf.Job("split", 0.8, 1e-3, share=0.7, max_batches=2)]
    results = tmp_path / "rows.jsonl"
    done = {**json.loads(json.dumps(pf.asdict(jobs[0]))), "grid": "tilts", "split": "tiny"}
    other_split = {**json.loads(json.dumps(pf.asdict(jobs[1]))), "grid": "tilts", "split": "another"}
    results.write_text(json.dumps(done) + "\n" + json.dumps(other_split) + "\n")
    ran = []
    monkeypatch.setattr(pf, "grid", lambda name: list(jobs))
    monkeypatch.setattr(pf, "run_jobs", lambda jobs, *args, **kwargs: ran.append(jobs))
    base = ["run", "--split", str(split_path), "--grid", "tilts", "--results", str(results)]
    assert pf.main(base + ["--resume"]) == 0 and ran[-1] == jobs[1:]
    assert pf.main(base) == 0 and ran[-1] == jobs  # without --resume every job runs again
    results.write_text("{not json\n")
    with pytest.raises(SystemExit):
        pf.main(base + ["--resume"])
