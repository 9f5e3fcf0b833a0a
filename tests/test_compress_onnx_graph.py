"""Hand-built ONNX ragged lookups: equal to RaggedEmbedding.lookup in onnxruntime, dynamic batch, atomic saves."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from ciess_prod.compress.onnx_graph import GraphBuilder, ragged_lookup, ragged_lookup_model, save_onnx
from ciess_prod.compress.ragged import RaggedEmbedding

DTYPES = ("fp32", "fp16", "int8", "int4")
N, D = 300, 16
BATCHES = (1, 2, 37, 500)


def _table(dtype: str, n: int = N, d: int = D, seed: int = 0) -> RaggedEmbedding:
    """Sizes cover 0, 1 and d (first and last rows too); some kept values are -0.0; odd sum so int4 has a spare
    nibble."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, d, generator=g)
    weight[::7, ::3] = -0.0
    sizes = torch.randint(0, d + 1, (n,), generator=g)
    sizes[:4] = torch.tensor([0, d, 1, 0])
    sizes[-1] = 0
    if int(sizes.sum()) % 2 == 0:
        sizes[5] += 1 if int(sizes[5]) < d else -1
    assert int(sizes.sum()) % 2 == 1
    return RaggedEmbedding.from_dense(weight, sizes, dtype)


def _session(model: onnx.ModelProto | str | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1  # tiny inputs on a loaded 2-core machine
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _run(session: ort.InferenceSession, ids: torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(session.run(None, {"ids": ids.numpy()})[0])


def _batches(rows: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for b in BATCHES:
        ids = torch.randint(0, rows, (b,), generator=g)
        if b >= 4:
            ids[:4] = torch.tensor([0, 0, rows - 1, 1])  # repeated ids and size-0 rows
        out.append(ids)
    return out


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns: also tells -0.0 from +0.0, which torch.equal does not."""
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
def test_lookup_matches_table(dtype: str, tmp_path: Path, one_torch_thread: None) -> None:
    table = _table(dtype)
    table.backend = "torch"  # the reference; the compiled op gives the same rows (tests/test_compress_ragged.py)
    path = tmp_path / f"{dtype}.onnx"
    save_onnx(ragged_lookup_model(table), path)
    session = _session(path)
    assert session.get_inputs()[0].shape == ["batch"] and session.get_outputs()[0].shape == ["batch", D]
    for ids in _batches(N):
        got, want = _run(session, ids), table.lookup(ids)
        assert got.dtype == torch.float32 and got.shape == (ids.numel(), D)
        if dtype == "fp32":
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
        assert torch.equal(_bits(got), _bits(want))  # in fact bit-identical for every dtype, -0.0 included


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_rows_empty(dtype: str, one_torch_thread: None) -> None:
    weight = torch.randn(20, 8, generator=torch.Generator().manual_seed(2))
    table = RaggedEmbedding.from_dense(weight, torch.zeros(20, dtype=torch.int64), dtype)
    assert table.values.numel() == 0
    session = _session(ragged_lookup_model(table))
    for ids in (torch.tensor([3]), torch.tensor([0, 19, 19, 5, 0])):
        got = _run(session, ids)
        assert torch.equal(_bits(got), _bits(torch.zeros(ids.numel(), 8)))


@pytest.mark.parametrize("dtype", DTYPES)
def test_many_blocks_and_empty_batch(dtype: str, one_torch_thread: None) -> None:
    """d_max 128 -> blocks of 512 rows: ids on both sides of block boundaries, a full block (local offsets up to
    65408, past the int16 sign bit of the stored uint16), an empty one. A batch of 0 ids gives [0, d_max]."""
    n, d = 3 * 512 + 40, 128
    g = torch.Generator().manual_seed(4)
    sizes = torch.randint(0, d + 1, (n,), generator=g)
    sizes[512:1024], sizes[1024:1536] = d, 0
    sizes[0] += int(sizes[:512].sum()) % 2 == 0  # odd values before the full block: its int4 rows start mid-byte
    table = RaggedEmbedding.from_dense(torch.randn(n, d, generator=g), sizes, dtype)
    table.backend = "torch"
    assert table.rows_per_block == 512 and int(table.local_offsets[1023]) < 0
    model = ragged_lookup_model(table)
    local = next(t for t in model.graph.initializer if t.name == "table/local_offsets")
    assert local.data_type == TensorProto.UINT16
    session = _session(model)
    ids = torch.randint(0, n, (700,), generator=g)
    ids[:8] = torch.tensor([0, 511, 512, 1023, 1024, 1535, 1536, n - 1])
    assert torch.equal(_bits(_run(session, ids)), _bits(table.lookup(ids)))
    assert _run(session, torch.zeros(0, dtype=torch.int64)).shape == (0, d)


def test_external_data(tmp_path: Path, one_torch_thread: None) -> None:
    table = _table("fp32", n=400)
    table.backend = "torch"
    path = tmp_path / "out" / "lookup.onnx"
    save_onnx(ragged_lookup_model(table), path, external_data_threshold=1024)
    data = tmp_path / "out" / "lookup.onnx.data"
    assert path.is_file() and data.is_file() and data.stat().st_size >= table.values.numel() * 4
    assert sorted(p.name for p in path.parent.iterdir()) == ["lookup.onnx", "lookup.onnx.data"]  # no temp left
    assert path.stat().st_size < data.stat().st_size
    onnx.checker.check_model(str(path), full_check=True)
    session = _session(path)
    for ids in _batches(400):
        assert torch.equal(_bits(_run(session, ids)), _bits(table.lookup(ids)))


def test_save_keeps_model_and_replaces_file(tmp_path: Path) -> None:
    """The external-data write leaves the caller's proto intact; a later inline save replaces the file and drops the
    stale data file; nothing temporary is left behind."""
    model = ragged_lookup_model(_table("int8", n=400))
    before = model.SerializeToString()
    path = tmp_path / "m.onnx"
    save_onnx(model, path, external_data_threshold=0)
    assert model.SerializeToString() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.data"]
    save_onnx(model, path)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_checker_passes(dtype: str) -> None:
    model = ragged_lookup_model(_table(dtype, n=30))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == 17 and model.ir_version == 8
    assert {node.domain for node in model.graph.node} == {""}  # standard ops only


def test_save_rejects_invalid_model(tmp_path: Path) -> None:
    g = GraphBuilder()
    x = g.input("x", TensorProto.FLOAT, ["batch"])
    g.output("y", TensorProto.FLOAT, ["batch"], source=g.op("NoSuchOp", x))
    with pytest.raises(onnx.checker.ValidationError):
        save_onnx(g.model(), tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


def test_graph_builder_names_and_two_tables(one_torch_thread: None) -> None:
    """Fresh names never collide, so two tables can share one graph (e.g. user and item embeddings)."""
    g = GraphBuilder("two")
    assert g.fresh("a") == "a" and g.fresh("a") == "a_1" and g.fresh("a") == "a_2"
    assert g.constant("c", torch.ones(2)) == "c" and g.constant("c", np.zeros(2)) == "c_1"
    with pytest.raises(ValueError):
        g.input("a", TensorProto.INT64, ["batch"])
    users, items = _table("fp16", n=40, seed=5), _table("int4", n=60, seed=6)
    users.backend = items.backend = "torch"
    u = g.input("ids", TensorProto.INT64, ["batch"])
    i = g.input("item_ids", TensorProto.INT64, ["batch"])
    g.output("user_rows", TensorProto.FLOAT, ["batch", D], source=ragged_lookup(g, users, u, "t"))
    g.output("item_rows", TensorProto.FLOAT, ["batch", D], source=ragged_lookup(g, items, i, "t"))
    model = g.model()
    onnx.checker.check_model(model, full_check=True)
    session = _session(model)
    uid, iid = torch.tensor([0, 39, 7]), torch.tensor([59, 1, 1])
    got_u, got_i = session.run(None, {"ids": uid.numpy(), "item_ids": iid.numpy()})
    assert torch.equal(_bits(torch.from_numpy(got_u)), _bits(users.lookup(uid)))
    assert torch.equal(_bits(torch.from_numpy(got_i)), _bits(items.lookup(iid)))
