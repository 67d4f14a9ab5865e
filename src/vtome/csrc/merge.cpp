// The merge step on the CPU as compiled loops (vtome/kernels.py loads this; vtome/merge.py states the rule and is
// the reference): match (bipartite soft matching -> ranking and destination map), average (size-weighted merge
// into destinations), sum_heads (keys summed over heads) and step (all of a model's merge step in one call).
//
// Every result is the PyTorch code's to the bit: the cosine similarities come from the same ATen operations
// (vector norm, bmm); every other value is computed by the same IEEE operations in the same order (sums in
// token or head order, the same divisions, no fused multiply-adds), and ties and NaNs follow torch.max and the
// stable descending sort. tests/test_kernels.py checks it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/bmm_cpu_dispatch.h>
#include <ATen/ops/empty_cpu_dispatch.h>
#include <ATen/ops/linalg_vector_norm_cpu_dispatch.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <memory>
#include <numeric>
#include <tuple>
#include <type_traits>
#include <vector>

// Hot loops are compiled for AVX-512 and AVX2 beside the baseline and picked by the CPU at load time (function
// multiversioning: GCC with glibc on Linux x86-64 only, as Clang does not take target_clones on templates and musl
// has no ifunc; elsewhere the baseline alone). They are element-wise IEEE operations and comparisons (no fused
// multiply-adds, no reassociation), so every version gives the same bits.
#if defined(__x86_64__) && defined(__linux__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define VTOME_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define VTOME_CLONES
#endif
#define VTOME_INLINE inline __attribute__((always_inline))

namespace {

// Run ``body(first, last)`` over items [0, n), split across ATen's threads when each thread gets at least ATen's
// own grain of elements (``work`` per item); small inputs run inline (a parallel region costs more than it saves,
// and the loop compiles as plain code).
template <typename F>
void for_range(int64_t n, int64_t work, const F& body) {
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(work, 1));
  if (n > grain && at::get_num_threads() > 1 && !at::in_parallel_region()) {
    at::parallel_for(0, n, grain, body);
  } else {
    body(0, n);
  }
}

// torch's order for max / descending sort: NaN above everything.
template <typename T>
inline bool above(T a, T b) { return (std::isnan(a) && !std::isnan(b)) || a > b; }

// Index of the largest of ``row[0:n]``, the first on ties, a NaN counting as the largest (torch.max's rule).
// Two 32-byte vectors of running maxima and their positions (GCC/Clang vector types: SIMD on any target), the
// last ones loaded again overlapping the earlier ones (an element seen twice keeps its position, and a lane
// only ever sees later positions, so ties keep the first), then the lanes combined.
template <typename T>
VTOME_INLINE int64_t best_index(const T* row, int64_t n) {
  typedef T vec __attribute__((vector_size(32)));
  typedef std::conditional_t<sizeof(T) == 4, int32_t, int64_t> I;
  typedef I ivec __attribute__((vector_size(32)));
  constexpr int64_t width = 32 / sizeof(T), lanes = 2 * width;
  if (n < lanes) {  // short rows: one scalar pass
    int64_t found = 0;
    for (int64_t j = 0; j < n; ++j) {
      if (row[j] != row[j]) return j;
      if (row[j] > row[found]) found = j;
    }
    return found;
  }
  const T lowest = -std::numeric_limits<T>::infinity();
  vec best[2];
  ivec at[2], lane[2], nan = {};
  for (int q = 0; q < 2; ++q) {
    for (int64_t k = 0; k < width; ++k) {
      best[q][k] = lowest;
      at[q][k] = -1;
      lane[q][k] = q * width + k;
    }
  }
  const auto take = [&](int64_t j) {
    for (int q = 0; q < 2; ++q) {
      vec v;
      std::memcpy(&v, row + j + q * width, sizeof v);
      const ivec more = v > best[q];  // -1 where larger
      best[q] = more ? v : best[q];
      at[q] = more ? lane[q] + static_cast<I>(j) : at[q];
      nan |= v != v;
    }
  };
  int64_t j = 0;
  for (; j + lanes <= n; j += lanes) take(j);
  if (j < n) take(n - lanes);
  int64_t found = -1;
  T top = lowest;
  bool has_nan = false;
  for (int q = 0; q < 2; ++q) {
    for (int64_t k = 0; k < width; ++k) {
      has_nan |= nan[k] != 0;
      if (at[q][k] >= 0 && (best[q][k] > top || (best[q][k] == top && at[q][k] < found))) {
        top = best[q][k];
        found = at[q][k];
      }
    }
  }
  if (has_nan) {
    for (int64_t i = 0; i < n; ++i) {
      if (row[i] != row[i]) return i;
    }
  }
  return found < 0 ? 0 : found;  // all -inf: the first
}

// Rows [first, last) of ``x`` [G, N, d] divided by their ``norm`` clamped at 1e-12, even positions to ``a``
// [G, n_a, d] and odd ones to ``b`` [G, n_b, d].
template <typename T>
VTOME_CLONES void unit_rows(const T* __restrict x, const T* __restrict norm, int64_t first, int64_t last, int64_t n,
                            int64_t d, T* __restrict a, T* __restrict b) {
  const int64_t n_a = (n + 1) / 2, n_b = n / 2;
  const T lowest = static_cast<T>(1e-12);
  for (int64_t i = first; i < last; ++i) {
    const int64_t k = i / n, t = i % n;
    const T length = norm[i] < lowest ? lowest : norm[i];  // clamp_min_: NaN stays NaN
    T* __restrict o = (t % 2 ? b + (k * n_b + t / 2) * d : a + (k * n_a + t / 2) * d);
    for (int64_t j = 0; j < d; ++j) o[j] = x[i * d + j] / length;
  }
}

// Unit vectors of the A tokens (even positions) and the B tokens (odd positions) of ``metric`` [G, N, d], each
// divided by its L2 norm clamped at 1e-12: the norm from ATen (so the cosine is PyTorch's to the bit), the rest
// one loop. Returns ([G, n_a, d], [G, n_b, d]), contiguous.
std::pair<at::Tensor, at::Tensor> unit_halves(const at::Tensor& metric) {
  const int64_t g = metric.size(0), n = metric.size(1), d = metric.size(2), n_a = (n + 1) / 2, n_b = n / 2;
  // The norm of the tensor as given (a copy's norm can differ in the last bit where rows are strided).
  const at::Tensor norm = at::cpu::linalg_vector_norm(metric, 2, at::IntArrayRef{-1}, true, std::nullopt).contiguous();
  const at::Tensor src = metric.contiguous();
  at::Tensor a = at::cpu::empty({g, n_a, d}, metric.options()), b = at::cpu::empty({g, n_b, d}, metric.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, metric.scalar_type(), "vtome_units", [&] {
    const scalar_t* __restrict xp = src.data_ptr<scalar_t>();
    const scalar_t* __restrict np = norm.data_ptr<scalar_t>();
    scalar_t* __restrict ap = a.data_ptr<scalar_t>();
    scalar_t* __restrict bp = b.data_ptr<scalar_t>();
    for_range(g * n, d, [&](int64_t first, int64_t last) { unit_rows(xp, np, first, last, n, d, ap, bp); });
  });
  return {a, b};
}

// ``score[0:n]`` ranked as torch's stable descending sort (NaN first, ties and -0.0 == 0.0 in position order):
// positions to ``ranked``. float32: one sort of 64-bit keys (score order above, position below) in ``keys``;
// else a stable sort.
template <typename T>
void rank_descending(const T* score, int64_t n, int64_t* ranked, std::vector<uint64_t>& keys) {
  if constexpr (std::is_same_v<T, float>) {
    if (n <= static_cast<int64_t>(keys.size()) && n < (int64_t{1} << 32)) {
      for (int64_t i = 0; i < n; ++i) {
        const float v = score[i] == 0.0f ? 0.0f : score[i];  // -0.0 ties with 0.0
        uint32_t bits;
        std::memcpy(&bits, &v, sizeof bits);
        const uint32_t ascending = bits & 0x80000000u ? ~bits : bits | 0x80000000u;  // float order as integers
        const uint32_t descending = v != v ? 0u : ~ascending;  // every NaN first (~+inf is above 0)
        keys[i] = static_cast<uint64_t>(descending) << 32 | static_cast<uint64_t>(i);
      }
      std::sort(keys.begin(), keys.begin() + n);
      for (int64_t i = 0; i < n; ++i) ranked[i] = static_cast<int64_t>(keys[i] & 0xffffffffu);
      return;
    }
  }
  std::iota(ranked, ranked + n, 0);
  std::stable_sort(ranked, ranked + n, [&](int64_t a, int64_t b) { return above(score[a], score[b]); });
}

// The best B partner of A rows [first, last) of ``s`` [G * n_a, n_b] and its similarity: the first ``pb`` B
// tokens (protected) are never partners, and the first ``pa`` A tokens of each group (protected) score -inf.
template <typename T>
VTOME_CLONES void best_partners(const T* s, int64_t first, int64_t last, int64_t n_a, int64_t n_b, int64_t pa,
                                int64_t pb, int64_t* partners, T* scores) {
  for (int64_t q = first; q < last; ++q) {
    const T* row = s + q * n_b;
    partners[q] = best_index(row + pb, n_b - pb) + pb;
    scores[q] = q % n_a < pa ? -std::numeric_limits<T>::infinity() : row[partners[q]];
  }
}

// The best partners, the ranking and the destinations of each group from its similarities ``sim`` [G, n_a, n_b].
template <typename T>
void fill(const at::Tensor& sim, T limit, int64_t r, int64_t pa, int64_t pb, int64_t head, bool sort_staying, bool drop,
          bool hybrid, int64_t* ranked_p, at::Tensor& dest) {
  const int64_t g = sim.size(0), n_a = sim.size(1), n_b = sim.size(2), n = dest.size(1), n_unm = n_a - r;
  const T* s = sim.data_ptr<T>();
  int64_t* dest_p = dest.data_ptr<int64_t>();
  std::vector<T> scores(g * n_a);
  std::vector<int64_t> partners(g * n_a), rank(n_a);
  std::vector<uint64_t> keys(std::is_same_v<T, float> ? n_a : 0);
  for_range(g * n_a, n_b, [&](int64_t first, int64_t last) {
    best_partners(s, first, last, n_a, n_b, pa, pb, partners.data(), scores.data());
  });
  std::vector<char> replaced(n_b);

  for (int64_t k = 0; k < g; ++k) {
    const T* score = scores.data() + k * n_a;
    const int64_t* partner = partners.data() + k * n_a;
    int64_t* rk = ranked_p + k * n_a;
    rank_descending(score, n_a, rk, keys);
    for (int64_t q = 0; q < n_a; ++q) rank[rk[q]] = q;

    int64_t* d = dest_p + k * n;
    for (int64_t t = 0; t < head; ++t) d[t] = t;
    std::fill(replaced.begin(), replaced.end(), 0);
    if (hybrid) {
      for (int64_t q = 0; q < r; ++q) {
        const T v = score[rk[q]];
        if (!(v >= limit)) replaced[partner[rk[q]]] = 1;
      }
    }
    int64_t staying_seen = 0;
    for (int64_t i = 0; i < n_a; ++i) {
      int64_t out;
      if (rank[i] >= r) {
        out = head + (sort_staying ? staying_seen++ : rank[i] - r);
      } else {
        out = drop ? -1 : head + n_unm + partner[i];
      }
      d[head + 2 * i] = out;
    }
    for (int64_t j = 0; j < n_b; ++j) d[head + 2 * j + 1] = replaced[j] ? -1 : head + n_unm + j;
  }
}

// The matching of ``metric`` [G, N, C]: returns ``dest`` [G, N] and writes the ranking [G, n_a] to ``ranked``.
at::Tensor match_into(const at::Tensor& metric, int64_t r, int64_t protected_tokens, int64_t head, bool sort_staying,
                      bool drop, bool hybrid, double threshold, int64_t* ranked) {
  TORCH_CHECK(metric.dim() == 3, "vtome::match: metric must be [G, N, C]");
  const int64_t g = metric.size(0), n = metric.size(1);
  const int64_t n_a = (n - head + 1) / 2, n_b = (n - head) / 2;
  const int64_t pa = head == 0 ? (protected_tokens + 1) / 2 : 0, pb = head == 0 ? protected_tokens / 2 : 0;
  TORCH_CHECK(r > 0 && r <= n_a && n_b > pb, "vtome::match: r out of range");

  const auto [unit_a, unit_b] = unit_halves(head ? metric.slice(1, head) : metric);
  at::Tensor sim = at::cpu::bmm(unit_a, unit_b.transpose(1, 2));
  // Thresholds compare in the similarities' dtype (as `scores >= threshold` does in PyTorch); half
  // precision widens to float exactly, double stays double.
  const double limit = hybrid ? at::scalar_tensor(threshold, sim.options()).item<double>() : 0.0;
  at::Tensor dest = at::cpu::empty({g, n}, metric.options().dtype(at::kLong));
  if (sim.scalar_type() == at::kDouble) {
    fill<double>(sim.contiguous(), limit, r, pa, pb, head, sort_staying, drop, hybrid, ranked, dest);
  } else {
    if (sim.scalar_type() != at::kFloat) sim = sim.to(at::kFloat);  // exact: half precision widens
    fill<float>(sim.contiguous(), static_cast<float>(limit), r, pa, pb, head, sort_staying, drop, hybrid, ranked,
                dest);
  }
  return dest;
}

std::tuple<at::Tensor, at::Tensor> match_cpu(const at::Tensor& metric, int64_t r, int64_t protected_tokens,
                                             int64_t head, bool sort_staying, bool drop, bool hybrid,
                                             double threshold) {
  TORCH_CHECK(metric.dim() == 3, "vtome::match: metric must be [G, N, C]");
  at::Tensor ranked = at::cpu::empty({metric.size(0), (metric.size(1) - head + 1) / 2}, metric.options().dtype(at::kLong));
  at::Tensor dest = match_into(metric, r, protected_tokens, head, sort_staying, drop, hybrid, threshold,
                               ranked.data_ptr<int64_t>());
  return {ranked, dest};
}


// Columns [c0, c1) of the size-weighted average: each token of ``x`` [M, C] times its size (``size``, or 1) added
// to its row of ``acc`` [out_rows, C] in token order (a row out of range: discarded), then each row times 1 / (its
// size sum ``sums``) into ``out``. ``acc`` starts uninitialised: a row's ``first`` token writes 0 + product (as a
// sum from zeros does: -0.0 becomes 0.0), and a row no token reaches (``first`` -1) counts as zeros.
template <typename X, typename W>
VTOME_CLONES void average_columns(const X* __restrict x, const float* __restrict size, const int64_t* __restrict rows,
                                  const int64_t* __restrict first, const float* __restrict sums, int64_t m, int64_t c,
                                  int64_t out_rows, int64_t c0, int64_t c1, W* acc, X* out) {
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = rows[i];
    if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(out_rows)) continue;  // discarded
    const W weight = size ? static_cast<W>(size[i]) : W(1);
    const X* __restrict xi = x + i * c;
    W* __restrict a = acc + row * c;
    if (first[row] == i) {
      for (int64_t j = c0; j < c1; ++j) a[j] = W(0) + static_cast<W>(static_cast<W>(xi[j]) * weight);
    } else {
      for (int64_t j = c0; j < c1; ++j) a[j] += static_cast<W>(static_cast<W>(xi[j]) * weight);
    }
  }
  for (int64_t row = 0; row < out_rows; ++row) {
    const W inverse = W(1) / static_cast<W>(sums[row]);  // one division per token, as the PyTorch code
    const W* a = acc + row * c;
    X* o = out + row * c;
    if (first[row] < 0) {
      for (int64_t j = c0; j < c1; ++j) o[j] = static_cast<X>(W(0) * inverse);
    } else {
      for (int64_t j = c0; j < c1; ++j) o[j] = static_cast<X>(a[j] * inverse);
    }
  }
}

// Size-weighted average of tokens into their destination rows (vtome.merge.average_tokens, without autograd):
// x [..., C] (M tokens), size [..., 1] float32 (undefined: ones), rows (M, a row >= groups * tokens discards its
// token) -> (out [groups, tokens, C] in x's dtype, sizes [groups, tokens, 1] float32). Each product x * size is
// rounded to the accumulation type W, added to its row in token order, then multiplied by 1 / (sum of sizes) in W,
// as the PyTorch code does.
template <typename X, typename W>
void average_into(const at::Tensor& x, int64_t m, int64_t c, const at::Tensor& size, const int64_t* rows, int64_t out_rows,
                  at::Tensor& out, at::Tensor& new_size) {
  const X* xp = x.data_ptr<X>();
  const float* sp = size.defined() ? size.data_ptr<float>() : nullptr;
  float* np = new_size.data_ptr<float>();
  std::vector<int64_t> first(out_rows, -1);  // the first token of each row
  for (int64_t i = 0; i < m; ++i) {
    const int64_t row = rows[i];
    if (static_cast<uint64_t>(row) >= static_cast<uint64_t>(out_rows)) continue;
    np[row] += sp ? sp[i] : 1.0f;
    if (first[row] < 0) first[row] = i;
  }
  // Accumulate in W: straight into the output when it is W, else in a buffer converted at the end.
  std::unique_ptr<W[]> buffer(std::is_same_v<X, W> ? nullptr : new W[out_rows * c]);
  W* acc = std::is_same_v<X, W> ? reinterpret_cast<W*>(out.data_ptr<X>()) : buffer.get();
  X* op = out.data_ptr<X>();
  const int64_t* fp = first.data();
  for_range(c, m, [&](int64_t c0, int64_t c1) {
    average_columns(xp, sp, rows, fp, np, m, c, out_rows, c0, c1, acc, op);
  });
}

// average_cpu on raw row indices (one per token).
std::tuple<at::Tensor, at::Tensor> average_rows(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                                const int64_t* rp, int64_t groups, int64_t tokens) {
  const int64_t c = x.size(-1), m = x.numel() / std::max<int64_t>(c, 1), out_rows = groups * tokens;
  const at::Tensor xc = x.contiguous();  // read as [M, C]
  const at::Tensor sc = size.has_value() ? size->contiguous() : at::Tensor();
  TORCH_CHECK(!sc.defined() || (sc.scalar_type() == at::kFloat && sc.numel() == m),
              "vtome::average: size must be float32 [..., 1], one per token");
  at::Tensor out = at::cpu::empty({groups, tokens, c}, x.options());
  at::Tensor new_size = at::cpu::empty({groups, tokens, 1}, x.options().dtype(at::kFloat));
  std::memset(new_size.data_ptr<float>(), 0, sizeof(float) * groups * tokens);
  switch (x.scalar_type()) {
    case at::kFloat: average_into<float, float>(xc, m, c, sc, rp, out_rows, out, new_size); break;
    case at::kDouble: average_into<double, double>(xc, m, c, sc, rp, out_rows, out, new_size); break;
    case at::kBFloat16: average_into<c10::BFloat16, float>(xc, m, c, sc, rp, out_rows, out, new_size); break;
    case at::kHalf: average_into<c10::Half, float>(xc, m, c, sc, rp, out_rows, out, new_size); break;
    default: TORCH_CHECK(false, "vtome::average: unsupported dtype ", x.scalar_type());
  }
  return {out, new_size};
}

std::tuple<at::Tensor, at::Tensor> average_cpu(const at::Tensor& x, const std::optional<at::Tensor>& size,
                                               const at::Tensor& rows, int64_t groups, int64_t tokens) {
  TORCH_CHECK(rows.numel() * std::max<int64_t>(x.size(-1), 1) == x.numel() && rows.scalar_type() == at::kLong,
              "vtome::average: one long row index per token");
  const at::Tensor rc = rows.contiguous();
  return average_rows(x, size, rc.data_ptr<int64_t>(), groups, tokens);
}


// Sum of the keys over heads: keys [G, H, N, d] (any strides; or projected [G, N, H*d]) -> [G, N, d], added in
// head order ((k0 + k1) + k2) + ..., as vtome.merge.aggregate_heads does on the CPU without this kernel.
template <typename T>
VTOME_CLONES void sum_heads_rows(const T* kp, int64_t first, int64_t last, int64_t h, int64_t n, int64_t d, int64_t sg,
                                 int64_t sh, int64_t sn, int64_t sd, T* __restrict op) {
  for (int64_t i = first; i < last; ++i) {
    T* __restrict o = op + i * d;
    const T* k = kp + (i / n) * sg + (i % n) * sn;
    if (sd == 1) {  // the usual case: each head's d values contiguous
      for (int64_t j = 0; j < d; ++j) o[j] = k[j];
      for (int64_t q = 1; q < h; ++q) {
        const T* __restrict kq = k + q * sh;
        for (int64_t j = 0; j < d; ++j) o[j] += kq[j];
      }
    } else {
      for (int64_t j = 0; j < d; ++j) o[j] = k[j * sd];
      for (int64_t q = 1; q < h; ++q) {
        for (int64_t j = 0; j < d; ++j) o[j] += k[q * sh + j * sd];
      }
    }
  }
}

template <typename T>
void sum_heads_into(const T* kp, int64_t g, int64_t h, int64_t n, int64_t d, int64_t sg, int64_t sh, int64_t sn,
                    int64_t sd, T* __restrict op) {
  for_range(g * n, h * d, [&](int64_t first, int64_t last) { sum_heads_rows(kp, first, last, h, n, d, sg, sh, sn, sd, op); });
}

at::Tensor sum_heads_cpu(const at::Tensor& keys, int64_t heads) {
  TORCH_CHECK(keys.dim() == 4 || (keys.dim() == 3 && heads > 0 && keys.size(2) % heads == 0),
              "vtome::sum_heads: keys must be [G, H, N, d], or [G, N, H*d] with H = heads");
  // [G, H, N, d] sizes and strides, read off either layout without making views
  const bool projected = keys.dim() == 3;
  const int64_t g = keys.size(0), h = projected ? heads : keys.size(1), n = keys.size(projected ? 1 : 2);
  const int64_t d = projected ? keys.size(2) / heads : keys.size(3), sd = keys.stride(projected ? 2 : 3);
  const int64_t sh = projected ? d * sd : keys.stride(1), sn = keys.stride(projected ? 1 : 2), sg = keys.stride(0);
  at::Tensor out = at::cpu::empty({g, n, d}, keys.options());
  switch (keys.scalar_type()) {
    case at::kFloat:
      sum_heads_into<float>(keys.data_ptr<float>(), g, h, n, d, sg, sh, sn, sd, out.data_ptr<float>());
      break;
    case at::kDouble:
      sum_heads_into<double>(keys.data_ptr<double>(), g, h, n, d, sg, sh, sn, sd, out.data_ptr<double>());
      break;
    default: TORCH_CHECK(false, "vtome::sum_heads: float32 or float64 keys only, got ", keys.scalar_type());
  }
  return out;
}


// One merge step of a model, fused (vtome.merger.Merger._merge for one matching per group, no positions or
// source maps, no autograd): match on the keys (group layout; summed over ``heads`` as sum_heads does, or with
// heads = 0 already the metric [G, n, d]), average the model's tokens x [B, N, C]
// (sizes [B, N, 1] float32 or none) into their destinations in the model's token order, and compose the index
// map [G, n0] (or none) with the destinations. ``frames`` = 0: joint layout, one group per clip (G = B, n = N);
// else divided: ``set_aside`` leading tokens stay in front and each frame is a group (G = B * frames), frame
// tokens time-minor (position set_aside + slot * frames + t) or time-major (set_aside + t * n + slot).
// Returns (tokens [B, N', C], sizes [B, N', 1], index [G, n0]).
std::tuple<at::Tensor, at::Tensor, at::Tensor> step_cpu(const at::Tensor& keys, int64_t heads, const at::Tensor& x,
                                                        const std::optional<at::Tensor>& size,
                                                        const std::optional<at::Tensor>& index, int64_t r,
                                                        int64_t protected_tokens, int64_t head, bool sort_staying,
                                                        bool drop, bool hybrid, double threshold, int64_t frames,
                                                        int64_t set_aside, bool time_minor) {
  TORCH_CHECK(x.dim() == 3, "vtome::step: x must be [B, N, C]");
  const at::Tensor metric = heads > 0 ? sum_heads_cpu(keys, heads) : keys;
  std::vector<int64_t> ranked((metric.size(1) + 1) / 2 * metric.size(0));
  const at::Tensor dest =
      match_into(metric, r, protected_tokens, head, sort_staying, drop, hybrid, threshold, ranked.data());
  const int64_t b = x.size(0), tokens = x.size(1), g = dest.size(0), n = dest.size(1), n_out = n - r;
  const int64_t f = frames > 0 ? frames : 1, p = frames > 0 ? set_aside : 0;
  TORCH_CHECK(g == b * f && tokens == p + f * n, "vtome::step: metric groups do not match the tokens' layout");
  const int64_t out_tokens = p + f * n_out, spare = b * out_tokens;
  std::vector<int64_t> rows(b * tokens);
  int64_t* rp = rows.data();
  const int64_t* dp = dest.data_ptr<int64_t>();
  for (int64_t c = 0; c < b; ++c) {  // row of each model token in the flattened output (spare: discarded)
    int64_t* rc = rp + c * tokens;
    const int64_t first = c * out_tokens;
    for (int64_t i = 0; i < p; ++i) rc[i] = first + i;
    for (int64_t t = 0; t < f; ++t) {
      const int64_t* dg = dp + (c * f + t) * n;
      for (int64_t slot = 0; slot < n; ++slot) {
        const int64_t to = dg[slot];
        const int64_t at = p + (time_minor ? slot * f + t : t * n + slot);
        rc[at] = to < 0 ? spare : first + p + (time_minor ? to * f + t : t * n_out + to);
      }
    }
  }
  auto [out, new_size] = average_rows(x, size, rp, b, out_tokens);
  at::Tensor new_index = dest;
  if (index.has_value() && index->defined()) {  // each input token: the token covering it now (-1: dropped)
    const at::Tensor old = index->contiguous();
    TORCH_CHECK(old.dim() == 2 && old.size(0) == g, "vtome::step: index must be [G, n0]");
    new_index = at::cpu::empty(old.sizes(), old.options());
    const int64_t n0 = old.size(1);
    const int64_t* op = old.data_ptr<int64_t>();
    int64_t* np = new_index.data_ptr<int64_t>();
    for (int64_t k = 0; k < g; ++k) {
      for (int64_t j = 0; j < n0; ++j) {
        const int64_t was = op[k * n0 + j];
        TORCH_CHECK(was < n, "vtome::step: index map points past the group's ", n, " tokens");
        np[k * n0 + j] = was < 0 ? -1 : dp[k * n + was];
      }
    }
  }
  return {out, new_size, new_index};
}
}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  // Plain Python functions (a call costs a few microseconds less than a dispatched operator, which counts at
  // batch 1); the GIL is released while they run.
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  using pybind11::arg;
  m.def("match", &match_cpu, release(), arg("metric"), arg("r"), arg("protected"), arg("head"), arg("sort_staying"),
        arg("drop"), arg("hybrid"), arg("threshold"));
  m.def("average", &average_cpu, release(), arg("x"), arg("size"), arg("rows"), arg("groups"), arg("tokens"));
  m.def("sum_heads", &sum_heads_cpu, release(), arg("keys"), arg("heads"));
  m.def("step", &step_cpu, release(), arg("keys"), arg("heads"), arg("x"), arg("size"), arg("index"), arg("r"),
        arg("protected"), arg("head"), arg("sort_staying"), arg("drop"), arg("hybrid"), arg("threshold"), arg("frames"),
        arg("set_aside"), arg("time_minor"));
}
