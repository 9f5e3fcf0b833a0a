"""Pure-torch ragged lookups: the fallback when the compiled op cannot be built, and its reference in tests.

Same arguments and results as ``torch.ops.ciess_ragged.lookup`` / ``pooled`` (see ``ragged_kernels.cpp`` for the
storage layout), vectorised with index arithmetic: every looked-up row is gathered as a zero-padded [B, d_max]
block. Pooling then runs ``embedding_bag`` over those rows, so sums keep embedding_bag's summation order and match
a dense masked table bit for bit. Works on any device; 30-80x slower than the compiled op on CPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ciess_prod.compress.quantize import dequantize, unpack_int4


def check_ids(ids: torch.Tensor, rows: int) -> None:
    """Raises IndexError when an id lies outside [0, rows), like the compiled op."""
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= rows):
        bad = int(((ids < 0) | (ids >= rows)).nonzero()[0, 0])
        raise IndexError(f"ids[{bad}] = {int(ids[bad])} is out of range for a table of {rows} rows")


def check_bag_offsets(offsets: torch.Tensor, n_ids: int, include_last_offset: bool) -> None:
    """Raises ValueError unless offsets start at 0, never decrease and stay within [0, n_ids], like the compiled op."""
    if offsets.dim() != 1:
        raise ValueError(f"offsets must be 1-D, got shape {list(offsets.shape)}")
    if include_last_offset and offsets.numel() == 0:
        raise ValueError("include_last_offset needs at least one offset")
    if offsets.numel() == 0:
        return
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    if bool((offsets[1:] < offsets[:-1]).any()) or int(offsets[-1]) > n_ids:
        raise ValueError(f"offsets must be non-decreasing and within [0, {n_ids}]")


def offsets_at(
    block_offsets: torch.Tensor, local_offsets: torch.Tensor, rows_per_block: int, rows: torch.Tensor
) -> torch.Tensor:
    """int64 row offsets at ``rows`` (int64 in [0, N]): block_offsets[row >> k] + local_offsets[row] read as uint16,
    with rows_per_block = 2^k."""
    shift = rows_per_block.bit_length() - 1
    return block_offsets[rows >> shift] + (local_offsets[rows].to(torch.int32) & 0xFFFF)


def lookup(
    values: torch.Tensor,
    block_offsets: torch.Tensor,
    local_offsets: torch.Tensor,
    rows_per_block: int,
    scale_bias: torch.Tensor | None,
    ids: torch.Tensor,
    d_max: int,
    dtype: str,
) -> torch.Tensor:
    """ids int64 [B] -> fp32 [B, d_max], row ids[b]'s stored values then zeros."""
    rows = local_offsets.numel() - 1
    check_ids(ids, rows)
    start = offsets_at(block_offsets, local_offsets, rows_per_block, ids)
    length = offsets_at(block_offsets, local_offsets, rows_per_block, ids + 1) - start
    columns = torch.arange(d_max, device=ids.device)
    keep = columns < length[:, None]  # [B, d_max]
    out = torch.zeros(ids.numel(), d_max, dtype=torch.float32, device=ids.device)
    if values.numel() == 0:
        return out
    positions = torch.where(keep, start[:, None] + columns, 0)  # position 0 exists: masked out below
    if dtype == "fp32":
        decoded = values[positions]
    elif dtype == "fp16":
        decoded = values[positions].to(torch.float32)
    elif dtype in ("int8", "int4"):
        if scale_bias is None:
            raise ValueError(f"{dtype} needs scale_bias")
        codes = values[positions] if dtype == "int8" else unpack_int4(values, positions)
        sb = scale_bias[ids]
        decoded = dequantize(codes, sb[:, :1], sb[:, 1:])
    else:
        raise ValueError(f"unknown ragged dtype {dtype!r}; expected fp32, fp16, int8 or int4")
    return torch.where(keep, decoded, out)


def pooled(
    values: torch.Tensor,
    block_offsets: torch.Tensor,
    local_offsets: torch.Tensor,
    rows_per_block: int,
    scale_bias: torch.Tensor | None,
    ids: torch.Tensor,
    bag_offsets: torch.Tensor,
    d_max: int,
    dtype: str,
    mode: str,
    include_last_offset: bool,
) -> torch.Tensor:
    """EmbeddingBag over the ragged rows: fp32 [num_bags, d_max]; empty bags give zeros."""
    if mode not in ("sum", "mean"):
        raise ValueError(f"mode must be 'sum' or 'mean', got {mode!r}")
    check_bag_offsets(bag_offsets, ids.numel(), include_last_offset)
    n_bags = bag_offsets.numel() - 1 if include_last_offset else bag_offsets.numel()
    if n_bags == 0:
        return torch.zeros(0, d_max, dtype=torch.float32, device=ids.device)
    # [n_ids, d_max], one row per id, in order
    rows = lookup(values, block_offsets, local_offsets, rows_per_block, scale_bias, ids, d_max, dtype)
    positions = torch.arange(ids.numel(), device=ids.device)
    return F.embedding_bag(positions, rows, bag_offsets, mode=mode, include_last_offset=include_last_offset)
