// Exact 1.5-entmax and sparsemax of a block of rows, a row at a time in three passes over it.
//
// The PyTorch solver (threshold.py) runs each Newton step as a separate pass, with Python work and a
// host synchronisation between steps; on attention rows of a few thousand keys that overhead costs more
// than the arithmetic. Here each row is read three times: (1) its maximum and the maxima of its blocks of
// BLOCK entries; (2) the candidates: the threshold of the block maxima, a subset of the row, is a lower
// bound of the row's, and only entries above it (from blocks whose maximum is) can hold weight; (3) the
// weights. The threshold is solved on the candidates alone, in double precision, by the Newton steps
// from the left with the exact finish of threshold.py (docs/mathematics.md, section 1); the steps drop
// the candidates at or below the current threshold, a lower bound of the answer. Rows that do not
// certify are sorted.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <tuple>
#include <vector>

namespace {

constexpr int64_t BLOCK = 16;
// Bounds come from rounded arithmetic: keep entries this close below them (as _candidates.py does).
constexpr double BOUND_MARGIN = 1e-4;

// Over the entries of y above s: their number, and the sums of u = y - s, of u^2 and the smallest u.
struct Support {
  double count = 0, total = 0, total_sq = 0, smallest = std::numeric_limits<double>::infinity();
};

template <typename T>
Support scalar_support_at(const T* y, int64_t size, double s) {
  Support at;
  for (int64_t i = 0; i < size; ++i) {
    const double u = static_cast<double>(y[i]) - s;
    if (u <= 0) continue;
    at.count += 1;
    at.total += u;
    at.total_sq += u * u;
    at.smallest = std::min(at.smallest, u);
  }
  return at;
}

template <typename T>
Support support_at(const T* y, int64_t size, double s) {
  return scalar_support_at(y, size, s);
}

inline double lane_sum(__m256d v) {
  const __m128d pair = _mm_add_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_add_sd(pair, _mm_unpackhi_pd(pair, pair)));
}

inline double lane_min(__m256d v) {
  const __m128d pair = _mm_min_pd(_mm256_castpd256_pd128(v), _mm256_extractf128_pd(v, 1));
  return _mm_cvtsd_f64(_mm_min_sd(pair, _mm_unpackhi_pd(pair, pair)));
}

// The float rows' version, four entries at a time in double precision.
template <>
Support support_at<float>(const float* y, int64_t size, double s) {
  const __m256d shift = _mm256_set1_pd(s), zero = _mm256_setzero_pd(), one = _mm256_set1_pd(1.0);
  const __m256d inf = _mm256_set1_pd(std::numeric_limits<double>::infinity());
  __m256d count = zero, total = zero, total_sq = zero, smallest = inf;
  int64_t i = 0;
  for (; i + 4 <= size; i += 4) {
    const __m256d u = _mm256_sub_pd(_mm256_cvtps_pd(_mm_loadu_ps(y + i)), shift);
    const __m256d in = _mm256_cmp_pd(u, zero, _CMP_GT_OQ);
    const __m256d kept = _mm256_and_pd(in, u);
    count = _mm256_add_pd(count, _mm256_and_pd(in, one));
    total = _mm256_add_pd(total, kept);
    total_sq = _mm256_fmadd_pd(kept, kept, total_sq);
    smallest = _mm256_min_pd(smallest, _mm256_blendv_pd(inf, u, in));
  }
  Support at = scalar_support_at(y + i, size - i, s);
  at.count += lane_sum(count);
  at.total += lane_sum(total);
  at.total_sq += lane_sum(total_sq);
  at.smallest = std::min(at.smallest, lane_min(smallest));
  return at;
}

// Keeps the entries of y above s at its front; returns their number.
template <typename T>
int64_t keep_above(T* y, int64_t size, double s) {
  int64_t kept = 0;
  for (int64_t i = 0; i < size; ++i) {
    y[kept] = y[i];
    kept += static_cast<double>(y[i]) > s;
  }
  return kept;
}

// Newton steps from ``s``, a lower bound of the shifted threshold of y (size entries), with the exact
// finish of threshold.py; false if no step certified (ties, rounding). Entries at or below s can never
// enter the support again: y drops them whenever they are most of it.
template <typename T>
bool newton_threshold(T* y, int64_t size, bool sparsemax, int64_t steps, double slack, double& s) {
  for (int64_t step = 0; step < steps; ++step) {
    const Support at = support_at(y, size, s);
    if (at.count == 0) return false;
    double move;
    bool exact;
    if (sparsemax) {
      move = (at.total - 1) / at.count;
      exact = move >= slack && at.smallest > move;
    } else {
      const double excess = at.total_sq - 1;
      const double discriminant = at.total * at.total - at.count * excess;
      // Smaller root of sum (u - d)^2 = 1 over the support, in the cancellation-free form.
      const double root = excess / (at.total + std::sqrt(std::max(0.0, discriminant)));
      exact = discriminant >= 0 && root >= slack && at.smallest > root;
      move = exact ? root : excess / (2 * at.total);
    }
    if (2 * at.count < size) size = keep_above(y, size, s);
    s += move;
    if (exact) return true;
  }
  return false;
}

// The exact shifted threshold of y from a sort, for rows that Newton does not certify.
template <typename T>
double sorted_threshold(T* y, int64_t size, bool sparsemax) {
  std::sort(y, y + size, std::greater<T>());
  double total = 0, total_sq = 0, threshold = -1;
  for (int64_t i = 0; i < size; ++i) {
    const double size_so_far = static_cast<double>(i + 1), value = y[i];
    total += value;
    total_sq += value * value;
    double candidate;
    if (sparsemax) {
      candidate = (total - 1) / size_so_far;
    } else {
      const double mean = total / size_so_far;
      const double spread = std::max(0.0, (1 - size_so_far * (total_sq / size_so_far - mean * mean)) / size_so_far);
      candidate = mean - std::sqrt(spread);
    }
    if (sparsemax ? candidate >= value : candidate > value) break;
    threshold = candidate;
  }
  return threshold;
}

// The shifted threshold of y (size entries, y at most 0, all above -1), starting from the lower bound
// ``start``; y is reordered.
template <typename T>
double threshold_of(T* y, int64_t size, bool sparsemax, int64_t steps, double start, std::vector<T>& spare) {
  const double slack = -4 * static_cast<double>(std::numeric_limits<T>::epsilon());
  spare.assign(y, y + size);
  double s = start;
  if (newton_threshold(y, size, sparsemax, steps, slack, s)) return s;
  return sorted_threshold(spare.data(), size, sparsemax);
}

// The maxima of the row's blocks of BLOCK entries from block ``first`` on into block_max, their maximum
// into m, and whether they hold NaN or +inf.
template <typename T>
bool scalar_scan_blocks(const T* in, int64_t n, int64_t first, T* block_max, T& m) {
  const T inf = std::numeric_limits<T>::infinity();
  bool invalid = false;
  m = -inf;
  for (int64_t b = first; b * BLOCK < n; ++b) {
    T largest = -inf;
    for (int64_t i = b * BLOCK; i < std::min(n, (b + 1) * BLOCK); ++i) {
      largest = std::max(largest, in[i]);
      invalid |= std::isnan(in[i]) || in[i] == inf;
    }
    block_max[b] = largest;
    m = std::max(m, largest);
  }
  return invalid;
}

template <typename T>
bool scan_blocks(const T* in, int64_t n, T* block_max, T& m) {
  return scalar_scan_blocks(in, n, 0, block_max, m);
}

inline float lane_max(__m256 v) {
  __m128 half = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  half = _mm_max_ps(half, _mm_movehl_ps(half, half));
  return _mm_cvtss_f32(_mm_max_ss(half, _mm_movehdup_ps(half)));
}

template <>
bool scan_blocks<float>(const float* in, int64_t n, float* block_max, float& m) {
  static_assert(BLOCK == 16, "a block is two vectors of 8 floats");
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  __m256 largest = _mm256_set1_ps(-std::numeric_limits<float>::infinity()), bad = _mm256_setzero_ps();
  const int64_t whole = n / BLOCK;
  for (int64_t b = 0; b < whole; ++b) {
    const __m256 low = _mm256_loadu_ps(in + b * BLOCK), high = _mm256_loadu_ps(in + b * BLOCK + 8);
    const __m256 block = _mm256_max_ps(low, high);
    bad = _mm256_or_ps(bad, _mm256_or_ps(_mm256_cmp_ps(low, high, _CMP_UNORD_Q), _mm256_cmp_ps(block, inf, _CMP_EQ_OQ)));
    block_max[b] = lane_max(block);
    largest = _mm256_max_ps(largest, block);
  }
  float tail_max;
  const bool tail_invalid = scalar_scan_blocks(in, n, whole, block_max, tail_max);
  m = std::max(lane_max(largest), tail_max);
  return tail_invalid || _mm256_movemask_ps(bad) != 0;
}

// Entries past this many of the candidates' end may be overwritten while they are gathered.
constexpr int64_t GATHER_SLACK = 8;

// The shifted scores y = (x - m) * scale of the row above ``bound``, from the blocks whose maximum is,
// into y; returns their number. Compared in shifted units: x - m is exact near the maximum, while m plus
// the bound would round to m's precision, which for large scores is coarser than BOUND_MARGIN.
template <typename T>
int64_t gather_candidates(const T* in, int64_t n, const T* block_max, T m, T scale, T bound, T* y) {
  int64_t size = 0;
  for (int64_t b = 0; b * BLOCK < n; ++b) {
    if (!((block_max[b] - m) * scale > bound)) continue;
    for (int64_t i = b * BLOCK; i < std::min(n, (b + 1) * BLOCK); ++i) {
      y[size] = (in[i] - m) * scale;
      size += y[size] > bound;
    }
  }
  return size;
}

// For each mask of 8 lanes, the lanes that are set, first, as a permutation.
struct LeftPack {
  alignas(32) int32_t lanes[256][8];
  LeftPack() {
    for (int mask = 0; mask < 256; ++mask) {
      int next = 0;
      for (int lane = 0; lane < 8; ++lane)
        if (mask & (1 << lane)) lanes[mask][next++] = lane;
      for (; next < 8; ++next) lanes[mask][next] = 0;
    }
  }
};

const LeftPack LEFT_PACK;

template <>
int64_t gather_candidates<float>(const float* in, int64_t n, const float* block_max, float m, float scale,
                                 float bound, float* y) {
  const __m256 row_max = _mm256_set1_ps(m), factor = _mm256_set1_ps(scale), limit = _mm256_set1_ps(bound);
  const int64_t whole = n / 8;
  int64_t size = 0;
  for (int64_t part = 0; part < whole; ++part) {
    if (!((block_max[part * 8 / BLOCK] - m) * scale > bound)) continue;
    const __m256 shifted = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(in + part * 8), row_max), factor);
    const int mask = _mm256_movemask_ps(_mm256_cmp_ps(shifted, limit, _CMP_GT_OQ));
    if (mask == 0) continue;
    const __m256i order = _mm256_load_si256(reinterpret_cast<const __m256i*>(LEFT_PACK.lanes[mask]));
    _mm256_storeu_ps(y + size, _mm256_permutevar8x32_ps(shifted, order));
    size += _mm_popcnt_u32(mask);
  }
  for (int64_t i = whole * 8; i < n; ++i) {
    y[size] = (in[i] - m) * scale;
    size += y[size] > bound;
  }
  return size;
}

template <typename T>
void solve_rows(const T* x, T* weights, T* maxima, T* thresholds, int64_t first, int64_t end, int64_t n,
                bool sparsemax, int64_t steps) {
  const T scale = sparsemax ? T(1) : T(0.5);
  const T inf = std::numeric_limits<T>::infinity();
  const int64_t blocks = (n + BLOCK - 1) / BLOCK;
  std::vector<T> block_max(blocks), candidates(n + GATHER_SLACK), spare;
  for (int64_t row = first; row < end; ++row) {
    const T* in = x + row * n;
    T* out = weights + row * n;
    T m;
    const bool invalid = scan_blocks(in, n, block_max.data(), m);
    if (invalid || m == -inf) {
      // NaN or +inf anywhere makes the row NaN; a row of -inf gets no weight.
      std::fill(out, out + n, invalid ? std::numeric_limits<T>::quiet_NaN() : T(0));
      maxima[row] = 0;
      thresholds[row] = invalid ? std::numeric_limits<T>::quiet_NaN() : inf;
      continue;
    }
    // The threshold of the block maxima, a subset of the row, is a lower bound of the row's (fewer terms
    // in a decreasing sum): entries below it, less a margin for rounding, cannot hold weight.
    int64_t size = 0;
    for (int64_t b = 0; b < blocks; ++b) {
      candidates[size] = (block_max[b] - m) * scale;
      size += candidates[size] > T(-1);
    }
    const double bound = std::max(-1.0, threshold_of(candidates.data(), size, sparsemax, steps, -1.0, spare) - BOUND_MARGIN);
    size = gather_candidates(in, n, block_max.data(), m, scale, static_cast<T>(bound), candidates.data());
    const T shift = static_cast<T>(threshold_of(candidates.data(), size, sparsemax, steps, bound, spare));
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const T u = std::max(T(0), (in[i] - m) * scale - shift);
      out[i] = sparsemax ? u : u * u;
    }
    maxima[row] = m;
    thresholds[row] = shift;
  }
}

// (weights, row maxima m, shifted thresholds s) of rows x (rows, n) for alpha 1.5 or 2, as entmax_rows
// in maps.py returns them; at most newton_steps Newton steps before a row is sorted (threshold.py: 24).
std::tuple<at::Tensor, at::Tensor, at::Tensor> entmax_rows(const at::Tensor& x, double alpha,
                                                           int64_t newton_steps) {
  TORCH_CHECK(x.device().is_cpu(), "entmax_rows runs on the CPU");
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "x must be a contiguous matrix (rows, n)");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble, "x must be float32 or float64");
  TORCH_CHECK(alpha == 1.5 || alpha == 2.0, "alpha must be 1.5 or 2");
  TORCH_CHECK(newton_steps >= 0, "newton_steps must be >= 0");
  const int64_t rows = x.size(0), n = x.size(1);
  auto weights = at::empty_like(x);
  auto maxima = at::empty({rows, 1}, x.options());
  auto thresholds = at::empty({rows, 1}, x.options());
  const bool sparsemax = alpha == 2.0;
  const int64_t grain = std::max<int64_t>(1, (1 << 15) / std::max<int64_t>(n, 1));
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "entmax_rows", [&] {
    const scalar_t* in = x.data_ptr<scalar_t>();
    scalar_t* out = weights.data_ptr<scalar_t>();
    scalar_t* m = maxima.data_ptr<scalar_t>();
    scalar_t* s = thresholds.data_ptr<scalar_t>();
    at::parallel_for(0, rows, grain, [&](int64_t first, int64_t end) {
      solve_rows<scalar_t>(in, out, m, s, first, end, n, sparsemax, newton_steps);
    });
  });
  return {weights, maxima, thresholds};
}

}  // namespace

TORCH_LIBRARY(sparsa_entmax, m) {
  m.def("entmax_rows(Tensor x, float alpha, int newton_steps) -> (Tensor, Tensor, Tensor)", &entmax_rows);
}
