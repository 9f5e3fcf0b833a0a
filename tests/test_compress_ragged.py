"""RaggedEmbedding: equality with the masked dense table, exact byte accounting, quantisation bounds, safe state."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

from ciess_prod.compress import _native
from ciess_prod.compress.ragged import STATE_SCHEMA, RaggedEmbedding, decode_offsets, encode_offsets, rows_per_block
from ciess_prod.models import ModelConfig
from ciess_prod.models.mf import MF
from ciess_prod.models.sizes import masked_table

DTYPES = ("fp32", "fp16", "int8", "int4")
BACKENDS = ("native", "torch")
N, D = 300, 37  # d_max deliberately not a multiple of 4


def _native_or_skip() -> None:
    if _native.ops() is None:
        pytest.skip(f"compiled ragged op unavailable here: {_native.error()}")


def _table(n: int = N, d: int = D, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A weight with some -0.0 entries and sizes covering 0, 1 and d (first, last and middle rows)."""
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, d, generator=g)
    weight[::7, ::3] = -0.0
    sizes = torch.randint(0, d + 1, (n,), generator=g)
    sizes[:3] = torch.tensor([0, d, 1])
    sizes[-1] = 0
    return weight, sizes


def _ids(n_ids: int, rows: int = N, seed: int = 1) -> torch.Tensor:
    ids = torch.randint(0, rows, (n_ids,), generator=torch.Generator().manual_seed(seed))
    ids[:4] = torch.tensor([0, 0, rows - 1, 1])  # repeated ids and size-0 rows
    return ids


def _bits(t: torch.Tensor) -> torch.Tensor:
    """fp32 bit patterns: stricter than torch.equal, which treats -0.0 and +0.0 as equal."""
    return t.contiguous().view(torch.int32)


def _emb(weight: torch.Tensor, sizes: torch.Tensor, dtype: str = "fp32", backend: str = "native") -> RaggedEmbedding:
    if backend == "native":
        _native_or_skip()
    emb = RaggedEmbedding.from_dense(weight, sizes, dtype)
    emb.backend = backend
    return emb


# ---- equality with the masked dense table ----------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", [1, D, 64])
def test_lookup_is_the_masked_dense_lookup_bit_for_bit(one_torch_thread, backend, d):
    weight, sizes = _table(d=d)
    emb = _emb(weight, sizes, backend=backend)
    ids = _ids(500)
    reference = masked_table(weight, sizes)
    assert torch.equal(_bits(emb.lookup(ids)), _bits(reference[ids]))
    assert torch.equal(_bits(emb.to_dense()), _bits(reference))
    assert emb.lookup(ids[:0]).shape == (0, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("include_last_offset", [False, True])
def test_pooled_matches_embedding_bag_on_the_masked_table(one_torch_thread, backend, include_last_offset):
    weight, sizes = _table()
    emb = _emb(weight, sizes, backend=backend)
    ids = _ids(400)
    # empty bags first, in the middle and last; a long bag; single-id bags
    bounds = [0, 0, 3, 3, 4, 5, 150, 150, 399, 400, 400]
    offsets = torch.tensor(bounds if include_last_offset else bounds[:-1])
    reference = masked_table(weight, sizes)
    for mode in ("sum", "mean"):
        got = emb.pooled(ids, offsets, mode=mode, include_last_offset=include_last_offset)
        want = F.embedding_bag(ids, reference, offsets, mode=mode, include_last_offset=include_last_offset)
        assert got.shape == (len(bounds) - 1, D)
        assert torch.allclose(got, want, rtol=0, atol=1e-6)
        if mode == "sum":
            assert torch.equal(got, want)  # same summation order: bit-exact
    empty = emb.pooled(ids, offsets, include_last_offset=include_last_offset)[[0, 2, 6, 9]]
    assert torch.equal(empty, torch.zeros_like(empty))
    assert torch.equal(emb(ids, offsets), emb.pooled(ids, offsets, include_last_offset=False))


@pytest.mark.parametrize("backend", BACKENDS)
def test_all_rows_at_d_max_and_all_rows_empty(one_torch_thread, backend):
    weight, _ = _table()
    ids = _ids(200)
    offsets = torch.arange(0, 200, 5)
    full = _emb(weight, torch.full((N,), D), backend=backend)
    assert torch.equal(_bits(full.lookup(ids)), _bits(weight[ids]))
    assert torch.equal(full.pooled(ids, offsets), F.embedding_bag(ids, weight, offsets, mode="sum"))
    empty = _emb(weight, torch.zeros(N, dtype=torch.int64), "int4", backend=backend)
    assert empty.values.numel() == 0
    assert torch.equal(empty.lookup(ids), torch.zeros(200, D))
    assert torch.equal(empty.pooled(ids, offsets, mode="mean"), torch.zeros(40, D))


def test_plan_sizes_and_model_tables_work_as_they_come(one_torch_thread):
    """int16 plan sizes and a model's table weight (a Parameter) are accepted unchanged."""
    model = MF(20, 30, ModelConfig(kind="mf", d_max=16))
    sizes = torch.randint(1, 17, (30,), dtype=torch.int16, generator=torch.Generator().manual_seed(3))
    model.set_row_sizes("item", sizes)
    emb = RaggedEmbedding.from_dense(model.table_weight("item"), sizes)
    assert torch.equal(emb.to_dense(), model.masked_table("item").detach())
    assert torch.equal(emb.sizes, sizes.to(torch.int64))


# ---- quantised dtypes --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_quantisation_error_within_half_a_step(one_torch_thread, dtype):
    weight, sizes = _table()
    weight[5, : sizes[5]] = 0.25  # a constant row: exact whatever the scale
    emb = RaggedEmbedding.from_dense(weight, sizes, dtype)
    reference = masked_table(weight, sizes)
    error = (emb.to_dense() - reference).abs()
    scale, bias = emb.scale_bias.float().unbind(1)
    levels = 255 if dtype == "int8" else 15
    eps = 4 * torch.finfo(torch.float32).eps * (bias.abs() + levels * scale)  # fp32 rounding of code * scale + bias
    bound = (scale / 2 + eps)[:, None]
    print(f"{dtype}: max abs error vs fp32 {error.max().item():.3g}, mean scale {scale.mean().item():.3g}")
    assert bool((error <= bound).all())
    assert float(error[5].max()) == 0.0
    assert float(error[sizes == 0].max()) == 0.0  # padding stays exactly zero


def test_fp16_error_is_fp16_rounding(one_torch_thread):
    weight, sizes = _table()
    emb = RaggedEmbedding.from_dense(weight, sizes, "fp16")
    reference = masked_table(weight, sizes)
    error = (emb.to_dense() - reference).abs()
    print(f"fp16: max abs error vs fp32 {error.max().item():.3g}")
    assert torch.equal(emb.to_dense(), reference.half().float())
    assert bool((error <= torch.clamp(reference.abs() * 2.0**-11, min=2.0**-25)).all())  # half an ulp (subnormals)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_quantised_lookups_pool_their_dequantised_table_exactly(one_torch_thread, dtype, backend):
    weight, sizes = _table()
    emb = _emb(weight, sizes, dtype, backend)
    dense = emb.to_dense()
    ids, offsets = _ids(300), torch.tensor([0, 0, 1, 2, 50, 299])
    assert torch.equal(_bits(emb.lookup(ids)), _bits(dense[ids]))
    assert torch.equal(emb.pooled(ids, offsets), F.embedding_bag(ids, dense, offsets, mode="sum"))


def test_quantisation_rejects_values_beyond_fp16_scale_range():
    weight = torch.zeros(2, 4)
    weight[1, 0] = 1e6
    with pytest.raises(ValueError, match="row 1"):
        RaggedEmbedding.from_dense(weight, torch.tensor([4, 4]), "int4")
    with pytest.raises(ValueError, match="row 1 exceeds the fp16 range"):
        RaggedEmbedding.from_dense(weight, torch.tensor([4, 4]), "fp16")
    RaggedEmbedding.from_dense(weight, torch.tensor([4, 4]), "int8")  # fp32 scales: fine


# ---- compiled op vs pure-torch fallback ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_and_fallback_agree(one_torch_thread, dtype):
    _native_or_skip()
    weight, sizes = _table(n=2000, d=53, seed=4)
    emb = RaggedEmbedding.from_dense(weight, sizes, dtype)
    ids = _ids(3000, rows=2000)
    offsets = torch.sort(torch.randint(0, 3001, (100,))).values
    offsets[0] = 0
    out = {}
    for backend in BACKENDS:
        emb.backend = backend
        out[backend] = (emb.lookup(ids), emb.pooled(ids, offsets), emb.pooled(ids, offsets, mode="mean"))
    for native, fallback in zip(out["native"], out["torch"], strict=True):
        assert torch.equal(_bits(native), _bits(fallback))


def test_compiled_op_splits_work_across_threads_correctly():
    """Several parallel_for chunks (lookup: 256 ids, pooled: 64 bags each) on two threads give the same rows."""
    _native_or_skip()
    weight, sizes = _table(n=2000, d=53, seed=5)
    emb = RaggedEmbedding.from_dense(weight, sizes)
    ids, offsets = _ids(3000, rows=2000), torch.arange(0, 3000, 10)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got = emb.lookup(ids), emb.pooled(ids, offsets)
    finally:
        torch.set_num_threads(threads)
    reference = masked_table(weight, sizes)
    assert torch.equal(_bits(got[0]), _bits(reference[ids]))
    assert torch.equal(got[1], F.embedding_bag(ids, reference, offsets, mode="sum"))
    assert _native.build_library().is_file()  # cached: returns the existing library without compiling


def test_failed_build_warns_once_and_falls_back(monkeypatch, caplog):
    def broken() -> None:
        raise _native.NativeBuildError("no compiler here")

    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setattr(_native, "_load", broken)
    weight, sizes = _table()
    emb = RaggedEmbedding.from_dense(weight, sizes)
    with caplog.at_level(logging.WARNING, logger=_native.__name__):
        assert torch.equal(emb.lookup(_ids(50)), masked_table(weight, sizes)[_ids(50)])
        emb.lookup(_ids(50))
    assert [r.getMessage() for r in caplog.records].count(
        "ragged embedding op unavailable, using the slower pure-torch lookups: no compiler here"
    ) == 1
    assert _native.error() == "no compiler here"
    emb.backend = "native"
    with pytest.raises(RuntimeError, match="no compiler here"):
        emb.lookup(_ids(5))


def test_build_errors_carry_the_reason(tmp_path):
    with pytest.raises(_native.NativeBuildError, match="cannot be run"):
        _native.build_library(directory=tmp_path, compiler=str(tmp_path / "no-such-c++"))
    source = tmp_path / "broken.cpp"
    source.write_text('#error "deliberately broken"\n')
    with pytest.raises(_native.NativeBuildError, match="deliberately broken"):
        _native.build_library(source=source, directory=tmp_path)
    assert not list(tmp_path.glob("*.so"))  # no half-built library left behind


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setattr(_native, "_state", {})
    monkeypatch.setenv("CIESS_NATIVE", "0")
    assert _native.ops() is None
    assert "CIESS_NATIVE=0" in (_native.error() or "")


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_ids_and_offsets_name_the_problem(one_torch_thread, backend):
    weight, sizes = _table()
    emb = _emb(weight, sizes, backend=backend)
    with pytest.raises(IndexError, match=f"ids\\[1\\] = {N} is out of range"):
        emb.lookup(torch.tensor([0, N]))
    with pytest.raises(IndexError, match="ids\\[0\\] = -1"):
        emb.pooled(torch.tensor([-1, 2]), torch.tensor([0]))
    with pytest.raises(ValueError, match="offsets\\[0\\] must be 0"):
        emb.pooled(torch.tensor([1, 2]), torch.tensor([1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        emb.pooled(torch.tensor([1, 2, 3]), torch.tensor([0, 2, 1]))
    with pytest.raises(ValueError, match="non-decreasing"):
        emb.pooled(torch.tensor([1, 2]), torch.tensor([0, 3]), include_last_offset=True)
    with pytest.raises(ValueError, match="mode"):
        emb.pooled(torch.tensor([1]), torch.tensor([0]), mode="max")
    with pytest.raises(ValueError, match="ids must be a 1-D int64"):
        emb.lookup(torch.tensor([1.0]))


# ---- memory accounting ---------------------------------------------------------------------------------------------
def test_bytes_by_hand():
    weight = torch.randn(4, 6)
    sizes = torch.tensor([3, 0, 5, 1])  # sum 9
    expected = {  # dtype: (payload, scales); offsets: one int64 block offset (R = 8192 rows) + uint16 [5] = 18 bytes
        "fp32": (9 * 4, 0),
        "fp16": (9 * 2, 0),
        "int8": (9, 4 * 2 * 4),  # fp32 scale + bias per row
        "int4": (5, 4 * 2 * 2),  # 9 codes in 5 bytes; fp16 scale + bias per row
    }
    for dtype, (payload, scales) in expected.items():
        emb = RaggedEmbedding.from_dense(weight, sizes, dtype)
        assert emb.rows_per_block == 8192 and emb.block_offsets.numel() == 1 and emb.local_offsets.numel() == 5
        assert emb.offsets.tolist() == [0, 3, 3, 8, 9]
        assert emb.nbytes() == {
            "payload": payload,
            "offsets": 18,
            "scales": scales,
            "padding": 0,
            "total": payload + 18 + scales,
        }, dtype
        assert emb.ideal_bytes() == payload
        assert emb.dense_bytes() == 4 * 6 * 4


def test_bytes_of_a_large_table_follow_the_sizes():
    weight, sizes = _table(n=5000, d=128, seed=7)
    total = int(sizes.sum())
    emb = RaggedEmbedding.from_dense(weight, sizes, "int4")
    offsets = 8 * 10 + 2 * 5001  # ceil(5001 / 512) int64 block offsets + uint16 local offsets
    assert emb.nbytes()["offsets"] == offsets
    assert emb.nbytes()["total"] == (total + 1) // 2 + offsets + 4 * 5000
    assert emb.ideal_bytes() == (total + 1) // 2
    fp32 = RaggedEmbedding.from_dense(weight, sizes)
    assert fp32.nbytes()["total"] == 4 * total + offsets
    assert fp32.dense_bytes() == 5000 * 128 * 4


@pytest.mark.parametrize(
    ("n", "d"), [(0, 4), (1, 1), (4, 6), (511, 128), (512, 128), (5000, 128), (31, 40000), (5, 70000)]
)
def test_offset_bytes_are_block_offsets_plus_16_bit_locals(n, d):
    weight = torch.randn(n, d)
    sizes = torch.randint(0, d + 1, (n,), generator=torch.Generator().manual_seed(n))
    emb = RaggedEmbedding.from_dense(weight, sizes)
    r = rows_per_block(d)
    assert r & (r - 1) == 0 and (r - 1) * d <= 65535 and (r == 2**16 or (2 * r - 1) * d > 65535)
    n_blocks = -(-(n + 1) // r)
    assert emb.block_offsets.dtype == torch.int64 and emb.block_offsets.shape == (n_blocks,)
    assert emb.local_offsets.dtype == torch.int16 and emb.local_offsets.shape == (n + 1,)
    assert emb.nbytes()["offsets"] == 8 * n_blocks + 2 * (n + 1)
    assert emb.nbytes()["total"] == 4 * int(sizes.sum()) + 8 * n_blocks + 2 * (n + 1)
    assert torch.equal(emb.sizes, sizes) and emb.offsets.dtype == torch.int64
    assert {name for name, _ in emb.named_buffers()} == {"values", "block_offsets", "local_offsets"}  # no offsets


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_many_blocks_with_full_blocks_and_the_16_bit_limit(one_torch_thread, backend, dtype):
    """d_max 128 -> blocks of 512 rows; a block of rows all at d_max takes the local offsets to 511 * 128 = 65408
    (past the int16 sign bit), an empty block keeps them at 0, odd sizes start int4 rows mid-byte across blocks."""
    n, d = 5 * 512 + 100, 128
    g = torch.Generator().manual_seed(11)
    weight = torch.randn(n, d, generator=g)
    sizes = torch.randint(0, d + 1, (n,), generator=g)
    sizes[512:1024] = d  # block 1: full
    sizes[1024:1536] = 0  # block 2: empty
    sizes[1536:2048:2] = 1  # block 3: odd sizes
    emb = _emb(weight, sizes, dtype, backend)
    assert emb.rows_per_block == 512 and emb.block_offsets.numel() == 6
    local = emb.local_offsets.to(torch.int32) & 0xFFFF
    assert int(local[1023]) == 511 * 128 and int(emb.local_offsets[1023]) < 0  # stored as the uint16 bit pattern
    assert int(local.max()) == 511 * 128
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    assert torch.equal(emb.offsets, offsets) and torch.equal(emb.block_offsets, offsets[::512])
    dense = emb.to_dense()
    if dtype == "fp32":
        assert torch.equal(_bits(dense), _bits(masked_table(weight, sizes)))
    else:
        emb.backend = "torch"
        assert torch.equal(_bits(dense), _bits(emb.to_dense()))
        emb.backend = backend
    ids = torch.randint(0, n, (4000,), generator=g)
    ids[:6] = torch.tensor([511, 512, 1023, 1024, 1535, n - 1])  # both sides of block boundaries
    assert torch.equal(_bits(emb.lookup(ids)), _bits(dense[ids]))
    bags = torch.arange(0, 4000, 9)
    assert torch.equal(emb.pooled(ids, bags), F.embedding_bag(ids, dense, bags, mode="sum"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_d_max_1_fills_a_block_to_65535(one_torch_thread, backend):
    """d_max 1 -> blocks of 2^16 rows; rows all of size 1 put the largest possible local offset, 65535, in block 0."""
    n = 2**16 + 50
    weight = torch.randn(n, 1, generator=torch.Generator().manual_seed(12))
    emb = _emb(weight, torch.ones(n, dtype=torch.int64), backend=backend)
    assert emb.rows_per_block == 2**16 and emb.block_offsets.tolist() == [0, 2**16]
    assert int(emb.local_offsets[2**16 - 1]) == -1  # 0xFFFF
    ids = torch.tensor([0, 2**16 - 2, 2**16 - 1, 2**16, n - 1])
    assert torch.equal(_bits(emb.lookup(ids)), _bits(weight[ids]))


def test_offsets_overhead_within_10_percent_at_95_percent_sparsity():
    """fp32, d_max 128, 10^5 rows of mean size 6.4 (25.6 payload bytes a row): int32 offsets alone would cost
    4 / 25.6 = 15.6%; blocks of 512 rows with 16-bit local offsets cost about 2 bytes a row."""
    n, d = 100_000, 128
    sizes = torch.tensor([6, 7, 6, 7, 6]).repeat(n // 5)[torch.randperm(n, generator=torch.Generator().manual_seed(0))]
    emb = RaggedEmbedding.from_dense(torch.randn(n, d), sizes)
    ratio = emb.nbytes()["total"] / emb.ideal_bytes()
    print(f"fp32 overhead at mean size {float(sizes.float().mean()):.1f} of {d}: {ratio:.4f}x the ideal bytes")
    assert emb.ideal_bytes() == 4 * 640_000
    assert emb.nbytes()["offsets"] == 8 * 196 + 2 * (n + 1)
    assert ratio <= 1.10


def test_encode_decode_offsets_round_trip():
    sizes = torch.full((10_000,), 19)
    sizes[::3] = 0
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(sizes, 0)])
    block, local = encode_offsets(offsets, 19)  # R = 2048 (2047 * 19 = 38893)
    assert block.numel() == 5 and torch.equal(decode_offsets(block, local, rows_per_block(19)), offsets)
    with pytest.raises(ValueError, match="16 bits"):
        encode_offsets(offsets, 8)  # steps of 19 > d_max 8: the locals of an 8192-row block pass 65535


# ---- state round trip and corrupted state ------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_state_round_trips_through_safetensors(tmp_path: Path, dtype):
    weight, sizes = _table()
    emb = RaggedEmbedding.from_dense(weight, sizes, dtype)
    path = tmp_path / "table.safetensors"
    safetensors.torch.save_file(emb.state_tensors(), str(path), metadata={"ragged": json.dumps(emb.meta())})
    with safetensors.safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["ragged"])
    loaded = RaggedEmbedding.from_state_tensors(safetensors.torch.load_file(str(path)), meta)
    assert loaded.dtype == dtype and loaded.d_max == D and loaded.num_rows == N
    assert torch.equal(_bits(loaded.to_dense()), _bits(emb.to_dense()))
    assert loaded.nbytes() == emb.nbytes()


def _state(dtype: str = "int4") -> tuple[dict[str, torch.Tensor], dict]:
    weight, sizes = _table()
    emb = RaggedEmbedding.from_dense(weight, sizes, dtype)
    return {k: v.clone() for k, v in emb.state_tensors().items()}, emb.meta()


def _corrupt_offsets_order(t, m):
    a, b = int(t["local_offsets"][10]), int(t["local_offsets"][11])  # one block (R = 1024): locals are the offsets
    t["local_offsets"][10], t["local_offsets"][11] = b + 1, a


def _set(key, value):
    return lambda t, m: t.__setitem__(key, value(t[key]) if callable(value) else value)


CORRUPTIONS = {
    "not monotone": _corrupt_offsets_order,
    "offsets\\[0\\] must be 0": _set("block_offsets", lambda o: o + 1),
    "more than d_max": lambda t, m: m.update(d_max=3, rows_per_block=rows_per_block(3)),
    "rows_per_block 1024 does not match d_max 3": lambda t, m: m.__setitem__("d_max", 3),
    "rows_per_block 512 does not match": lambda t, m: m.__setitem__("rows_per_block", 512),
    "meta says 300 rows": _set("local_offsets", lambda o: o[:-1]),
    "block_offsets has 2 entries": _set("block_offsets", lambda o: torch.cat([o, o])),
    "values holds": _set("values", lambda v: v[:-1]),
    "values must be a 1-D torch.uint8": _set("values", lambda v: v.to(torch.int16)),
    "local_offsets must be a 1-D torch.int16": _set("local_offsets", lambda o: o.to(torch.int32)),
    "block_offsets must be a 1-D torch.int64": _set("block_offsets", lambda o: o.to(torch.int32)),
    "scale_bias must be a torch.float16": _set("scale_bias", lambda s: s.float()),
    "scale_bias must have shape": _set("scale_bias", lambda s: s[:-1]),
    "non-negative scales": _set("scale_bias", lambda s: -s),
    "exactly the tensors": lambda t, m: t.pop("scale_bias"),
    "schema": lambda t, m: m.__setitem__("schema", "something/else"),
    "meta must hold exactly": lambda t, m: m.pop("rows_per_block"),
    "dtype must be one of": lambda t, m: m.__setitem__("dtype", "int3"),
}


@pytest.mark.parametrize("problem", list(CORRUPTIONS))
def test_corrupted_state_is_rejected(problem):
    tensors, meta = _state()
    CORRUPTIONS[problem](tensors, meta)
    with pytest.raises(ValueError, match=problem):
        RaggedEmbedding.from_state_tensors(tensors, meta)


def _multi_block_state() -> tuple[dict[str, torch.Tensor], dict]:
    """fp32, 2000 rows of d_max 128: 4 blocks of 512 rows; row 1535 (the last before block 3) has size 0."""
    g = torch.Generator().manual_seed(13)
    sizes = torch.randint(0, 128, (2000,), generator=g)
    sizes[1535] = 0
    emb = RaggedEmbedding.from_dense(torch.randn(2000, 128, generator=g), sizes)
    assert emb.block_offsets.numel() == 4
    return {k: v.clone() for k, v in emb.state_tensors().items()}, emb.meta()


def _set_entry(key, index, value):
    return lambda t: t[key].__setitem__(index, value(t[key]) if callable(value) else value)


BLOCK_CORRUPTIONS = {
    "local_offsets\\[512\\], the first of block 1, must be 0, got 5": _set_entry("local_offsets", 512, 5),
    "not monotone: row 600": _set_entry("local_offsets", 600, -1),  # 0xFFFF: row 599 huge, row 600 negative
    "row 1999 size 129, more than d_max 128": _set_entry("local_offsets", 2000, lambda o: o[1999] + 129),
    "not monotone: row 1023": _set_entry("block_offsets", 2, lambda b: b[1] - 1),
    "values holds": _set_entry("block_offsets", 3, lambda b: b[3] + 1),  # row 1535 grows to 1: the total is off
    "block_offsets has 3 entries": lambda t: t.__setitem__("block_offsets", t["block_offsets"][:3]),
}


@pytest.mark.parametrize("problem", list(BLOCK_CORRUPTIONS))
def test_corrupted_block_and_local_offsets_are_rejected(problem):
    tensors, meta = _multi_block_state()
    assert meta["rows_per_block"] == 512 and meta["schema"] == STATE_SCHEMA
    RaggedEmbedding.from_state_tensors(tensors, meta)  # intact: fine
    BLOCK_CORRUPTIONS[problem](tensors)
    with pytest.raises(ValueError, match=problem):
        RaggedEmbedding.from_state_tensors(tensors, meta)


def test_compiled_op_refuses_corrupt_storage_passed_straight_to_it():
    """Storage that skipped validation cannot make the op read out of bounds: it raises instead."""
    _native_or_skip()
    emb = RaggedEmbedding.from_dense(torch.randn(10, 4), torch.full((10,), 4))
    local = emb.local_offsets.clone()
    local[5] = -1  # 0xFFFF
    ops = _native.ops()
    with pytest.raises(ValueError, match="inconsistent with d_max"):
        ops.lookup(emb.values, emb.block_offsets, local, emb.rows_per_block, None, torch.tensor([4]), 4, "fp32")
    with pytest.raises(ValueError, match="block_offsets must be"):
        ops.lookup(emb.values, emb.block_offsets[:0], local, emb.rows_per_block, None, torch.tensor([4]), 4, "fp32")
    with pytest.raises(ValueError, match="power of two"):
        ops.pooled(emb.values, emb.block_offsets, emb.local_offsets, 3, None, torch.tensor([4]), torch.tensor([0]),
                   4, "fp32", "sum", False)


def test_corrupted_fp32_and_int4_payloads_are_rejected():
    tensors, meta = _state("fp32")
    tensors["values"][3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        RaggedEmbedding.from_state_tensors(tensors, meta)
    tensors, meta = _state("fp32")
    tensors["extra"] = torch.zeros(1)
    with pytest.raises(ValueError, match="exactly the tensors"):
        RaggedEmbedding.from_state_tensors(tensors, meta)
    weight, sizes = torch.randn(2, 3), torch.tensor([2, 1])  # 3 codes: the last byte has a spare nibble
    emb = RaggedEmbedding.from_dense(weight, sizes, "int4")
    tensors = {k: v.clone() for k, v in emb.state_tensors().items()}
    tensors["values"][-1] |= 0xF0
    with pytest.raises(ValueError, match="spare high nibble"):
        RaggedEmbedding.from_state_tensors(tensors, emb.meta())


def test_from_dense_rejects_bad_input():
    weight = torch.randn(3, 4)
    with pytest.raises(ValueError, match="sizes must lie in \\[0, 4\\]"):
        RaggedEmbedding.from_dense(weight, torch.tensor([1, 5, 2]))
    with pytest.raises(ValueError, match="integer tensor"):
        RaggedEmbedding.from_dense(weight, torch.tensor([1.0, 2.0, 2.0]))
    with pytest.raises(ValueError, match="shape \\[3\\]"):
        RaggedEmbedding.from_dense(weight, torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="dtype must be one of"):
        RaggedEmbedding.from_dense(weight, torch.tensor([1, 2, 2]), "bf16")
    weight[1, 3] = float("nan")
    RaggedEmbedding.from_dense(weight, torch.tensor([1, 3, 2]), "int4")  # NaN in a dropped column is never stored
    with pytest.raises(ValueError, match="weight row 1 has NaN"):
        RaggedEmbedding.from_dense(weight, torch.tensor([1, 4, 2]))


def test_dtype_casts_are_refused_device_moves_allowed():
    emb = RaggedEmbedding.from_dense(torch.randn(3, 4), torch.tensor([1, 2, 3]), "int8")
    with pytest.raises(TypeError, match="must stay"):
        emb.half()
    assert emb.to("cpu") is emb and emb.values.dtype == torch.uint8


# ---- speed (printed, not asserted) -----------------------------------------------------------------------------
def test_print_speed_against_dense_embedding_bag(one_torch_thread, capsys):
    """Batch 4096 on a 10^5 x 128 table, log-uniform sizes; the machine may be loaded, so nothing is asserted."""
    _native_or_skip()
    n, d, batch = 100_000, 128, 4096
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(n, d, generator=g)
    sizes = torch.exp(torch.rand(n, generator=g) * torch.log(torch.tensor(float(d)))).long().clamp(1, d)
    emb = RaggedEmbedding.from_dense(weight, sizes)
    dense = torch.nn.EmbeddingBag(n, d, mode="sum", _weight=weight)

    def median_ms(fn, reps: int) -> float:
        fn()
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[reps // 2] * 1e3

    lines = []
    with torch.no_grad():
        for pooling in (1, 20):
            ids = torch.randint(0, n, (batch * pooling,), generator=g)
            offsets = torch.arange(0, batch * pooling, pooling)
            t_dense = median_ms(lambda i=ids, o=offsets: dense(i, o), 15)
            emb.backend = "native"
            t_native = median_ms(lambda i=ids, o=offsets: emb.pooled(i, o), 15)
            emb.backend = "torch"
            t_torch = median_ms(lambda i=ids, o=offsets: emb.pooled(i, o), 3)
            lines.append(
                f"pooling {pooling:2d}: dense EmbeddingBag {t_dense:.3f} ms, ragged compiled {t_native:.3f} ms "
                f"({t_native / t_dense:.2f}x dense), pure torch {t_torch:.2f} ms ({t_torch / t_native:.0f}x compiled)"
            )
    with capsys.disabled():
        share = emb.ideal_bytes() / emb.dense_bytes()
        print(f"\n[ragged fp32, 1 thread, batch {batch}, {n} x {d} table, {share:.0%} of the dense bytes]")
        for line in lines:
            print("  " + line)
