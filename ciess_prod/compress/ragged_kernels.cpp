// Ragged (CSR) embedding lookups for ciess_prod.compress.ragged.RaggedEmbedding.
//
// A table stores only each row's first d_n values: one flat value buffer plus N+1 row offsets counted in values
// (offsets[n+1] - offsets[n] = d_n), stored in two levels: rows are grouped in blocks of R = 2^k rows (R chosen so
// that (R-1) * d_max <= 65535), and offset(n) = block_offsets[n >> k] (int64, one per block) + local_offsets[n]
// (uint16 bits in an int16 tensor). The block offsets are small (16 KB for 10^6 rows at d_max 128) and stay in
// cache, so this costs one extra cached load and add per id over plain offsets, for half their bytes. Outputs are
// fp32 [*, d_max], zero beyond each row's size. Pure-torch gathers over this layout cost 5-15 ms at batch 4096; a
// plain loop with prefetch runs at dense-table speed because the bottleneck is the random row access, not arithmetic.
//
// Summation order matches torch.nn.functional.embedding_bag on CPU (fbgemm): per bag, start from +0 and add rows
// in index order; mean divides the sum by the bag length. Built with -ffp-contract=off so that dequantisation
// (q * scale + bias) rounds twice, exactly like the pure-torch fallback.
//
// Storage per dtype ("kind"):
//   fp32: values float32 [S]                    fp16: values float16 [S]
//   int8: values uint8 [S], scale_bias float32 [N, 2]
//   int4: values uint8 [ceil(S/2)], value p in byte p/2 (low nibble first), scale_bias float16 [N, 2]
// where S = sum(d_n); value = code * scale + bias for the quantised kinds.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cstdint>
#include <cstring>
#include <optional>
#include <string_view>

namespace {

enum class Kind { kF32, kF16, kI8, kI4 };

// fp16 -> fp32 is exact either way; with F16C (built with -march=native) GCC vectorises _Float16 conversions,
// while c10::Half converts one value at a time with bit arithmetic (about 3x slower when pooling 20 rows).
#if defined(__F16C__)
using Fp16 = _Float16;
#else
using Fp16 = c10::Half;
#endif
static_assert(sizeof(Fp16) == 2);

constexpr int64_t kPrefetchAhead = 8;  // rows prefetched ahead of the one being read
constexpr int64_t kCacheLine = 64;
constexpr int64_t kLookupGrain = 256;  // output rows per parallel task
constexpr int64_t kPooledGrain = 64;   // bags per parallel task

Kind parse_kind(std::string_view kind) {
  if (kind == "fp32") return Kind::kF32;
  if (kind == "fp16") return Kind::kF16;
  if (kind == "int8") return Kind::kI8;
  if (kind == "int4") return Kind::kI4;
  TORCH_CHECK_VALUE(false, "unknown ragged dtype '", kind, "'; expected fp32, fp16, int8 or int4");
}

// One table's raw pointers; decodes a row's values into an fp32 output row, copying or adding.
template <Kind K>
struct Table {
  const uint8_t* values;          // raw bytes of the value buffer
  const int64_t* block_offsets;   // [ceil((rows + 1) / R)]: offsets[b * R]
  const uint16_t* local_offsets;  // [rows + 1]: offsets[n] - block_offsets[n >> block_shift]
  const void* scale_bias;         // [rows, 2] float (int8) or Half (int4); unused otherwise
  int64_t rows;
  int64_t n_values;               // values the buffer holds (2 per byte for int4)
  int64_t d_max;
  int block_shift;                // k, R = 2^k

  static constexpr int64_t kValueBytes = K == Kind::kF32 ? 4 : K == Kind::kF16 ? 2 : 1;

  // offsets[n] for n in [0, rows]
  inline int64_t offset(int64_t n) const { return block_offsets[n >> block_shift] + local_offsets[n]; }

  // The prefetch helpers must be always_inline: as separate functions GCC finds them "looping pure" (a prefetch has
  // no visible effect) and deletes every call to them, which silently removed all prefetching (measured: 25-40%
  // slower lookups at batch 4096).
  [[gnu::always_inline]] inline void prefetch_offset(int64_t id) const {
    if (id >= 0 && id < rows) __builtin_prefetch(local_offsets + id, 0, 3);
  }

  [[gnu::always_inline]] inline void prefetch_row(int64_t id) const {
    if (id < 0 || id >= rows) return;
    // The local step is the row's length except for a block's last row (then negative: no prefetch), one block
    // offset load cheaper than offset(id + 1) - start; a prefetch is only a hint.
    const int64_t start = offset(id);
    const int64_t len = static_cast<int64_t>(local_offsets[id + 1]) - local_offsets[id];
    const uint8_t* p;
    int64_t nbytes;
    if constexpr (K == Kind::kI4) {
      p = values + start / 2;
      nbytes = (len + 1) / 2 + 1;
    } else {
      p = values + start * kValueBytes;
      nbytes = len * kValueBytes;
    }
    for (int64_t b = 0; b < nbytes; b += kCacheLine) __builtin_prefetch(p + b, 0, 3);
    if constexpr (K == Kind::kI8) __builtin_prefetch(static_cast<const float*>(scale_bias) + 2 * id, 0, 3);
    if constexpr (K == Kind::kI4) __builtin_prefetch(static_cast<const c10::Half*>(scale_bias) + 2 * id, 0, 3);
  }

  // out[j] = v[j] (kAdd false) or out[j] += v[j] (kAdd true) for j < len; returns len.
  template <bool kAdd>
  inline int64_t apply(int64_t id, float* __restrict out) const {
    const int64_t start = offset(id);
    const int64_t len = offset(id + 1) - start;
    // Offsets are validated when a table is loaded; this cheap, predictable check keeps a corrupt buffer passed
    // straight to the op from reading or writing out of bounds.
    TORCH_CHECK_VALUE(start >= 0 && len >= 0 && len <= d_max && start + len <= n_values, "row ", id,
                      " has offsets [", start, ", ", start + len, ") inconsistent with d_max ", d_max, " and ",
                      n_values, " stored values");
    if constexpr (K == Kind::kF32) {
      const float* __restrict src = reinterpret_cast<const float*>(values) + start;
      if constexpr (kAdd) {
        for (int64_t j = 0; j < len; ++j) out[j] += src[j];
      } else {
        std::memcpy(out, src, len * sizeof(float));
      }
    } else if constexpr (K == Kind::kF16) {
      const Fp16* __restrict src = reinterpret_cast<const Fp16*>(values) + start;
      for (int64_t j = 0; j < len; ++j) {
        const float v = static_cast<float>(src[j]);
        if constexpr (kAdd) out[j] += v; else out[j] = v;
      }
    } else if constexpr (K == Kind::kI8) {
      const float* sb = static_cast<const float*>(scale_bias) + 2 * id;
      const float scale = sb[0], bias = sb[1];
      const uint8_t* __restrict src = values + start;
      for (int64_t j = 0; j < len; ++j) {
        const float v = static_cast<float>(src[j]) * scale + bias;
        if constexpr (kAdd) out[j] += v; else out[j] = v;
      }
    } else {
      const c10::Half* sb = static_cast<const c10::Half*>(scale_bias) + 2 * id;
      const float scale = static_cast<float>(sb[0]), bias = static_cast<float>(sb[1]);
      for (int64_t j = 0; j < len; ++j) {
        const int64_t p = start + j;
        const int code = (values[p >> 1] >> ((p & 1) << 2)) & 0xF;
        const float v = static_cast<float>(code) * scale + bias;
        if constexpr (kAdd) out[j] += v; else out[j] = v;
      }
    }
    return len;
  }
};

inline void check_id(int64_t id, int64_t pos, int64_t rows) {
  TORCH_CHECK_INDEX(id >= 0 && id < rows, "ids[", pos, "] = ", id, " is out of range for a table of ", rows, " rows");
}

template <Kind K>
void lookup_impl(const Table<K>& t, const int64_t* ids, int64_t n, int64_t d_max, float* out) {
  at::parallel_for(0, n, kLookupGrain, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      if (i + 2 * kPrefetchAhead < i1) t.prefetch_offset(ids[i + 2 * kPrefetchAhead]);
      if (i + kPrefetchAhead < i1) t.prefetch_row(ids[i + kPrefetchAhead]);
      const int64_t id = ids[i];
      check_id(id, i, t.rows);
      float* o = out + i * d_max;
      const int64_t len = t.template apply<false>(id, o);
      std::memset(o + len, 0, (d_max - len) * sizeof(float));
    }
  });
}

template <Kind K>
void pooled_impl(const Table<K>& t, const int64_t* ids, int64_t n, const int64_t* bag_offsets,
                 int64_t n_offsets, int64_t n_bags, bool mean, int64_t d_max, float* out) {
  at::parallel_for(0, n_bags, kPooledGrain, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t s = bag_offsets[b];
      const int64_t e = b + 1 < n_offsets ? bag_offsets[b + 1] : n;
      TORCH_CHECK_VALUE(0 <= s && s <= e && e <= n, "bag ", b, " spans ids [", s, ", ", e,
                        "): offsets must be non-decreasing and within [0, ", n, "]");
      float* o = out + b * d_max;
      std::memset(o, 0, d_max * sizeof(float));
      for (int64_t i = s; i < e; ++i) {
        if (i + 2 * kPrefetchAhead < n) t.prefetch_offset(ids[i + 2 * kPrefetchAhead]);
        if (i + kPrefetchAhead < n) t.prefetch_row(ids[i + kPrefetchAhead]);
        const int64_t id = ids[i];
        check_id(id, i, t.rows);
        t.template apply<true>(id, o);
      }
      if (mean && e > s) {
        const float len = static_cast<float>(e - s);
        for (int64_t j = 0; j < d_max; ++j) o[j] /= len;
      }
    }
  });
}

void check_table(Kind kind, const at::Tensor& values, const at::Tensor& block_offsets,
                 const at::Tensor& local_offsets, int64_t rows_per_block,
                 const std::optional<at::Tensor>& scale_bias, int64_t d_max) {
  TORCH_CHECK_VALUE(d_max >= 1, "d_max must be >= 1, got ", d_max);
  TORCH_CHECK_VALUE(values.device().is_cpu() && block_offsets.device().is_cpu() && local_offsets.device().is_cpu(),
                    "ragged tables must be on the CPU");
  TORCH_CHECK_VALUE(values.dim() == 1 && values.is_contiguous(), "values must be a contiguous 1-D tensor");
  TORCH_CHECK_VALUE(local_offsets.dim() == 1 && local_offsets.is_contiguous() && local_offsets.numel() >= 1 &&
                        local_offsets.scalar_type() == at::kShort,
                    "local_offsets must be a contiguous 1-D int16 tensor of rows + 1 entries");
  TORCH_CHECK_VALUE(rows_per_block >= 1 && (rows_per_block & (rows_per_block - 1)) == 0,
                    "rows_per_block must be a power of two, got ", rows_per_block);
  const int64_t rows = local_offsets.numel() - 1;
  TORCH_CHECK_VALUE(block_offsets.dim() == 1 && block_offsets.is_contiguous() &&
                        block_offsets.scalar_type() == at::kLong &&
                        block_offsets.numel() == (rows + rows_per_block) / rows_per_block,
                    "block_offsets must be a contiguous 1-D int64 tensor of ceil((rows + 1) / rows_per_block) entries");
  const at::ScalarType want = kind == Kind::kF32 ? at::kFloat : kind == Kind::kF16 ? at::kHalf : at::kByte;
  TORCH_CHECK_VALUE(values.scalar_type() == want, "values must be ", want, ", got ", values.scalar_type());
  const bool quantised = kind == Kind::kI8 || kind == Kind::kI4;
  TORCH_CHECK_VALUE(scale_bias.has_value() == quantised, quantised ? "int8/int4 need" : "fp32/fp16 take no",
                    " scale_bias");
  if (quantised) {
    const at::Tensor& sb = *scale_bias;
    const at::ScalarType sb_want = kind == Kind::kI8 ? at::kFloat : at::kHalf;
    TORCH_CHECK_VALUE(sb.device().is_cpu() && sb.is_contiguous() && sb.dim() == 2 && sb.size(1) == 2 &&
                          sb.size(0) == rows && sb.scalar_type() == sb_want,
                      "scale_bias must be a contiguous ", sb_want, " [rows, 2] CPU tensor");
  }
}

void check_ids(const at::Tensor& ids, const char* name) {
  TORCH_CHECK_VALUE(ids.device().is_cpu() && ids.dim() == 1 && ids.is_contiguous() && ids.scalar_type() == at::kLong,
                    name, " must be a contiguous 1-D int64 CPU tensor");
}

// Calls f(Table<K>) with the kind resolved at compile time.
template <typename F>
void dispatch(Kind kind, const at::Tensor& values, const at::Tensor& block_offsets, const at::Tensor& local_offsets,
              int64_t rows_per_block, const std::optional<at::Tensor>& scale_bias, int64_t d_max, F&& f) {
  const int64_t rows = local_offsets.numel() - 1;
  const void* sb = scale_bias.has_value() ? scale_bias->data_ptr() : nullptr;
  const auto* v = static_cast<const uint8_t*>(values.data_ptr());
  const int64_t n_values = kind == Kind::kI4 ? 2 * values.numel() : values.numel();
  const int64_t* blocks = block_offsets.data_ptr<int64_t>();
  const auto* locals = reinterpret_cast<const uint16_t*>(local_offsets.data_ptr<int16_t>());
  const int shift = __builtin_ctzll(static_cast<unsigned long long>(rows_per_block));
  auto with_kind = [&](auto kind_tag) {
    constexpr Kind K = decltype(kind_tag)::value;
    f(Table<K>{v, blocks, locals, sb, rows, n_values, d_max, shift});
  };
  switch (kind) {
    case Kind::kF32: with_kind(std::integral_constant<Kind, Kind::kF32>{}); break;
    case Kind::kF16: with_kind(std::integral_constant<Kind, Kind::kF16>{}); break;
    case Kind::kI8: with_kind(std::integral_constant<Kind, Kind::kI8>{}); break;
    case Kind::kI4: with_kind(std::integral_constant<Kind, Kind::kI4>{}); break;
  }
}

at::Tensor ragged_lookup(const at::Tensor& values, const at::Tensor& block_offsets, const at::Tensor& local_offsets,
                         int64_t rows_per_block, const std::optional<at::Tensor>& scale_bias, const at::Tensor& ids,
                         int64_t d_max, std::string_view dtype) {
  const Kind kind = parse_kind(dtype);
  check_table(kind, values, block_offsets, local_offsets, rows_per_block, scale_bias, d_max);
  check_ids(ids, "ids");
  const int64_t n = ids.numel();
  at::Tensor out = at::empty({n, d_max}, values.options().dtype(at::kFloat));
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  dispatch(kind, values, block_offsets, local_offsets, rows_per_block, scale_bias, d_max,
           [&](const auto& t) { lookup_impl(t, id_ptr, n, d_max, out_ptr); });
  return out;
}

at::Tensor ragged_pooled(const at::Tensor& values, const at::Tensor& block_offsets, const at::Tensor& local_offsets,
                         int64_t rows_per_block, const std::optional<at::Tensor>& scale_bias, const at::Tensor& ids,
                         const at::Tensor& bag_offsets, int64_t d_max, std::string_view dtype,
                         std::string_view mode, bool include_last_offset) {
  const Kind kind = parse_kind(dtype);
  check_table(kind, values, block_offsets, local_offsets, rows_per_block, scale_bias, d_max);
  check_ids(ids, "ids");
  check_ids(bag_offsets, "offsets");
  TORCH_CHECK_VALUE(mode == "sum" || mode == "mean", "mode must be 'sum' or 'mean', got '", mode, "'");
  const int64_t n = ids.numel();
  const int64_t n_offsets = bag_offsets.numel();
  TORCH_CHECK_VALUE(!include_last_offset || n_offsets >= 1, "include_last_offset needs at least one offset");
  const int64_t n_bags = include_last_offset ? n_offsets - 1 : n_offsets;
  const int64_t* bo = bag_offsets.data_ptr<int64_t>();
  TORCH_CHECK_VALUE(n_offsets == 0 || bo[0] == 0, "offsets[0] must be 0, got ", n_offsets ? bo[0] : 0);
  at::Tensor out = at::empty({n_bags, d_max}, values.options().dtype(at::kFloat));
  const int64_t* id_ptr = ids.data_ptr<int64_t>();
  float* out_ptr = out.data_ptr<float>();
  const bool mean = mode == "mean";
  dispatch(kind, values, block_offsets, local_offsets, rows_per_block, scale_bias, d_max, [&](const auto& t) {
    pooled_impl(t, id_ptr, n, bo, n_offsets, n_bags, mean, d_max, out_ptr);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(ciess_ragged, m) {
  m.def(
      "lookup(Tensor values, Tensor block_offsets, Tensor local_offsets, int rows_per_block, Tensor? scale_bias, "
      "Tensor ids, int d_max, str dtype) -> Tensor");
  m.def(
      "pooled(Tensor values, Tensor block_offsets, Tensor local_offsets, int rows_per_block, Tensor? scale_bias, "
      "Tensor ids, Tensor offsets_of_bags, int d_max, str dtype, str mode, bool include_last_offset) -> Tensor");
}

TORCH_LIBRARY_IMPL(ciess_ragged, CPU, m) {
  m.impl("lookup", &ragged_lookup);
  m.impl("pooled", &ragged_pooled);
}
