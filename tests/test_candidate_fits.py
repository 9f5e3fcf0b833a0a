"""The store of candidate retrainings: keys that change with everything a retraining depends on, damage refused."""

import json

import pytest
import torch

from ciess_prod.search.candidates import CandidateFit, CandidateFits, fit_key

RECIPE = {"data": "abc", "model": {"d_max": 16}, "train": {"lr": 0.01, "seed": 0}}
SIZES = {"user": torch.tensor([1, 2, 3], dtype=torch.int16), "item": torch.tensor([4, 5], dtype=torch.int16)}
FIT = CandidateFit(val={"recall@20": 0.25, "ndcg@20": 0.3}, best_batches=750, seconds=12.5)


def test_the_key_follows_the_recipe_and_every_size():
    key = fit_key(RECIPE, SIZES)
    assert key == fit_key(dict(reversed(RECIPE.items())), {"item": SIZES["item"], "user": SIZES["user"].long()})
    assert key != fit_key({**RECIPE, "train": {"lr": 0.02, "seed": 0}}, SIZES)
    assert key != fit_key(RECIPE, {"user": torch.tensor([1, 2, 4], dtype=torch.int16), "item": SIZES["item"]})
    # the same values split differently between the sides are another configuration
    assert key != fit_key(RECIPE, {"user": torch.tensor([1, 2], dtype=torch.int16),
                                   "item": torch.tensor([3, 4, 5], dtype=torch.int16)})


def test_a_fit_round_trips_and_is_found_only_for_its_own_sizes(tmp_path):
    store = CandidateFits(tmp_path / "fits", RECIPE)
    assert store.get(SIZES) is None
    store.put(SIZES, FIT)
    assert store.get(SIZES) == FIT
    assert CandidateFits(tmp_path / "fits", {**RECIPE, "data": "other"}).get(SIZES) is None
    assert store.get({"user": SIZES["user"] + 1, "item": SIZES["item"]}) is None


@pytest.mark.parametrize(
    "damage",
    [
        lambda e: "not json",
        lambda e: json.dumps({**e, "key": "0" * 64}),  # a file renamed or copied under another key
        lambda e: json.dumps({k: v for k, v in e.items() if k != "best_batches"}),
        lambda e: json.dumps({**e, "best_batches": -1}),
        lambda e: json.dumps({**e, "val": {"recall@20": "NaN"}}),
        lambda e: json.dumps({**e, "val": [0.1]}),
    ],
)
def test_a_damaged_entry_is_reported_and_treated_as_absent(tmp_path, caplog, damage):
    store = CandidateFits(tmp_path, RECIPE)
    store.put(SIZES, FIT)
    (path,) = tmp_path.glob("*.json")
    path.write_text(damage(json.loads(path.read_text())))
    assert store.get(SIZES) is None
    assert "ignoring the unreadable candidate fit" in caplog.text and path.name in caplog.text
