"""DLRM over per-row embedding sizes: pooled multi-id bags obey each row's prefix mask exactly."""

import pytest
import torch
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.modules.embedding_configs import PoolingType

from ciess_prod.models.dlrm import DLRM, DLRMConfig, row_mean_over_examples

FEATURES = ["f0", "f1", "f2", "f3"]
ROWS = [50, 120, 300, 500]
D, N_DENSE, B = 16, 5, 64


def _kjt(seed: int, batch: int = B, max_len: int = 5, features=FEATURES, rows=ROWS) -> KeyedJaggedTensor:
    """Bags of 0..max_len ids per example and feature; the first two examples have empty bags everywhere."""
    g = torch.Generator().manual_seed(seed)
    lengths, values = [], []
    for n in rows:
        lens = torch.randint(0, max_len + 1, (batch,), generator=g)
        lens[:2] = 0
        lengths.append(lens)
        values.append(torch.randint(0, n, (int(lens.sum()),), generator=g))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=list(features), values=torch.cat(values), lengths=torch.cat(lengths).to(torch.int32)
    )


def _dense(seed: int, batch: int = B) -> torch.Tensor:
    return torch.randn(batch, N_DENSE, generator=torch.Generator().manual_seed(seed))


def _model(pooling: str = "sum", interaction: str = "dot", random_sizes: bool = True) -> DLRM:
    torch.manual_seed(0)
    config = DLRMConfig(d_max=D, bottom_mlp=(32, D), top_mlp=(32, 16), interaction=interaction, pooling=pooling)
    model = DLRM(config, N_DENSE, ROWS, FEATURES)
    if random_sizes:
        g = torch.Generator().manual_seed(1)
        for i, n in enumerate(ROWS):
            model.set_row_sizes(i, torch.randint(1, D + 1, (n,), generator=g))
    return model


def _trailing(model: DLRM, i: int) -> torch.Tensor:
    return torch.arange(D).unsqueeze(0) >= model.row_sizes(i).unsqueeze(1).long()


def _scramble_trailing(model: DLRM) -> None:
    with torch.no_grad():
        for i in range(len(FEATURES)):
            trailing = _trailing(model, i)
            model.table_weight(i)[trailing] = torch.randn(int(trailing.sum())) * 100


def _labels(dense: torch.Tensor, sparse: KeyedJaggedTensor) -> torch.Tensor:
    """A learnable signal: a dense direction plus a hidden score per row of f1, summed over the bag."""
    row_score = torch.randn(ROWS[1], generator=torch.Generator().manual_seed(7))
    jt = sparse["f1"]
    bags = torch.repeat_interleave(torch.arange(dense.shape[0]), jt.lengths().long())
    signal = torch.zeros(dense.shape[0]).index_add(0, bags, row_score[jt.values()])
    return ((dense[:, 0] - dense[:, 1] + signal) > 0).float()


def test_shapes_and_adam_reduces_bce():
    model = _model()
    batches = [(_dense(s), _kjt(s)) for s in range(4)]
    data = [(d, k, _labels(d, k)) for d, k in batches]
    logits = model(*batches[0])
    assert logits.shape == (B,) and logits.dtype == torch.float32
    proba = model.predict_proba(*batches[0])
    assert proba.shape == (B,) and bool(((proba > 0) & (proba < 1)).all())
    with torch.no_grad():
        before = sum(float(model.bce(model(d, k), y)) for d, k, y in data) / len(data)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    for _ in range(15):
        for d, k, y in data:
            loss = model.bce(model(d, k), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        after = sum(float(model.bce(model(d, k), y)) for d, k, y in data) / len(data)
    assert after < 0.7 * before, (before, after)


@pytest.mark.parametrize("interaction", ["dot", "cat"])
@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_trailing_columns_never_affect_pooled_bags(pooling, interaction):
    model = _model(pooling, interaction)
    dense, sparse = _dense(0), _kjt(0)
    with torch.no_grad():
        before_emb, before = model.embed(sparse), model(dense, sparse)
        _scramble_trailing(model)
        after_emb, after = model.embed(sparse), model(dense, sparse)
    torch.testing.assert_close(after_emb, before_emb, rtol=0, atol=0)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_pooling_equals_ebc_over_the_truncated_rows(pooling):
    """Per-row sizes: the pooled bags equal a plain EBC whose tables hold the rows cut to their sizes."""
    model = _model(pooling)
    sparse = _kjt(3)
    pooling_type = PoolingType.SUM if pooling == "sum" else PoolingType.MEAN
    ebc = EmbeddingBagCollection(
        tables=[
            EmbeddingBagConfig(
                name=f"r_{f}", embedding_dim=D, num_embeddings=n, feature_names=[f], pooling=pooling_type
            )
            for f, n in zip(FEATURES, ROWS, strict=True)
        ]
    )
    with torch.no_grad():
        for i, f in enumerate(FEATURES):
            ebc.embedding_bags[f"r_{f}"].weight.copy_(model.masked_table(i))
        reference = ebc(sparse).to_dict()
        pooled = model.embed(sparse)
    torch.testing.assert_close(pooled, torch.stack([reference[f] for f in FEATURES], dim=1))
    assert torch.equal(pooled[:2], torch.zeros_like(pooled[:2]))  # empty bags pool to zero


@pytest.mark.parametrize("pooling", ["sum", "mean"])
def test_full_sizes_equal_the_models_own_ebc(pooling):
    model = _model(pooling, random_sizes=False)
    sparse = _kjt(4)
    with torch.no_grad():
        reference = model.ebc(sparse).to_dict()
        pooled = model.embed(sparse)
    torch.testing.assert_close(pooled, torch.stack([reference[f] for f in FEATURES], dim=1))


def test_trailing_columns_stay_put_under_adam_and_stay_irrelevant():
    model = _model("mean")
    snapshot = [model.table_weight(i).detach().clone() for i in range(len(FEATURES))]
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    for step in range(5):
        dense, sparse = _dense(step), _kjt(step)
        loss = model.bce(model(dense, sparse), _labels(dense, sparse))
        optimizer.zero_grad()
        loss.backward()
        for i in range(len(FEATURES)):
            assert not model.table_weight(i).grad[_trailing(model, i)].any(), "gradient reached trailing columns"
        optimizer.step()
    for i, f in enumerate(FEATURES):
        trailing, weight = _trailing(model, i), model.table_weight(i).detach()
        assert trailing.any()
        assert torch.equal(weight[trailing], snapshot[i][trailing]), f"{f}: trailing columns moved"
        assert not torch.equal(weight[~trailing], snapshot[i][~trailing]), f"{f}: did not train"
    dense, sparse = _dense(9), _kjt(9)
    with torch.no_grad():
        before = model(dense, sparse)
        _scramble_trailing(model)
        after = model(dense, sparse)
    torch.testing.assert_close(after, before, rtol=0, atol=0)


def test_key_order_of_the_kjt_does_not_matter():
    model = _model()
    dense, sparse = _dense(5), _kjt(5)
    jagged = sparse.to_dict()
    order = FEATURES[::-1]
    permuted = KeyedJaggedTensor.from_lengths_sync(
        keys=order,
        values=torch.cat([jagged[f].values() for f in order]),
        lengths=torch.cat([jagged[f].lengths() for f in order]),
    )
    with torch.no_grad():
        torch.testing.assert_close(model(dense, permuted), model(dense, sparse), rtol=0, atol=0)


def test_sizes_by_index_name_or_feature_and_masked_table():
    model = _model(random_sizes=False)
    params = [id(p) for p in model.parameters()]
    weight = model.table_weight("f2").detach().clone()
    sizes = torch.randint(1, D + 1, (ROWS[2],))
    model.set_row_sizes("t_f2", sizes)
    assert [id(p) for p in model.parameters()] == params
    assert torch.equal(model.table_weight(2).detach(), weight)  # sizes mask, they never overwrite
    for key in (2, "t_f2", "f2"):
        assert torch.equal(model.row_sizes(key), sizes.to(torch.int32))
    assert model.row_sizes("f2").dtype == torch.int32
    mask = torch.arange(D).unsqueeze(0) < sizes.unsqueeze(1)
    torch.testing.assert_close(model.masked_table("f2"), weight * mask, rtol=0, atol=0)
    assert set(model.state_dict()) >= {f"sizes_{i}" for i in range(len(FEATURES))}
    with pytest.raises(ValueError, match=r"t_f1 sizes.*\[1, 16\]"):
        model.set_row_sizes("f1", torch.zeros(ROWS[1], dtype=torch.int64))
    with pytest.raises(ValueError, match="expected shape"):
        model.set_row_sizes(1, torch.ones(ROWS[1] + 1, dtype=torch.int64))
    with pytest.raises(KeyError, match="nope"):
        model.row_sizes("nope")
    with pytest.raises(IndexError, match="table index"):
        model.row_sizes(7)


def test_per_example_quality_is_negative_log_loss():
    model = _model()
    dense, sparse = _dense(6), _kjt(6)
    labels = _labels(dense, sparse)
    with torch.no_grad():
        quality = model.per_example_quality(dense, sparse, labels)
        logits = model(dense, sparse)
    assert quality.shape == (B,) and bool((quality <= 0).all())
    torch.testing.assert_close(-quality.mean(), model.bce(logits, labels))
    p = torch.sigmoid(logits)
    torch.testing.assert_close(quality, labels * p.log() + (1 - labels) * (1 - p).log(), rtol=1e-4, atol=1e-5)


def test_row_mean_over_examples_matches_a_slow_reference():
    rows = {"a": 6, "b": 4}
    # example 0: a=[1, 1, 3] (repeat), b=[]; example 1: a=[], b=[0, 2]; example 2: a=[3, 5], b=[2]
    sparse = KeyedJaggedTensor.from_lengths_sync(
        keys=["a", "b"],
        values=torch.tensor([1, 1, 3, 3, 5, 0, 2, 2]),
        lengths=torch.tensor([3, 0, 2, 0, 2, 1], dtype=torch.int32),
    )
    per_example = torch.tensor([0.5, -2.0, 3.0])
    out = row_mean_over_examples(sparse, per_example, rows)
    jagged = sparse.to_dict()
    for f, n in rows.items():
        ref_sum, ref_count = torch.zeros(n), torch.zeros(n, dtype=torch.int64)
        bags = torch.split(jagged[f].values(), jagged[f].lengths().tolist())
        for b, bag in enumerate(bags):
            for r in set(bag.tolist()):
                ref_sum[r] += per_example[b]
                ref_count[r] += 1
        total, count = out[f]
        torch.testing.assert_close(total, ref_sum)
        assert torch.equal(count, ref_count)
    assert out["a"][1][1] == 1  # a repeated id counts its example once


def test_row_mean_over_examples_on_a_model_batch():
    model = _model()
    dense, sparse = _dense(8), _kjt(8)
    with torch.no_grad():
        quality = model.per_example_quality(dense, sparse, _labels(dense, sparse))
    out = row_mean_over_examples(sparse, quality, model.table_rows)
    assert set(out) == set(FEATURES)
    for f, n in zip(FEATURES, ROWS, strict=True):
        total, count = out[f]
        assert total.shape == (n,) and count.shape == (n,)
        present = torch.unique(sparse[f].values())
        assert torch.equal(torch.nonzero(count).squeeze(1), present)
    with pytest.raises(ValueError, match="per_example"):
        row_mean_over_examples(sparse, quality[:-1], model.table_rows)
    with pytest.raises(IndexError, match="'f0'"):
        row_mean_over_examples(sparse, quality, {"f0": 3})


def test_no_dense_features():
    config = DLRMConfig(d_max=D, bottom_mlp=(D,), top_mlp=(8,))
    model = DLRM(config, 0, ROWS, FEATURES)
    assert model(torch.zeros(B, 0), _kjt(0)).shape == (B,)
    with pytest.raises(ValueError, match="single table"):
        DLRM(config, 0, ROWS[:1], FEATURES[:1])


def test_bad_inputs_name_the_problem():
    model = _model()
    dense, sparse = _dense(0), _kjt(0)
    with pytest.raises(ValueError, match=r"dense: expected shape \[B, 5\]"):
        model(dense[:, :4], sparse)
    with pytest.raises(ValueError, match="batch size"):
        model(dense[:10], sparse)
    wrong_keys = _kjt(0, features=["f0", "f1", "f2", "zz"])
    with pytest.raises(ValueError, match=r"missing \['f3'\], unexpected \['zz'\]"):
        model(dense, wrong_keys)
    jagged = sparse.to_dict()

    def shifted(feature: str, shift: int) -> KeyedJaggedTensor:
        return KeyedJaggedTensor.from_lengths_sync(
            keys=FEATURES,
            values=torch.cat([jagged[f].values() + (f == feature) * shift for f in FEATURES]),
            lengths=torch.cat([jagged[f].lengths() for f in FEATURES]),
        )

    with pytest.raises(IndexError, match=r"feature 'f2'.*\[0, 300\)"):
        model(dense, shifted("f2", 300))
    negative = shifted("f1", -1000)
    with pytest.raises(IndexError, match="feature 'f1'"):
        model(dense, negative)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"d_max": 0, "bottom_mlp": (0,)}, "d_max"),
        ({"bottom_mlp": (32, 8)}, "bottom_mlp"),
        ({"bottom_mlp": ()}, "bottom_mlp"),
        ({"top_mlp": (0,)}, "top_mlp"),
        ({"interaction": "mlp"}, "interaction"),
        ({"pooling": "max"}, "pooling"),
        ({"init_std": 0.0}, "init_std"),
    ],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DLRMConfig(**{"d_max": D, "bottom_mlp": (32, D), **kwargs})


def test_bad_constructor_arguments():
    config = DLRMConfig(d_max=D, bottom_mlp=(D,))
    with pytest.raises(ValueError, match="equal length"):
        DLRM(config, N_DENSE, ROWS[:2], FEATURES)
    with pytest.raises(ValueError, match="unique"):
        DLRM(config, N_DENSE, ROWS[:2], ["a", "a"])
    with pytest.raises(ValueError, match="table_sizes"):
        DLRM(config, N_DENSE, [0, 3], ["a", "b"])
