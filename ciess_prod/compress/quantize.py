"""Row-wise asymmetric quantisation of ragged rows, and the 4-bit packing the ragged table stores.

Like FBGEMM's fused row-wise formats, every row gets its own scale and bias (value = code * scale + bias): int8
keeps them in fp32, int4 in fp16. Each row is quantised over its own first d_n values only, so the columns a plan
drops never widen a row's range. The bias is rounded down and the scale up to the stored precision, so the codes
0 .. 2^bits - 1 always span the row's [min, max] and every value's error stays within scale / 2 (plus fp32
rounding in ``code * scale + bias``) even with fp16 scale and bias.
"""

from __future__ import annotations

import torch

ROW_CHUNK = 1 << 16  # rows processed at once: bounds the [chunk, d_max] temporaries of a million-row table


def _round_toward(x: torch.Tensor, dtype: torch.dtype, up: bool) -> torch.Tensor:
    """float64 [n] -> dtype [n], the nearest representable value not below (up) or not above (down) x."""
    y = x.to(dtype)
    wrong = y.to(torch.float64) < x if up else y.to(torch.float64) > x
    target = torch.full_like(y, float("inf") if up else float("-inf"))
    return torch.where(wrong, torch.nextafter(y, target), y)


def ragged_values(weight: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """[N, d_max] x [N] -> [sum(sizes)]: each row's first sizes[n] values, rows concatenated in order (CSR values)."""
    parts = []
    columns = torch.arange(weight.shape[1], device=weight.device)
    for r0 in range(0, weight.shape[0], ROW_CHUNK):
        keep = columns < sizes[r0 : r0 + ROW_CHUNK, None]
        parts.append(weight[r0 : r0 + ROW_CHUNK][keep])
    if not parts:
        return weight.new_empty(0)
    return torch.cat(parts)


def quantize_rows(
    weight: torch.Tensor, sizes: torch.Tensor, bits: int, scale_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantises each row's first sizes[n] values of ``weight``.

    weight: float [N, d_max >= 1] (finite); sizes: int64 [N] in [0, d_max]; bits: 8 or 4; scale_dtype: float32 or
    float16.
    Returns (codes uint8 [sum(sizes)] in [0, 2^bits - 1], CSR order; scale_bias scale_dtype [N, 2]).
    Raises ValueError when a row's bias or scale overflows ``scale_dtype``. Rows of size 0 get scale 0, bias 0.
    """
    levels = (1 << bits) - 1
    columns = torch.arange(weight.shape[1], device=weight.device)
    codes, scale_bias = [], []
    for r0 in range(0, weight.shape[0], ROW_CHUNK):
        w = weight[r0 : r0 + ROW_CHUNK].to(torch.float64)
        keep = columns < sizes[r0 : r0 + ROW_CHUNK, None]
        empty = ~keep[:, 0]  # size-0 rows (d_max >= 1 is checked by the caller)
        lo = torch.where(keep, w, float("inf")).amin(1).masked_fill_(empty, 0.0)
        hi = torch.where(keep, w, float("-inf")).amax(1).masked_fill_(empty, 0.0)
        bias = _round_toward(lo, scale_dtype, up=False)
        scale = _round_toward((hi - bias.to(torch.float64)) / levels, scale_dtype, up=True)
        if not (torch.isfinite(bias).all() and torch.isfinite(scale).all()):
            bad = int((~(torch.isfinite(bias) & torch.isfinite(scale))).nonzero()[0, 0]) + r0
            raise ValueError(
                f"row {bad}: its value range does not fit a {scale_dtype} scale and bias for {bits}-bit quantisation"
            )
        s, b = scale.to(torch.float64)[:, None], bias.to(torch.float64)[:, None]
        q = torch.where(s > 0, torch.round((w - b) / torch.where(s > 0, s, 1.0)), 0.0).clamp_(0, levels)
        codes.append(q[keep].to(torch.uint8))
        scale_bias.append(torch.stack([scale, bias], dim=1))
    if not codes:
        return torch.empty(0, dtype=torch.uint8), torch.empty(0, 2, dtype=scale_dtype)
    return torch.cat(codes), torch.cat(scale_bias)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 [S] codes in [0, 15] -> uint8 [ceil(S / 2)]: code p in byte p // 2, low nibble first; a lone last code
    leaves the high nibble 0."""
    if codes.numel() % 2:
        codes = torch.cat([codes, codes.new_zeros(1)])
    pairs = codes.view(-1, 2)
    return pairs[:, 0] | (pairs[:, 1] << 4)


def unpack_int4(packed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """The codes at value positions (int64, any shape) of a packed buffer, as uint8 of the same shape."""
    byte = packed[positions >> 1]
    shift = ((positions & 1) << 2).to(torch.uint8)
    return (byte >> shift) & 15


def dequantize(codes: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """codes * scale + bias in fp32, rounded after the product and after the sum exactly like the compiled op."""
    return codes.to(torch.float32) * scale.to(torch.float32) + bias.to(torch.float32)
