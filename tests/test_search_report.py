"""The search report: history.json round-trips with a per-episode summary, and the three plots are real PNGs."""

import json
import math

import numpy as np
import pytest
import torch

from ciess_prod.search.plan import DimensionPlan, repair_to_budget
from ciess_prod.search.report import episode_summary, write_report

D = 32
USERS, ITEMS = 60, 25_000  # items exceed the scatter cap, so subsampling runs
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _history() -> list[dict[str, float]]:
    history = []
    for episode in range(3):
        for step in range(4):
            history.append(
                {
                    "episode": episode,
                    "step": step,
                    "mean_reward": 0.1 * episode + 0.01 * step,
                    "mean_size_user": 20.0 - episode - 0.5 * step,
                    "mean_size_item": 18.0 - 2 * episode,
                    "sparsity": 0.5 + 0.1 * episode + 0.01 * step,
                    "mean_q": math.nan if episode == 0 else float(step),
                    "actor_loss": np.float32(0.25),  # an extra key, a numpy scalar: kept in the JSON
                    "note": "warm-up" if episode == 0 else "",
                }
            )
    return history


def _popularity(items: int = ITEMS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    user = rng.poisson(5, USERS).astype(np.float64)
    user[:3] = 0  # users without training interactions: the scatter falls back to log1p
    return {"user": user, "item": rng.zipf(1.8, items).astype(np.float64)}


def _plans(popularity: dict[str, np.ndarray]) -> dict[float, DimensionPlan]:
    # larger sizes for popular rows, as a search tends to find
    raw = {t: torch.from_numpy(np.clip(np.log1p(p) * 6, 1, D).astype(np.int64)) for t, p in popularity.items()}
    plans = {}
    for c in (0.8, 0.9):
        sizes = repair_to_budget(raw, D, c)
        plans[c] = DimensionPlan(sizes, D, "lightgcn", "ab" * 32, c, repaired=c == 0.9)
    return plans


def test_write_report(tmp_path):
    popularity = _popularity()
    history = _history()
    paths = write_report(tmp_path / "report", history, _plans(popularity), popularity)
    assert set(paths) == {"history", "reward_and_size", "size_vs_popularity", "size_histograms"}
    for name in ("reward_and_size", "size_vs_popularity", "size_histograms"):
        data = paths[name].read_bytes()
        assert paths[name].name == f"{name}.png"
        assert data.startswith(PNG_SIGNATURE), name
        assert len(data) > 10_000, name
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(p.name for p in paths.values())

    saved = json.loads(paths["history"].read_text())
    assert len(saved["history"]) == len(history)
    for got, want in zip(saved["history"], history, strict=True):
        assert set(got) == set(want)
        for key, value in want.items():
            if isinstance(value, float) and math.isnan(value):
                assert math.isnan(got[key])
            else:
                assert got[key] == pytest.approx(value) if not isinstance(value, str) else got[key] == value

    episodes = saved["episodes"]
    assert [e["episode"] for e in episodes] == [0, 1, 2]
    assert [e["steps"] for e in episodes] == [4, 4, 4]
    assert episodes[1]["mean_reward"] == pytest.approx(0.1 + 0.015)
    assert episodes[2]["mean_size_user"] == pytest.approx(18.0 - 0.75)
    assert episodes[2]["mean_size_item"] == pytest.approx(14.0)
    assert [e["final_sparsity"] for e in episodes] == pytest.approx([0.53, 0.63, 0.73])
    assert math.isnan(episodes[0]["mean_q"]) and episodes[1]["mean_q"] == pytest.approx(1.5)
    assert "note" not in episodes[0]  # strings are kept in the history, not averaged


def test_summary_takes_the_last_step_even_out_of_order():
    history = [
        {"episode": 1, "step": 1, "sparsity": 0.7},
        {"episode": 0, "step": 1, "sparsity": 0.6},
        {"episode": 1, "step": 0, "sparsity": 0.65},
        {"episode": 0, "step": 0, "sparsity": 0.5},
    ]
    summary = episode_summary(history)
    assert [s["final_sparsity"] for s in summary] == [0.6, 0.7]
    assert [s["sparsity"] for s in summary] == pytest.approx([0.55, 0.675])


def test_empty_history_raises(tmp_path):
    with pytest.raises(ValueError, match="history is empty"):
        write_report(tmp_path, [], {}, {})
    assert not any(tmp_path.iterdir())


def test_positive_popularity_uses_a_log_axis(tmp_path):
    popularity = {t: p + 1 for t, p in _popularity(items=500).items()}
    paths = write_report(tmp_path, _history()[:1], _plans(popularity), popularity)
    assert paths["size_vs_popularity"].read_bytes().startswith(PNG_SIGNATURE)


def test_popularity_must_match_the_plans(tmp_path):
    popularity = _popularity(items=500)
    plans = _plans(popularity)
    with pytest.raises(ValueError, match="no entry for table 'item'"):
        write_report(tmp_path, _history(), plans, {"user": popularity["user"]})
    with pytest.raises(ValueError, match=r"popularity\['user'\]: 59 rows"):
        write_report(tmp_path, _history(), plans, {**popularity, "user": popularity["user"][:-1]})
