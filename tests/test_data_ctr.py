"""CTR datasets: Criteo/Avazu loaders on the shipped samples, malformed inputs, the synthetic generator, batches."""

from __future__ import annotations

import gzip
import tracemalloc
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ciess_prod.data import (
    CTRDataset,
    DataError,
    SyntheticCTRConfig,
    generate_ctr,
    load_avazu,
    load_criteo,
    load_ctr,
)
from ciess_prod.data.ctr import AVAZU_SPARSE, CRITEO_DENSE, CRITEO_SPARSE, OOV_ROW

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
CRITEO = SHARED / "criteo-kaggle-tiny" / "train.csv.gz"
AVAZU = SHARED / "avazu-sample" / "avazu_sample.csv.gz"
needs_criteo = pytest.mark.skipif(not CRITEO.is_file(), reason=f"Criteo sample not present at {CRITEO}")
needs_avazu = pytest.mark.skipif(not AVAZU.is_file(), reason=f"Avazu sample not present at {AVAZU}")

# Distinct non-empty values per field, from PROVENANCE.md
CRITEO_DISTINCT = [79, 252, 1292, 1042, 30, 6, 1164, 39, 2, 908, 926, 1238, 824, 20, 819, 1158, 9, 534, 200, 3, 1203]
CRITEO_DISTINCT += [6, 12, 728, 32, 553]
SMALL = SyntheticCTRConfig(n_examples=4000, n_dense=4, table_sizes=(1000, 50, 7), bag_lengths=(1, 3, 0.5), seed=3)


def _auc(scores: np.ndarray, labels: np.ndarray) -> float:
    ranks = pd.Series(scores).rank().to_numpy()
    pos = labels == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    return float((ranks[pos].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def _bags(ds: CTRDataset, f: int) -> list[list[int]]:
    v, o = ds.values[f], ds.offsets[f]
    return [v[o[i] : o[i + 1]].tolist() for i in range(len(ds))]


# ------------------------------------------------------------------------------------------------ real data
@needs_criteo
def test_criteo_sample_loads_with_documented_statistics() -> None:
    ds = load_criteo(CRITEO)
    assert len(ds) == 1999 and ds.n_dense == 13 and ds.n_sparse == 26
    assert ds.feature_names == CRITEO_SPARSE and ds.dense_names == CRITEO_DENSE
    assert abs(ds.labels.mean() - 0.2091) < 5e-4
    assert ds.dense.dtype == np.float32 and ds.labels.dtype == np.float32
    # one row per distinct non-empty value, plus the reserved OOV row 0 (unused with min_count=1)
    assert list(ds.table_sizes) == [d + 1 for d in CRITEO_DISTINCT]
    raw = pd.read_csv(CRITEO, dtype=str, keep_default_na=False)
    for i, c in enumerate(CRITEO_SPARSE):
        lengths = ds.bag_lengths(c)
        assert np.array_equal(lengths, (raw[c] != "").to_numpy().astype(np.int64))  # empty value -> empty bag
        assert ds.table_sizes[i] == raw.loc[raw[c] != "", c].nunique() + 1
        assert ds.row_popularity()[i][OOV_ROW] == 0
    assert abs(ds.bag_lengths("C22").mean() - (1 - 0.816)) < 0.001
    # first-appearance order: the first example's ids are all 1
    assert all(_bags(ds, f)[0] in ([1], []) for f in range(26))
    i1 = pd.to_numeric(raw["I1"].replace("", "0")).to_numpy(dtype=np.float64)
    assert np.allclose(ds.dense[:, 0], np.log1p(np.maximum(i1, 0)), atol=1e-6)
    assert load_criteo(CRITEO.parent).fingerprint == ds.fingerprint  # a directory works, the load is deterministic


@needs_criteo
def test_criteo_min_count_and_missing_row() -> None:
    full = load_criteo(CRITEO)
    rare = load_criteo(CRITEO, min_count=5)
    raw = pd.read_csv(CRITEO, dtype=str, keep_default_na=False)
    counts = raw.loc[raw["C3"] != "", "C3"].value_counts()
    assert rare.table_sizes[2] == int((counts >= 5).sum()) + 1
    n_rare = int(counts[counts < 5].sum())
    assert rare.row_popularity()[2][OOV_ROW] == n_rare > 0
    assert all(r <= f for r, f in zip(rare.table_sizes, full.table_sizes, strict=True))
    with_row = load_criteo(CRITEO, missing="row")
    assert all(np.all(with_row.bag_lengths(f) == 1) for f in range(26))
    has_empty = [(raw[c] == "").any() for c in CRITEO_SPARSE]
    assert [w - f for w, f in zip(with_row.table_sizes, full.table_sizes, strict=True)] == [int(e) for e in has_empty]


@needs_avazu
def test_avazu_sample_loads() -> None:
    ds = load_ctr("avazu", AVAZU)
    assert len(ds) == 100 and ds.n_dense == 0 and ds.dense.shape == (100, 0)
    assert ds.feature_names == ("hour_of_day", "weekday", *AVAZU_SPARSE)
    assert abs(ds.labels.mean() - 0.20) < 1e-6
    sizes = dict(zip(ds.feature_names, ds.table_sizes, strict=True))
    expected = {"site_id": 22, "site_domain": 21, "app_id": 19, "device_id": 11, "device_ip": 98}
    expected |= {"device_model": 72, "C14": 39, "C17": 25, "hour_of_day": 1, "weekday": 1}
    assert {k: sizes[k] - 1 for k in expected} == expected
    raw = pd.read_csv(AVAZU, dtype=str, keep_default_na=False)
    assert all(sizes[c] == raw[c].nunique() + 1 for c in AVAZU_SPARSE)
    assert all(np.all(ds.bag_lengths(f) == 1) for f in ds.feature_names)


# ---------------------------------------------------------------------------------------------- bad files
CRITEO_HEADER = ",".join(["Id", "Label", *CRITEO_DENSE, *CRITEO_SPARSE])


def _criteo_row(label: str = "0", dense: str = "1", cat: str = "aa", row_id: int = 1) -> str:
    return ",".join([str(row_id), label, *[dense] * 13, *[cat] * 26])


def _write(path: Path, text: str) -> Path:
    if path.name.endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return path


def test_small_criteo_file_parses(tmp_path: Path) -> None:
    rows = [_criteo_row("1", "3", "x"), _criteo_row("0", "", "y"), _criteo_row("0", "-2", "")]
    ds = load_criteo(_write(tmp_path / "c.csv", "\n".join([CRITEO_HEADER, *rows]) + "\n"))
    assert ds.labels.tolist() == [1, 0, 0]
    assert np.allclose(ds.dense[:, 0], [np.log(4), 0, 0])
    assert _bags(ds, 0) == [[1], [2], []] and ds.table_sizes[0] == 3


def test_headerless_criteo_tsv(tmp_path: Path) -> None:
    lines = ["\t".join(["1", *["5"] * 13, *["ab"] * 26]), "\t".join(["0", *[""] * 13, *["cd"] * 26])]
    ds = load_criteo(_write(tmp_path / "day_0.gz", "\n".join(lines) + "\n"))
    assert len(ds) == 2 and ds.labels.tolist() == [1, 0] and ds.table_sizes[0] == 3
    with pytest.raises(DataError, match="40 tab-separated fields"):
        load_criteo(_write(tmp_path / "bad.txt", "1\t2\t3\n"))


@pytest.mark.parametrize(
    ("name", "text", "problem"),
    [
        ("missing_col.csv", CRITEO_HEADER.replace(",C7,", ",") + "\n", r"missing column\(s\) \['C7'\]"),
        ("label2.csv", f"{CRITEO_HEADER}\n{_criteo_row()}\n{_criteo_row('2')}\n", r"'2' at line 3"),
        ("label_empty.csv", f"{CRITEO_HEADER}\n{_criteo_row('')}\n", r"must be 0 or 1, found '' at line 2"),
        (
            "dense.csv",
            f"{CRITEO_HEADER}\n{_criteo_row(dense='abc')}\n",
            r"'I1' must hold integers, found 'abc' at line 2",
        ),
        ("frac.csv", f"{CRITEO_HEADER}\n{_criteo_row(dense='1.5')}\n", r"'I1' must hold integers, found '1.5'"),
        ("empty.csv", "", "file is empty"),
        ("empty.csv.gz", "", "file is empty"),
        ("header_only.csv", CRITEO_HEADER + "\n", "header but no data rows"),
        ("short_row.csv", f"{CRITEO_HEADER}\n{_criteo_row()}\n1,0,2\n", "cannot parse"),
    ],
)
def test_malformed_criteo_files(tmp_path: Path, name: str, text: str, problem: str) -> None:
    path = _write(tmp_path / name, text)
    with pytest.raises(DataError, match=problem) as info:
        load_criteo(path)
    assert name in str(info.value)


def test_truncated_gzip_and_missing_path(tmp_path: Path) -> None:
    rows = "\n".join(_criteo_row(row_id=i) for i in range(2000))
    blob = gzip.compress(f"{CRITEO_HEADER}\n{rows}\n".encode())
    path = tmp_path / "trunc.csv.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"trunc\.csv\.gz: cannot parse \(Compressed file ended"):
        load_criteo(path)
    with pytest.raises(DataError, match="no such file"):
        load_criteo(tmp_path / "absent.csv")
    with pytest.raises(DataError, match="no Criteo file found"):
        load_criteo(tmp_path)
    with pytest.raises(DataError, match="min_count"):
        load_criteo(path, min_count=0)


def test_malformed_avazu_files(tmp_path: Path) -> None:
    header = ",".join(["id", "click", "hour", *AVAZU_SPARSE])

    def row(click: str = "0", hour: str = "14102100") -> str:
        return ",".join(["7", click, hour, *["v"] * len(AVAZU_SPARSE)])

    ok = load_avazu(_write(tmp_path / "ok.csv", f"{header}\n{row('1', '14102523')}\n{row()}\n"))
    assert ok.labels.tolist() == [1, 0] and _bags(ok, 0) == [[1], [2]]  # hour of day 23, then 00
    assert _bags(ok, 1) == [[1], [2]]  # 2014-10-25 Saturday, 2014-10-21 Tuesday
    cases = {
        "nocol.csv": (header.replace(",site_id", "") + f"\n{row()[:-2]}\n", r"missing column\(s\) \['site_id'\]"),
        "click.csv": (f"{header}\n{row()}\n{row('yes')}\n", r"'click' must be 0 or 1, found 'yes' at line 3"),
        "hour.csv": (f"{header}\n{row(hour='14102199')}\n", r"'hour' must be YYMMDDHH, found '14102199' at line 2"),
        "date.csv": (f"{header}\n{row(hour='14133100')}\n", r"YYMMDDHH, found '14133100'"),
    }
    for name, (text, problem) in cases.items():
        with pytest.raises(DataError, match=problem):
            load_avazu(_write(tmp_path / name, text))


# ------------------------------------------------------------------------------------------------ synthetic
def test_synthetic_deterministic_and_shaped() -> None:
    a, b = generate_ctr(SMALL), generate_ctr(SMALL)
    assert a.fingerprint == b.fingerprint and np.array_equal(a.values[1], b.values[1])
    c = generate_ctr(SyntheticCTRConfig(n_examples=4000, n_dense=4, table_sizes=(1000, 50, 7), seed=4))
    assert c.fingerprint != a.fingerprint
    assert a.dense.shape == (4000, 4) and a.labels.shape == (4000,) and a.n_sparse == 3
    assert a.table_sizes == (1000, 50, 7) and a.feature_names == ("cat_0", "cat_1", "cat_2")
    for f, size in enumerate(a.table_sizes):
        assert a.values[f].dtype == np.int64 and a.offsets[f].shape == (4001,)
        assert a.values[f].min() >= 0 and a.values[f].max() < size
    assert abs(a.labels.mean() - SMALL.click_rate) < 0.03


def test_synthetic_power_law_and_bag_lengths() -> None:
    ds = generate_ctr(SMALL)
    pop = ds.row_popularity()[0]
    assert pop.max() > 50 * max(np.median(pop), 1)  # head row far above the median row
    assert np.sort(pop)[::-1][:10].sum() > 0.25 * pop.sum()
    assert int(np.argmax(pop)) != 0  # popular rows are scattered, not rows 0, 1, 2
    flat = generate_ctr(SyntheticCTRConfig(n_examples=4000, table_sizes=(1000,), zipf_exponent=0.0, seed=3))
    assert flat.row_popularity()[0].max() < pop.max() / 10
    lengths = [ds.bag_lengths(f) for f in range(3)]
    assert np.all(lengths[0] == 1)
    assert abs(lengths[1].mean() - 3.0) < 0.1 and lengths[1].min() >= 1 and lengths[1].max() > 3
    assert abs(lengths[2].mean() - 0.5) < 0.05 and set(np.unique(lengths[2])) == {0, 1}


def test_synthetic_labels_are_learnable() -> None:
    ds = generate_ctr(SyntheticCTRConfig(n_examples=20_000, n_dense=6, table_sizes=(200, 30), seed=1))
    train, _, test = ds.split((0.7, 0.0, 0.3), seed=0)
    coef, *_ = np.linalg.lstsq(np.c_[train.dense, np.ones(len(train))], train.labels, rcond=None)
    assert _auc(np.c_[test.dense, np.ones(len(test))] @ coef, test.labels) > 0.6
    clicks = np.bincount(train.values[0], weights=train.labels, minlength=200)
    rate = (clicks + 1) / (train.row_popularity()[0] + 4)  # smoothed per-row click rate, from train only
    assert _auc(rate[test.values[0]], test.labels) > 0.55


def test_synthetic_large_config_is_lean() -> None:
    """10^7 rows over 25 tables: memory stays O(examples x features). (No wall-clock bound: a unit test's timing
    on a shared machine measures the machine; an O(rows) table per feature shows in the peak below.)"""
    sizes = (3_000_000, 2_000_000, 2_000_000, 1_500_000, 1_000_000) + (25_000,) * 20
    config = SyntheticCTRConfig(n_examples=50_000, table_sizes=sizes, bag_lengths=(1.0,) * 24 + (4.0,), seed=0)
    assert sum(config.table_sizes) == 10_000_000
    tracemalloc.start()
    ds = generate_ctr(config)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200 * 2**20  # O(examples x features); an O(rows) float table per feature would be 80+ MB each
    assert len(ds) == 50_000 and ds.values[0].max() < 3_000_000 and ds.values[0].max() > 1_000_000


# ----------------------------------------------------------------------------------- dataset operations
def test_kjt_batches() -> None:
    ds = generate_ctr(SMALL)
    batches = list(ds.batches(1500))
    assert [b["labels"].shape[0] for b in batches] == [1500, 1500, 1000]
    first = batches[0]
    kjt = first["sparse"]
    assert kjt.keys() == list(ds.feature_names) and kjt.stride() == 1500
    assert first["dense"].shape == (1500, 4) and first["dense"].dtype.is_floating_point
    jagged = kjt.to_dict()
    for f, name in enumerate(ds.feature_names):
        assert jagged[name].lengths().tolist() == ds.bag_lengths(f)[:1500].tolist()
        expected = ds.values[f][: ds.offsets[f][1500]]
        assert jagged[name].values().tolist() == expected.tolist()
    assert len(list(ds.batches(1500, drop_last=True))) == 2
    idx = np.array([5, 2, 9])
    b = ds.batch(idx)
    assert b["sparse"].to_dict()["cat_1"].values().tolist() == sum((_bags(ds, 1)[i] for i in idx), [])
    shuffled = [b["labels"] for b in ds.batches(1000, shuffle_seed=7)]
    again = [b["labels"] for b in ds.batches(1000, shuffle_seed=7)]
    assert all(bool((x == y).all()) for x, y in zip(shuffled, again, strict=True))
    assert sorted(np.concatenate([s.numpy() for s in shuffled]).tolist()) == sorted(ds.labels.tolist())
    with pytest.raises(DataError, match="batch_size"):
        next(ds.batches(0))


def test_split_and_popularity() -> None:
    ds = generate_ctr(SMALL)
    tr, va, te = ds.split_indices((0.8, 0.1, 0.1), seed=5)
    assert (len(tr), len(va), len(te)) == (3200, 400, 400)
    together = np.concatenate([tr, va, te])
    assert np.array_equal(np.sort(together), np.arange(len(ds)))  # disjoint and covering
    assert all(np.array_equal(x, y) for x, y in zip((tr, va, te), ds.split_indices((0.8, 0.1, 0.1), 5), strict=True))
    assert not np.array_equal(tr, ds.split_indices((0.8, 0.1, 0.1), seed=6)[0])
    train, val, test = ds.split((0.8, 0.1, 0.1), seed=5)
    assert train.name.endswith("/train") and len(val) == 400 and test.table_sizes == ds.table_sizes
    assert _bags(train, 1)[:5] == [_bags(ds, 1)[i] for i in tr[:5]]
    pop = train.row_popularity()
    assert all(np.array_equal(p, q) for p, q in zip(pop, ds.row_popularity(tr), strict=True))
    assert [int(p.sum()) for p in pop] == [train.values[f].size for f in range(3)]
    assert all(p.shape == (s,) and p.dtype == np.int64 for p, s in zip(pop, ds.table_sizes, strict=True))
    with pytest.raises(DataError, match="train \\+ val \\+ test = 1"):
        ds.split((0.5, 0.1, 0.1))


def test_fingerprint_tracks_data() -> None:
    ds = generate_ctr(SMALL)

    def rebuild(**changes: object) -> CTRDataset:
        fields = dict(
            name="other-name",
            dense=ds.dense,
            labels=ds.labels,
            feature_names=ds.feature_names,
            table_sizes=ds.table_sizes,
            values=ds.values,
            offsets=ds.offsets,
            dense_names=ds.dense_names,
        )
        return CTRDataset(**{**fields, **changes})

    assert rebuild().fingerprint == ds.fingerprint  # the name is not part of the data
    labels = ds.labels.copy()
    labels[0] = 1 - labels[0]
    assert rebuild(labels=labels).fingerprint != ds.fingerprint
    values = list(ds.values)
    values[0] = (values[0] + 1) % ds.table_sizes[0]
    assert rebuild(values=values).fingerprint != ds.fingerprint
    assert rebuild(table_sizes=(1001, 50, 7)).fingerprint != ds.fingerprint
    assert ds.subset(np.arange(len(ds))).fingerprint == ds.fingerprint
    too_small = int(ds.values[2].max())
    with pytest.raises(DataError, match=rf"row ids must lie in \[0, {too_small}\)"):
        rebuild(table_sizes=(1000, 50, too_small))
    with pytest.raises(DataError, match="labels must be 0 or 1"):
        rebuild(labels=np.full(len(ds), 0.5))
    with pytest.raises(DataError, match="offsets must rise"):
        rebuild(offsets=[ds.offsets[0][::-1].copy(), *ds.offsets[1:]])


def test_config_validation_and_dispatch() -> None:
    for bad in (
        {"n_examples": 0},
        {"table_sizes": ()},
        {"table_sizes": (10, 0)},
        {"bag_lengths": (1.0,)},
        {"zipf_exponent": -1.0},
        {"click_rate": 1.0},
        {"seed": -1},
    ):
        with pytest.raises(DataError):
            SyntheticCTRConfig(**{"table_sizes": (10, 10), **bad})
    cfg = SyntheticCTRConfig(n_examples=50, table_sizes=(10,), seed=2)
    assert load_ctr("synthetic", cfg).fingerprint == generate_ctr(cfg).fingerprint
    assert load_ctr("synthetic", {"n_examples": 50, "table_sizes": (10,), "seed": 2}).fingerprint == (
        generate_ctr(cfg).fingerprint
    )
    with pytest.raises(DataError, match="unknown CTR dataset kind"):
        load_ctr("movielens", cfg)
