"""A ragged embedding table: each row stores only its first d_n values, so memory follows the dimension plan.

Layout (CSR, the fastest one measured in docs: dense speed): one flat value buffer with the rows back to back, and
the N + 1 row offsets counted in values (``offsets[n + 1] - offsets[n] = d_n``), stored in two levels so that a row
costs about 2 bytes of offsets instead of 4 (int32) or 8 (int64):

    block_offsets  int64 [ceil((N + 1) / R)]   offsets[b * R], one per block of R rows
    local_offsets  int16 [N + 1]               offsets[n] - block_offsets[n >> k], a uint16 bit pattern

with R = 2^k the largest power of two with (R - 1) * d_max <= 65535 (capped at 2^16; d_max 128 -> R = 512), so a
local offset always fits 16 bits, and offset(n) = block_offsets[n >> k] + (local_offsets[n] & 0xFFFF). The int16
tensor holds the uint16 bits because torch.uint16 lacks most ops; readers reinterpret it (C++ ``uint16_t``, torch
``& 0xFFFF`` after widening, ONNX a uint16 initializer). The sizes are not stored: the offsets are them, and
``offsets`` / ``sizes`` are computed when asked for. Measured overhead over the ideal bytes for fp32 with
d_max 128 and 10^5 rows: 1.079x at mean size 6.4 (95% sparsity; 1.156x with int32 offsets), 1.016x at mean size 32.
Per dtype:

    fp32  values float32 [S]                     fp16  values float16 [S]
    int8  values uint8 [S] codes, scale_bias float32 [N, 2]     (FBGEMM's fused 8-bit row-wise precision)
    int4  values uint8 [ceil(S / 2)], two codes per byte, scale_bias float16 [N, 2]   (as FBGEMM's 4-bit)

with S = sum(d_n) and value = code * scale + bias. int4 codes run on across row boundaries (value p sits in byte
p // 2, low nibble first), so only the table's last byte can hold a spare nibble and the offsets stay in values for
every dtype. Lookups return fp32 rows zero-padded to d_max, the same rows a dense masked table gives; they run in
the compiled op of ``_native`` and fall back to ``ragged_torch`` (same results) when it cannot be built.
Inference only: no autograd through the stored values.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from ciess_prod.compress import _native, ragged_torch
from ciess_prod.compress.quantize import pack_int4, quantize_rows, ragged_values

RaggedDtype = Literal["fp32", "fp16", "int8", "int4"]
Backend = Literal["auto", "native", "torch"]
STATE_SCHEMA = "ciess-prod/ragged-embedding/v2"
LOCAL_MAX = 0xFFFF  # the largest local offset (uint16)
MAX_ROWS_PER_BLOCK = 1 << 16  # R's cap (d_max 1 would allow 2^16 anyway; keeps block_offsets meaningful)


@dataclass(frozen=True)
class _Format:
    values: torch.dtype  # dtype of the value buffer
    scale_bias: torch.dtype | None  # dtype of the per-row [scale, bias], None when not quantised
    bits: int  # bits per stored value


FORMATS: dict[str, _Format] = {
    "fp32": _Format(torch.float32, None, 32),
    "fp16": _Format(torch.float16, None, 16),
    "int8": _Format(torch.uint8, torch.float32, 8),
    "int4": _Format(torch.uint8, torch.float16, 4),
}


def _format(dtype: str) -> _Format:
    if dtype not in FORMATS:
        raise ValueError(f"dtype must be one of {sorted(FORMATS)}, got {dtype!r}")
    return FORMATS[dtype]


def _check_d_max(d_max: Any) -> int:
    if isinstance(d_max, bool) or not isinstance(d_max, int) or d_max < 1:
        raise ValueError(f"d_max must be an integer >= 1, got {d_max!r}")
    return d_max


def rows_per_block(d_max: int) -> int:
    """R = 2^k, the largest power of two with (R - 1) * d_max <= 65535, at most 2^16: the rows sharing one block
    offset, so that every local offset of a block (at most (R - 1) * d_max) fits 16 bits."""
    r = 1
    while r < MAX_ROWS_PER_BLOCK and (2 * r - 1) * d_max <= LOCAL_MAX:
        r *= 2
    return r


def encode_offsets(offsets: torch.Tensor, d_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Row offsets (integer [N + 1], steps in [0, d_max]) -> (block_offsets int64 [ceil((N + 1) / R)],
    local_offsets int16 [N + 1] holding uint16 bits), R = rows_per_block(d_max)."""
    r = rows_per_block(d_max)
    offsets = offsets.to(torch.int64)
    block = offsets[::r].contiguous()
    local = offsets - block.repeat_interleave(r)[: offsets.numel()]
    if local.numel() and (int(local.min()) < 0 or int(local.max()) > LOCAL_MAX):
        raise ValueError(f"offsets have steps outside [0, {d_max}]: local offsets do not fit 16 bits")
    return block, torch.where(local > 0x7FFF, local - 0x10000, local).to(torch.int16)


def decode_offsets(block_offsets: torch.Tensor, local_offsets: torch.Tensor, rows_per_block: int) -> torch.Tensor:
    """The row offsets int64 [N + 1] that ``block_offsets`` and ``local_offsets`` (shapes already checked) store."""
    n = local_offsets.numel()
    return block_offsets.repeat_interleave(rows_per_block)[:n] + (local_offsets.to(torch.int64) & LOCAL_MAX)


def _check_offsets(offsets: torch.Tensor, d_max: int) -> int:
    """Validates row offsets int64 [N + 1] (0 first, non-decreasing, steps <= d_max); returns sum(d_n)."""
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    steps = torch.diff(offsets)
    if steps.numel() and int(steps.min()) < 0:
        row = int((steps < 0).nonzero()[0, 0])
        raise ValueError(
            f"offsets are not monotone: row {row} has offsets {int(offsets[row])} > {int(offsets[row + 1])}"
        )
    if steps.numel() and int(steps.max()) > d_max:
        row = int((steps > d_max).nonzero()[0, 0])
        raise ValueError(f"offsets give row {row} size {int(steps[row])}, more than d_max {d_max}")
    return int(offsets[-1])


def _check_block_storage(block_offsets: torch.Tensor, local_offsets: torch.Tensor, d_max: int) -> int:
    """Validates the two-level offsets (dtypes, shapes, each block's first local offset 0, the offsets they give
    monotone from 0 with steps <= d_max); returns sum(d_n)."""
    r = rows_per_block(d_max)
    if not isinstance(local_offsets, torch.Tensor) or local_offsets.dtype != torch.int16 or local_offsets.dim() != 1:
        got = getattr(local_offsets, "dtype", type(local_offsets).__name__)
        raise ValueError(f"local_offsets must be a 1-D torch.int16 tensor (uint16 bits), got {got}")
    if local_offsets.numel() < 1:
        raise ValueError("local_offsets must have rows + 1 entries, got none")
    n_blocks = (local_offsets.numel() - 1 + r) // r  # ceil((N + 1) / R)
    if not isinstance(block_offsets, torch.Tensor) or block_offsets.dtype != torch.int64 or block_offsets.dim() != 1:
        got = getattr(block_offsets, "dtype", type(block_offsets).__name__)
        raise ValueError(f"block_offsets must be a 1-D torch.int64 tensor, got {got}")
    if block_offsets.numel() != n_blocks:
        raise ValueError(
            f"block_offsets has {block_offsets.numel()} entries; {local_offsets.numel() - 1} rows in blocks of "
            f"{r} rows (d_max {d_max}) need {n_blocks}"
        )
    if block_offsets.device != local_offsets.device:
        raise ValueError("block_offsets and local_offsets must share one device")
    firsts = local_offsets[::r]
    if bool((firsts != 0).any()):
        b = int((firsts != 0).nonzero()[0, 0])
        raise ValueError(
            f"local_offsets[{b * r}], the first of block {b}, must be 0, got {int(firsts[b]) & LOCAL_MAX}"
        )
    return _check_offsets(decode_offsets(block_offsets, local_offsets, r), d_max)


def _stored_values(dtype: str, total: int) -> int:
    """Entries the value buffer holds for sum(d_n) = total values."""
    return (total + 1) // 2 if dtype == "int4" else total


class RaggedEmbedding(nn.Module):
    """N rows of up to d_max values, row n holding d_n (0 allowed); lookups give fp32 rows zero-padded to d_max."""

    def __init__(
        self,
        values: torch.Tensor,
        block_offsets: torch.Tensor,
        local_offsets: torch.Tensor,
        scale_bias: torch.Tensor | None,
        d_max: int,
        dtype: RaggedDtype = "fp32",
        backend: Backend = "auto",
    ) -> None:
        """Wraps storage in the layout of the module docstring, validating it (ValueError naming the problem).

        values: 1-D, dtype per ``FORMATS[dtype].values``; block_offsets: int64 [ceil((N + 1) / R)] and
        local_offsets: int16 (uint16 bits) [N + 1] with R = ``rows_per_block(d_max)`` (``encode_offsets`` makes
        them from row offsets); scale_bias: [N, 2] of ``FORMATS[dtype].scale_bias`` for int8/int4, else None.
        Build tables with ``from_dense``; this constructor is for storage that already exists
        (``from_state_tensors``).
        """
        super().__init__()
        fmt = _format(dtype)
        _check_d_max(d_max)
        total = _check_block_storage(block_offsets, local_offsets, d_max)
        if not isinstance(values, torch.Tensor) or values.dtype != fmt.values or values.dim() != 1:
            got = f"{values.dtype} {list(values.shape)}" if isinstance(values, torch.Tensor) else type(values).__name__
            raise ValueError(f"{dtype} values must be a 1-D {fmt.values} tensor, got {got}")
        if values.numel() != _stored_values(dtype, total):
            raise ValueError(
                f"values holds {values.numel()} entries but the offsets describe {total} {dtype} values "
                f"({_stored_values(dtype, total)} entries)"
            )
        if values.dtype.is_floating_point and not bool(torch.isfinite(values).all()):
            raise ValueError("values contain NaN or infinity")
        if dtype == "int4" and total % 2 and int(values[-1]) >> 4:
            raise ValueError("int4 values: the spare high nibble of the last byte must be 0")
        rows = local_offsets.numel() - 1
        if fmt.scale_bias is None:
            if scale_bias is not None:
                raise ValueError(f"{dtype} tables take no scale_bias")
        else:
            if not isinstance(scale_bias, torch.Tensor) or scale_bias.dtype != fmt.scale_bias:
                got = getattr(scale_bias, "dtype", type(scale_bias).__name__)
                raise ValueError(f"{dtype} scale_bias must be a {fmt.scale_bias} tensor, got {got}")
            if list(scale_bias.shape) != [rows, 2]:
                raise ValueError(f"scale_bias must have shape [{rows}, 2], got {list(scale_bias.shape)}")
            if not bool(torch.isfinite(scale_bias).all()) or (rows and float(scale_bias[:, 0].min()) < 0):
                raise ValueError("scale_bias must be finite with non-negative scales")
        devices = {t.device for t in (values, block_offsets, local_offsets, scale_bias) if t is not None}
        if len(devices) != 1:
            raise ValueError(
                f"values, block_offsets, local_offsets and scale_bias must share one device, got "
                f"{sorted(map(str, devices))}"
            )

        self.d_max, self.num_rows, self.dtype, self.backend = d_max, rows, dtype, backend
        self.rows_per_block, self.total_values = rows_per_block(d_max), total
        self.register_buffer("values", values.contiguous(), persistent=False)
        self.register_buffer("block_offsets", block_offsets.contiguous(), persistent=False)
        self.register_buffer("local_offsets", local_offsets.contiguous(), persistent=False)
        self.register_buffer("scale_bias", None if scale_bias is None else scale_bias.contiguous(), persistent=False)

    # ---- construction ----------------------------------------------------------------------------------------
    @classmethod
    def from_dense(cls, weight: torch.Tensor, sizes: torch.Tensor, dtype: RaggedDtype = "fp32") -> RaggedEmbedding:
        """Keeps row n's first sizes[n] values of ``weight`` (float [N, d_max], read as fp32) in ``dtype``.

        sizes: integer [N] in [0, d_max]. Raises ValueError on bad shapes or sizes, on NaN/inf among the kept
        values, and on values fp16 (or an int4 row's fp16 scale and bias) cannot represent.
        """
        fmt = _format(dtype)
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.dtype.is_floating_point:
            raise ValueError(f"weight must be a 2-D floating tensor [N, d_max], got {getattr(weight, 'shape', weight)}")
        n_rows, d_max = weight.shape
        if d_max < 1:
            raise ValueError("weight must have at least one column")
        sizes = torch.as_tensor(sizes)
        if sizes.dtype.is_floating_point or sizes.dtype.is_complex or sizes.dtype == torch.bool:
            raise ValueError(f"sizes must be an integer tensor, got {sizes.dtype}")
        if sizes.dim() != 1 or sizes.numel() != n_rows:
            raise ValueError(f"sizes must have shape [{n_rows}], got {list(sizes.shape)}")
        sizes = sizes.to(device=weight.device, dtype=torch.int64)
        if n_rows and (int(sizes.min()) < 0 or int(sizes.max()) > d_max):
            raise ValueError(f"sizes must lie in [0, {d_max}], got [{int(sizes.min())}, {int(sizes.max())}]")

        weight = weight.detach().to(torch.float32)
        offsets = torch.zeros(n_rows + 1, dtype=torch.int64, device=weight.device)
        torch.cumsum(sizes, 0, out=offsets[1:])
        flat = ragged_values(weight, sizes)  # fp32 [S]
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"weight row {_row_of(offsets, ~torch.isfinite(flat))} has NaN or infinite values")
        scale_bias = None
        if dtype == "fp32":
            values = flat
        elif dtype == "fp16":
            values = flat.to(torch.float16)
            if not bool(torch.isfinite(values).all()):
                raise ValueError(f"weight row {_row_of(offsets, ~torch.isfinite(values))} exceeds the fp16 range")
        else:
            assert fmt.scale_bias is not None
            codes, scale_bias = quantize_rows(weight, sizes, fmt.bits, fmt.scale_bias)
            values = pack_int4(codes) if dtype == "int4" else codes
        block_offsets, local_offsets = encode_offsets(offsets, d_max)
        return cls(values, block_offsets, local_offsets, scale_bias, d_max, dtype)

    # ---- lookups ---------------------------------------------------------------------------------------------
    def _ops(self) -> Any:
        """The compiled op namespace, or the pure-torch module with the same functions."""
        if self.backend not in ("auto", "native", "torch"):
            raise ValueError(f"backend must be 'auto', 'native' or 'torch', got {self.backend!r}")
        if self.backend == "torch" or self.values.device.type != "cpu":
            return ragged_torch
        native = _native.ops()
        if native is None:
            if self.backend == "native":
                raise RuntimeError(f"the compiled ragged op is unavailable: {_native.error()}")
            return ragged_torch
        return native

    @staticmethod
    def _index(t: torch.Tensor, name: str) -> torch.Tensor:
        if not isinstance(t, torch.Tensor) or t.dim() != 1 or t.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{name} must be a 1-D int64 (or int32) tensor, got {getattr(t, 'dtype', type(t))}")
        return t.to(torch.int64).contiguous()

    def _storage(self) -> tuple[Any, ...]:
        """The ops' leading arguments: values, block_offsets, local_offsets, rows_per_block, scale_bias."""
        return self.values, self.block_offsets, self.local_offsets, self.rows_per_block, self.scale_bias

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [B] -> fp32 [B, d_max]: row ids[b]'s values, zero beyond its size. IndexError on a bad id."""
        ids = self._index(ids, "ids")
        return self._ops().lookup(*self._storage(), ids, self.d_max, self.dtype)

    def pooled(
        self,
        ids: torch.Tensor,
        offsets: torch.Tensor,
        mode: Literal["sum", "mean"] = "sum",
        include_last_offset: bool = False,
    ) -> torch.Tensor:
        """nn.EmbeddingBag semantics: bag b pools ids[offsets[b]:offsets[b + 1]] -> fp32 [num_bags, d_max].

        offsets: int64 [num_bags] (the last bag runs to the end of ids) or [num_bags + 1] with include_last_offset.
        Sums follow embedding_bag's order (bit-identical to it on the masked dense table); empty bags give zeros.
        """
        ids, offsets = self._index(ids, "ids"), self._index(offsets, "offsets")
        return self._ops().pooled(*self._storage(), ids, offsets, self.d_max, self.dtype, mode, include_last_offset)

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``lookup(ids)`` without offsets, else sum-pooled ``pooled(ids, offsets)``."""
        return self.lookup(ids) if offsets is None else self.pooled(ids, offsets)

    def to_dense(self) -> torch.Tensor:
        """fp32 [N, d_max], dequantised and zero-padded: the masked dense table this one stands for."""
        return self.lookup(torch.arange(self.num_rows, device=self.values.device))

    @property
    def offsets(self) -> torch.Tensor:
        """int64 [N + 1]: the row offsets in values (computed from the block and local offsets; not stored)."""
        return decode_offsets(self.block_offsets, self.local_offsets, self.rows_per_block)

    @property
    def sizes(self) -> torch.Tensor:
        """int64 [N]: d_n of every row (the steps of the offsets)."""
        return torch.diff(self.offsets)

    # ---- memory ----------------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Exact bytes of every buffer held: values ("payload"), row offsets ("offsets": block_offsets plus
        local_offsets), per-row scale/bias, and "padding" (bytes holding no value; none in this layout: the one spare
        int4 nibble a table can have is part of the payload's last byte, which ``ideal_bytes`` counts too)."""
        parts = {
            "payload": self.values.numel() * self.values.element_size(),
            "offsets": sum(t.numel() * t.element_size() for t in (self.block_offsets, self.local_offsets)),
            "scales": 0 if self.scale_bias is None else self.scale_bias.numel() * self.scale_bias.element_size(),
            "padding": 0,
        }
        parts["total"] = sum(parts.values())
        return parts

    def ideal_bytes(self) -> int:
        """sum(d_n) values at the dtype's width, in whole bytes: the floor any layout of this dtype pays."""
        return (self.total_values * FORMATS[self.dtype].bits + 7) // 8

    def dense_bytes(self) -> int:
        """N * d_max * 4: the fp32 dense table this one replaces."""
        return self.num_rows * self.d_max * 4

    # ---- persistence -----------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """JSON-able facts to store next to ``state_tensors`` (e.g. as safetensors metadata)."""
        return {
            "schema": STATE_SCHEMA,
            "dtype": self.dtype,
            "d_max": self.d_max,
            "num_rows": self.num_rows,
            "rows_per_block": self.rows_per_block,
        }

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Plain tensors, no pickle: values, block_offsets, local_offsets and, for int8/int4, scale_bias. Rebuild
        with from_state_tensors."""
        out = {"values": self.values, "block_offsets": self.block_offsets, "local_offsets": self.local_offsets}
        if self.scale_bias is not None:
            out["scale_bias"] = self.scale_bias
        return out

    @classmethod
    def from_state_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> RaggedEmbedding:
        """Rebuilds a table from ``state_tensors()`` and ``meta()``, validating everything (ValueError naming the
        problem: schema, missing or extra tensors, dtypes, shapes, rows_per_block not the one of d_max, block and
        local offsets inconsistent, offsets not monotone or not matching the values)."""
        keys = {"schema", "dtype", "d_max", "num_rows", "rows_per_block"}
        if not isinstance(meta, Mapping) or set(meta) != keys:
            raise ValueError(f"meta must hold exactly {sorted(keys)}, got {meta!r}")
        if meta["schema"] != STATE_SCHEMA:
            raise ValueError(f"meta schema {meta['schema']!r} is not {STATE_SCHEMA!r}")
        dtype = meta["dtype"]
        fmt = _format(dtype)
        expected = {"values", "block_offsets", "local_offsets"}
        if fmt.scale_bias is not None:
            expected.add("scale_bias")
        if not isinstance(tensors, Mapping) or set(tensors) != expected:
            found = sorted(tensors) if isinstance(tensors, Mapping) else type(tensors).__name__
            raise ValueError(f"{dtype} state needs exactly the tensors {sorted(expected)}, got {found}")
        num_rows = meta["num_rows"]
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"meta num_rows must be an integer >= 0, got {num_rows!r}")
        d_max = _check_d_max(meta["d_max"])
        if meta["rows_per_block"] != rows_per_block(d_max):
            raise ValueError(
                f"meta rows_per_block {meta['rows_per_block']!r} does not match d_max {d_max} "
                f"(expected {rows_per_block(d_max)})"
            )
        local = tensors["local_offsets"]
        if isinstance(local, torch.Tensor) and local.dim() == 1 and local.numel() != num_rows + 1:
            raise ValueError(
                f"local_offsets has {local.numel()} entries, meta says {num_rows} rows (expected {num_rows + 1})"
            )
        return cls(tensors["values"], tensors["block_offsets"], local, tensors.get("scale_bias"), d_max, dtype)

    # ---- nn.Module plumbing ----------------------------------------------------------------------------------
    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> RaggedEmbedding:
        """Allows device moves only: .half()/.double() would silently change the stored format."""
        for name, t in self.state_tensors().items():
            if fn(torch.empty(0, dtype=t.dtype, device=t.device)).dtype != t.dtype:
                raise TypeError(
                    f"RaggedEmbedding {name} must stay {t.dtype}; build another dtype with from_dense(..., dtype=...)"
                )
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (
            f"num_rows={self.num_rows}, d_max={self.d_max}, dtype={self.dtype!r}, sum_sizes={self.total_values}, "
            f"rows_per_block={self.rows_per_block}"
        )


def _row_of(offsets: torch.Tensor, bad: torch.Tensor) -> int:
    """The row holding the first True of a per-value mask [S], given int64 offsets [N + 1]."""
    position = int(bad.nonzero()[0, 0])
    return int(torch.searchsorted(offsets, position, right=True)) - 1
