"""Per-row embedding sizes: trailing columns never affect outputs and never change during training."""

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torchrec import KeyedJaggedTensor

from ciess_prod.models import SIDES, ModelConfig, build_model, model_memory, sparsity, uniform_sizes
from ciess_prod.models.sizes import masked_table

N_USERS, N_ITEMS, D = 30, 40, 16
KINDS = ["mf", "neumf", "ngcf", "lightgcn"]


def _train_matrix(seed: int = 0) -> sp.csr_matrix:
    rng = np.random.default_rng(seed)
    dense = rng.random((N_USERS, N_ITEMS)) < 0.2
    dense[np.arange(N_USERS), rng.integers(0, N_ITEMS, N_USERS)] = True
    return sp.csr_matrix(dense.astype(np.float32))


def _batch(seed: int, size: int = 64) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    u = torch.randint(0, N_USERS, (size,), generator=g)
    p = torch.randint(0, N_ITEMS, (size,), generator=g)
    n = torch.randint(0, N_ITEMS, (size,), generator=g)
    values = torch.cat([u, p, n])
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user", "pos_item", "neg_item"], values=values, lengths=torch.ones(3 * size, dtype=torch.int32)
    )


def _model(kind: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, d_max=D, mlp_layers=(32, 16)), N_USERS, N_ITEMS, _train_matrix())
    g = torch.Generator().manual_seed(1)
    for side in SIDES:
        model.set_row_sizes(side, torch.randint(1, D + 1, (model.n_rows[side],), generator=g))
    return model


def _trailing(model, name: str) -> torch.Tensor:
    """A bool mask of the trailing (unused) entries of table ``name`` (test-only, small tables)."""
    sizes = model.row_sizes(model.tables[name])
    return torch.arange(D).unsqueeze(0) >= sizes.unsqueeze(1).long()


def _outputs(model, batch):
    model.eval()
    with torch.no_grad():
        out = model(batch)
        scores = model.score_users(torch.arange(N_USERS))
    return out.pos_scores, out.neg_scores, out.l2, scores


@pytest.mark.parametrize("kind", KINDS)
def test_trailing_columns_never_affect_outputs(kind):
    model = _model(kind)
    batch = _batch(0)
    before = _outputs(model, batch)
    with torch.no_grad():
        for name in model.tables:
            weight = model.table_weight(name)
            weight[_trailing(model, name)] = torch.randn(int(_trailing(model, name).sum())) * 100
    model.invalidate_cache()
    after = _outputs(model, batch)
    for a, b in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_trailing_columns_never_change_in_training(kind):
    model = _model(kind)
    snapshot = {name: model.table_weight(name).detach().clone() for name in model.tables}
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    for step in range(5):
        out = model(_batch(step))
        loss = torch.nn.functional.softplus(out.neg_scores - out.pos_scores).mean() + 1e-2 * out.l2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for name in model.tables:
        trailing = _trailing(model, name)
        weight = model.table_weight(name).detach()
        assert torch.equal(weight[trailing], snapshot[name][trailing]), f"{kind}/{name}: trailing columns moved"
        assert not torch.equal(weight[~trailing], snapshot[name][~trailing]), f"{kind}/{name}: did not train"


def test_changing_sizes_keeps_the_model():
    model = _model("lightgcn")
    params = [id(p) for p in model.parameters()]
    weight = model.table_weight("user").detach().clone()
    model.set_row_sizes("user", torch.full((N_USERS,), 3))
    assert [id(p) for p in model.parameters()] == params
    assert torch.equal(model.table_weight("user").detach(), weight)  # sizes mask, they never overwrite
    assert model.row_sizes("user").dtype == torch.int32


def test_masked_table_matches_dense_mask_and_its_gradient():
    weight = torch.randn(50, D, requires_grad=True)
    sizes = torch.randint(1, D + 1, (50,))
    mask = (torch.arange(D).unsqueeze(0) < sizes.unsqueeze(1)).float()
    out = masked_table(weight, sizes)
    torch.testing.assert_close(out, weight.detach() * mask, rtol=0, atol=0)
    out.pow(2).sum().backward()
    torch.testing.assert_close(weight.grad, 2 * weight.detach() * mask)


@pytest.mark.parametrize(
    "sizes, message",
    [
        (torch.zeros(N_USERS, dtype=torch.int64), r"\[1, 16\]"),
        (torch.full((N_USERS,), D + 1), r"\[1, 16\]"),
        (torch.ones(N_USERS + 1, dtype=torch.int64), "expected shape"),
        (torch.ones(N_USERS), "integer"),
    ],
)
def test_bad_sizes_are_rejected(sizes, message):
    with pytest.raises(ValueError, match=message):
        _model("mf").set_row_sizes("user", sizes)


def test_memory_accounting_and_sparsity():
    model = _model("neumf")
    for side in SIDES:
        model.set_row_sizes(side, uniform_sizes(model.n_rows[side], D, 0.75))
    memory = model_memory(model)
    # NeuMF: a GMF and an MLP table per side, each at d = floor(0.25 * 16) = 4.
    assert memory.parameters == 2 * (N_USERS + N_ITEMS) * 4
    assert memory.dense_bytes == 2 * (N_USERS + N_ITEMS) * D * 4
    assert memory.sparsity == pytest.approx(0.75)
    assert sparsity([torch.tensor([1, 3]), torch.tensor([4])], d_max=4) == pytest.approx(1 - 8 / 12)
    assert int(uniform_sizes(5, 128, 0.95)[0]) == 6


def _full_model(kind: str):
    torch.manual_seed(0)
    model = build_model(ModelConfig(kind=kind, d_max=D, mlp_layers=(32, 16)), N_USERS, N_ITEMS, _train_matrix())
    with torch.no_grad():  # anisotropic columns, so the principal order differs from the stored one
        for name in model.tables:
            model.table_weight(name).mul_(torch.linspace(0.2, 2.0, D))
    return model


@pytest.mark.parametrize("kind", ["mf", "lightgcn"])
def test_the_principal_basis_keeps_scores_and_loss_and_orders_columns_by_use(kind):
    from ciess_prod.models.basis import rotate_to_principal_basis

    model = _full_model(kind)
    before = _outputs(model, _batch(0))
    rotation = rotate_to_principal_basis(model)
    assert torch.allclose(rotation.T @ rotation, torch.eye(D, dtype=torch.float64), atol=1e-10)
    for a, b in zip(before, _outputs(model, _batch(0)), strict=True):
        torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
    with torch.no_grad():
        scored = model.final_embeddings() if kind == "lightgcn" else torch.cat([model.table_weight(n) for n in
                                                                                  model.tables])
    energy = scored.double().pow(2).sum(0)
    assert bool((energy[:-1] >= energy[1:] - 1e-9).all())  # column j carries the j-th most
    assert energy[0] > 2 * energy[-1]


def test_the_principal_basis_refuses_what_it_cannot_rotate():
    from ciess_prod.models.basis import rotate_to_principal_basis

    for kind in ("ngcf", "neumf"):
        with pytest.raises(ValueError, match="only for \\('mf', 'lightgcn'\\), not "):
            rotate_to_principal_basis(_full_model(kind))
    with pytest.raises(ValueError, match="rotate the full-size model"):
        rotate_to_principal_basis(_model("lightgcn"))


@pytest.mark.parametrize("index_dtype", [np.int32, np.int64])
def test_the_sparse_product_and_its_gradient_match_the_dense_ones(index_dtype):
    """The torch CSR view of a scipy matrix: a rectangular block (as the sharded search multiplies) and its own
    transpose for the backward; int64 indices are what scipy uses for large matrices."""
    from ciess_prod.models.graph import normalized_adjacency, propagate, sparse_matmul

    rows = normalized_adjacency(_train_matrix())[5:25]
    rows.indptr, rows.indices = rows.indptr.astype(index_dtype), rows.indices.astype(index_dtype)
    dense = torch.from_numpy(rows.toarray())
    x = torch.randn(rows.shape[1], D, requires_grad=True, generator=torch.Generator().manual_seed(0))
    out = sparse_matmul(rows, rows.T.tocsr(), x)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    out.backward(grad_out)
    torch.testing.assert_close(out, dense @ x.detach())
    torch.testing.assert_close(x.grad, dense.T @ grad_out)
    # the symmetric whole adjacency: its backward is the same product
    adjacency = normalized_adjacency(_train_matrix())
    y = torch.randn(adjacency.shape[0], D, requires_grad=True)
    propagate(adjacency, y).sum().backward()
    whole = torch.from_numpy(adjacency.toarray())
    torch.testing.assert_close(y.grad, whole.T @ torch.ones(adjacency.shape[0], D))


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_repeat_bit_for_bit_on_two_threads(kind):
    """One batch's gradients are the same in every run: a search amplifies the last bit of a step's training, so a
    scatter whose accumulation order varies between threads (advanced-index backward) would make it unrepeatable."""
    model, batch = _model(kind), _batch(3, size=20000)
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        grads = []
        for _ in range(4):
            model.zero_grad(set_to_none=True)
            torch.manual_seed(0)  # NGCF's dropout draws the same masks
            out = model(batch)
            (torch.nn.functional.softplus(out.neg_scores - out.pos_scores).mean() + 1e-4 * out.l2).backward()
            grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for later in grads[1:] for a, b in zip(grads[0], later, strict=True))


def test_lightgcn_propagates_only_up_to_the_widest_row_with_the_full_widths_scores_and_gradients():
    from ciess_prod.models.base import l2_of
    from ciess_prod.models.lightgcn import lightgcn_layers

    model = _model("lightgcn")
    g = torch.Generator().manual_seed(2)
    model.set_row_sizes("user", torch.randint(1, 6, (N_USERS,), generator=g))
    model.set_row_sizes("item", torch.randint(1, 4, (N_ITEMS,), generator=g))
    assert model.widest_row() == 5
    torch.testing.assert_close(model.ego(5), model.ego()[:, :5], rtol=0, atol=0)
    full_width = lightgcn_layers(model.adjacency, model.ego(), model.config.n_layers)
    assert bool((full_width[:, 5:] == 0).all())
    torch.testing.assert_close(model.final_embeddings(), full_width[:, :5], rtol=1e-6, atol=1e-7)

    def full_width_loss(batch):  # the model's BPR loss computed at d_max, from its masked EBC lookups
        users, items = lightgcn_layers(model.adjacency, model.ego(), model.config.n_layers).split([N_USERS, N_ITEMS])
        u, p, n = users[batch["user"].values()], items[batch["pos_item"].values()], items[batch["neg_item"].values()]
        ego = model.lookup(batch)
        reg = l2_of(ego["user.user"], ego["item.pos_item"], ego["item.neg_item"])
        return torch.nn.functional.softplus((u * n).sum(-1) - (u * p).sum(-1)).mean() + 0.1 * reg

    def trimmed_loss(batch):
        out = model(batch)
        return torch.nn.functional.softplus(out.neg_scores - out.pos_scores).mean() + 0.1 * out.l2

    tables = [model.table_weight(n) for n in model.tables]
    model.train()
    losses = [loss(_batch(3)) for loss in (full_width_loss, trimmed_loss)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    for full, cut in zip(*(torch.autograd.grad(loss, tables) for loss in losses), strict=True):
        torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-8)
    model.set_row_sizes("item", torch.full((N_ITEMS,), D))  # a full-size side: nothing to trim
    assert model.widest_row() == D and model.final_embeddings().shape == (N_USERS + N_ITEMS, D)
