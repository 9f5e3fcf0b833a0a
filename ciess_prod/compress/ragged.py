"""A ragged embedding table: each row stores only its first d_n values, so memory follows the dimension plan.

Layout (CSR, the fastest one measured in docs: dense speed at ~1.04x the ideal bytes): one flat value buffer with the
rows back to back, and N + 1 row offsets counted in values (``offsets[n + 1] - offsets[n] = d_n``; int32 whenever
sum(d_n) fits, else int64). The sizes are not stored: the offsets are them. Per dtype:

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
STATE_SCHEMA = "ciess-prod/ragged-embedding/v1"
INT32_MAX = 2**31 - 1


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


def _check_offsets(offsets: torch.Tensor, d_max: int) -> int:
    """Validates row offsets [N + 1] (int32/int64, 0 first, non-decreasing, steps <= d_max); returns sum(d_n)."""
    if not isinstance(offsets, torch.Tensor) or offsets.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"offsets must be an int32 or int64 tensor, got {getattr(offsets, 'dtype', type(offsets))}")
    if offsets.dim() != 1 or offsets.numel() < 1:
        raise ValueError(f"offsets must be 1-D with rows + 1 entries, got shape {list(offsets.shape)}")
    if int(offsets[0]) != 0:
        raise ValueError(f"offsets[0] must be 0, got {int(offsets[0])}")
    steps = torch.diff(offsets.to(torch.int64))
    if steps.numel() and int(steps.min()) < 0:
        row = int((steps < 0).nonzero()[0, 0])
        raise ValueError(
            f"offsets are not monotone: row {row} has offsets {int(offsets[row])} > {int(offsets[row + 1])}"
        )
    if steps.numel() and int(steps.max()) > d_max:
        row = int((steps > d_max).nonzero()[0, 0])
        raise ValueError(f"offsets give row {row} size {int(steps[row])}, more than d_max {d_max}")
    return int(offsets[-1])


def _stored_values(dtype: str, total: int) -> int:
    """Entries the value buffer holds for sum(d_n) = total values."""
    return (total + 1) // 2 if dtype == "int4" else total


class RaggedEmbedding(nn.Module):
    """N rows of up to d_max values, row n holding d_n (0 allowed); lookups give fp32 rows zero-padded to d_max."""

    def __init__(
        self,
        values: torch.Tensor,
        offsets: torch.Tensor,
        scale_bias: torch.Tensor | None,
        d_max: int,
        dtype: RaggedDtype = "fp32",
        backend: Backend = "auto",
    ) -> None:
        """Wraps storage in the layout of the module docstring, validating it (ValueError naming the problem).

        values: 1-D, dtype per ``FORMATS[dtype].values``; offsets: int32/int64 [N + 1]; scale_bias: [N, 2] of
        ``FORMATS[dtype].scale_bias`` for int8/int4, else None. Build tables with ``from_dense``; this constructor is
        for storage that already exists (``from_state_tensors``).
        """
        super().__init__()
        fmt = _format(dtype)
        if isinstance(d_max, bool) or not isinstance(d_max, int) or d_max < 1:
            raise ValueError(f"d_max must be an integer >= 1, got {d_max!r}")
        total = _check_offsets(offsets, d_max)
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
        rows = offsets.numel() - 1
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
        devices = {t.device for t in (values, offsets, scale_bias) if t is not None}
        if len(devices) != 1:
            raise ValueError(f"values, offsets and scale_bias must share one device, got {sorted(map(str, devices))}")

        self.d_max, self.num_rows, self.dtype, self.backend = d_max, rows, dtype, backend
        self.register_buffer("values", values.contiguous(), persistent=False)
        self.register_buffer("offsets", offsets.contiguous(), persistent=False)
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
        if int(offsets[-1]) <= INT32_MAX:
            offsets = offsets.to(torch.int32)
        return cls(values, offsets, scale_bias, d_max, dtype)

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

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """ids int64 [B] -> fp32 [B, d_max]: row ids[b]'s values, zero beyond its size. IndexError on a bad id."""
        ids = self._index(ids, "ids")
        return self._ops().lookup(self.values, self.offsets, self.scale_bias, ids, self.d_max, self.dtype)

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
        return self._ops().pooled(
            self.values, self.offsets, self.scale_bias, ids, offsets, self.d_max, self.dtype, mode, include_last_offset
        )

    def forward(self, ids: torch.Tensor, offsets: torch.Tensor | None = None) -> torch.Tensor:
        """``lookup(ids)`` without offsets, else sum-pooled ``pooled(ids, offsets)``."""
        return self.lookup(ids) if offsets is None else self.pooled(ids, offsets)

    def to_dense(self) -> torch.Tensor:
        """fp32 [N, d_max], dequantised and zero-padded: the masked dense table this one stands for."""
        return self.lookup(torch.arange(self.num_rows, device=self.values.device))

    @property
    def sizes(self) -> torch.Tensor:
        """int64 [N]: d_n of every row (the steps of the offsets)."""
        return torch.diff(self.offsets.to(torch.int64))

    # ---- memory ----------------------------------------------------------------------------------------------
    def nbytes(self) -> dict[str, int]:
        """Exact bytes of every buffer held: values ("payload"), row offsets, per-row scale/bias, and "padding"
        (bytes holding no value; none in this layout: the one spare int4 nibble a table can have is part of the
        payload's last byte, which ``ideal_bytes`` counts too)."""
        parts = {
            "payload": self.values.numel() * self.values.element_size(),
            "offsets": self.offsets.numel() * self.offsets.element_size(),
            "scales": 0 if self.scale_bias is None else self.scale_bias.numel() * self.scale_bias.element_size(),
            "padding": 0,
        }
        parts["total"] = sum(parts.values())
        return parts

    def ideal_bytes(self) -> int:
        """sum(d_n) values at the dtype's width, in whole bytes: the floor any layout of this dtype pays."""
        return (int(self.offsets[-1]) * FORMATS[self.dtype].bits + 7) // 8

    def dense_bytes(self) -> int:
        """N * d_max * 4: the fp32 dense table this one replaces."""
        return self.num_rows * self.d_max * 4

    # ---- persistence -----------------------------------------------------------------------------------------
    def meta(self) -> dict[str, Any]:
        """JSON-able facts to store next to ``state_tensors`` (e.g. as safetensors metadata)."""
        return {"schema": STATE_SCHEMA, "dtype": self.dtype, "d_max": self.d_max, "num_rows": self.num_rows}

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Plain tensors, no pickle: values, offsets and, for int8/int4, scale_bias. Rebuild with from_state_tensors."""
        out = {"values": self.values, "offsets": self.offsets}
        if self.scale_bias is not None:
            out["scale_bias"] = self.scale_bias
        return out

    @classmethod
    def from_state_tensors(cls, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> RaggedEmbedding:
        """Rebuilds a table from ``state_tensors()`` and ``meta()``, validating everything (ValueError naming the
        problem: schema, missing or extra tensors, dtypes, shapes, offsets not monotone or not matching sizes)."""
        if not isinstance(meta, Mapping) or set(meta) != {"schema", "dtype", "d_max", "num_rows"}:
            raise ValueError(f"meta must hold schema, dtype, d_max and num_rows, got {meta!r}")
        if meta["schema"] != STATE_SCHEMA:
            raise ValueError(f"meta schema {meta['schema']!r} is not {STATE_SCHEMA!r}")
        dtype = meta["dtype"]
        fmt = _format(dtype)
        expected = {"values", "offsets"} | ({"scale_bias"} if fmt.scale_bias is not None else set())
        if not isinstance(tensors, Mapping) or set(tensors) != expected:
            found = sorted(tensors) if isinstance(tensors, Mapping) else type(tensors).__name__
            raise ValueError(f"{dtype} state needs exactly the tensors {sorted(expected)}, got {found}")
        num_rows = meta["num_rows"]
        if isinstance(num_rows, bool) or not isinstance(num_rows, int) or num_rows < 0:
            raise ValueError(f"meta num_rows must be an integer >= 0, got {num_rows!r}")
        offsets = tensors["offsets"]
        if isinstance(offsets, torch.Tensor) and offsets.dim() == 1 and offsets.numel() != num_rows + 1:
            raise ValueError(
                f"offsets has {offsets.numel()} entries, meta says {num_rows} rows (expected {num_rows + 1})"
            )
        return cls(tensors["values"], offsets, tensors.get("scale_bias"), meta["d_max"], dtype)

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
        return f"num_rows={self.num_rows}, d_max={self.d_max}, dtype={self.dtype!r}, sum_sizes={int(self.offsets[-1])}"


def _row_of(offsets: torch.Tensor, bad: torch.Tensor) -> int:
    """The row holding the first True of a per-value mask [S], given int64 offsets [N + 1]."""
    position = int(bad.nonzero()[0, 0])
    return int(torch.searchsorted(offsets, position, right=True)) - 1
