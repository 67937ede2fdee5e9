// The decoder's key sketches against query codes, exact, with each page's largest dot per query.
//
// The int8 sketch (page_max_dots): keys are widened to int16 once per group of 8 and multiplied by every
// query with vpmaddwd: each product is at most 127 * 32767 and a sum of D of them fits in int32 for
// D <= 512, so every result is the exact integer. In both kernels the page maximum is taken in
// registers: the (queries x keys) products are never written to memory.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <immintrin.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace {

constexpr int64_t KEYS_PER_GROUP = 8;
constexpr int64_t LANES = 16;

// The 8 sums of the int32 lanes of a[0..7], in that order.
inline __m256i lane_sums(const __m256i* a) {
  const __m256i s01 = _mm256_hadd_epi32(a[0], a[1]);
  const __m256i s23 = _mm256_hadd_epi32(a[2], a[3]);
  const __m256i s45 = _mm256_hadd_epi32(a[4], a[5]);
  const __m256i s67 = _mm256_hadd_epi32(a[6], a[7]);
  const __m256i t0 = _mm256_hadd_epi32(s01, s23);
  const __m256i t1 = _mm256_hadd_epi32(s45, s67);
  return _mm256_add_epi32(_mm256_permute2x128_si256(t0, t1, 0x20), _mm256_permute2x128_si256(t0, t1, 0x31));
}

inline int32_t lane_max(__m256i v) {
  __m128i m = _mm_max_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0x4E));
  m = _mm_max_epi32(m, _mm_shuffle_epi32(m, 0xB1));
  return _mm_cvtsi128_si32(m);
}

}  // namespace

// Pages [first, end) of codes against every query: Chunks (D / 16) fixed at compile time where it can
// be, so that the loops unroll and the key group stays in the first-level cache.
template <int64_t Chunks>
void pages_against_queries(const int8_t* codes, const int16_t* queries, int32_t* out, int64_t first,
                           int64_t end, int64_t pages, int64_t page_size, int64_t count, int64_t chunks) {
  const int64_t width = Chunks > 0 ? Chunks : chunks;
  const int64_t dim = width * LANES;
  alignas(32) __m256i widened[KEYS_PER_GROUP * (Chunks > 0 ? Chunks : 32)];
  std::vector<__m256i> largest(count);
  for (int64_t page = first; page < end; ++page) {
    for (int64_t q = 0; q < count; ++q) largest[q] = _mm256_set1_epi32(INT32_MIN);
    for (int64_t group = 0; group < page_size; group += KEYS_PER_GROUP) {
      const int8_t* key = codes + (page * page_size + group) * dim;
      for (int64_t k = 0; k < KEYS_PER_GROUP; ++k)
        for (int64_t j = 0; j < width; ++j)
          widened[k * width + j] = _mm256_cvtepi8_epi16(
              _mm_loadu_si128(reinterpret_cast<const __m128i*>(key + k * dim + j * LANES)));
      for (int64_t q = 0; q < count; ++q) {
        const int16_t* query = queries + q * dim;
        __m256i sums[KEYS_PER_GROUP];
        for (int64_t k = 0; k < KEYS_PER_GROUP; ++k) sums[k] = _mm256_setzero_si256();
        for (int64_t j = 0; j < width; ++j) {
          const __m256i part = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(query + j * LANES));
          for (int64_t k = 0; k < KEYS_PER_GROUP; ++k)
            sums[k] = _mm256_add_epi32(sums[k], _mm256_madd_epi16(widened[k * width + j], part));
        }
        largest[q] = _mm256_max_epi32(largest[q], lane_sums(sums));
      }
    }
    for (int64_t q = 0; q < count; ++q) out[q * pages + page] = lane_max(largest[q]);
  }
}

// The coarse sketch: 4-bit key codes c in [-7, 7], stored as c + 8 in nibbles (byte b of each 32-byte
// block j of a key holds dims 64j + b, low, and 64j + 32 + b, high), against int8 query codes u in
// [-127, 127]. vpmaddubsw multiplies 32 byte pairs at once; a pair sums to at most 2 * 15 * 127 = 3810,
// so the int16 sums of up to 8 blocks (256 dims) are exact, then widened to int32 with vpmaddwd.
// The stored offset adds 8 * sum(u), taken off each query's maxima.
constexpr int64_t NIBBLE_BLOCK = 64;
constexpr int64_t INT16_BLOCKS = 8;

template <int64_t Blocks>
void nibble_pages_against_queries(const uint8_t* packed, const int8_t* queries, int32_t* out, int64_t first,
                                  int64_t end, int64_t pages, int64_t page_size, int64_t count,
                                  int64_t blocks) {
  const int64_t width = Blocks > 0 ? Blocks : blocks;
  const int64_t dim = width * NIBBLE_BLOCK, halves = 2 * width;
  alignas(32) __m256i codes[KEYS_PER_GROUP * 2 * (Blocks > 0 ? Blocks : 8)];
  std::vector<__m256i> parts(count * halves);
  std::vector<int32_t> offsets(count);
  for (int64_t q = 0; q < count; ++q) {
    int32_t total = 0;
    for (int64_t d = 0; d < dim; ++d) total += queries[q * dim + d];
    offsets[q] = 8 * total;
    for (int64_t j = 0; j < halves; ++j)
      parts[q * halves + j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(queries + q * dim + j * 32));
  }
  const __m256i low_nibble = _mm256_set1_epi8(0x0F);
  const __m256i ones = _mm256_set1_epi16(1);
  std::vector<__m256i> largest(count);
  for (int64_t page = first; page < end; ++page) {
    for (int64_t q = 0; q < count; ++q) largest[q] = _mm256_set1_epi32(INT32_MIN);
    for (int64_t group = 0; group < page_size; group += KEYS_PER_GROUP) {
      const uint8_t* key = packed + (page * page_size + group) * (dim / 2);
      for (int64_t k = 0; k < KEYS_PER_GROUP; ++k)
        for (int64_t j = 0; j < width; ++j) {
          const __m256i both = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + k * (dim / 2) + j * 32));
          codes[k * halves + 2 * j] = _mm256_and_si256(both, low_nibble);
          codes[k * halves + 2 * j + 1] = _mm256_and_si256(_mm256_srli_epi16(both, 4), low_nibble);
        }
      for (int64_t q = 0; q < count; ++q) {
        const __m256i* part = parts.data() + q * halves;
        __m256i sums[KEYS_PER_GROUP];
        for (int64_t k = 0; k < KEYS_PER_GROUP; ++k) {
          __m256i total = _mm256_setzero_si256();
          for (int64_t start = 0; start < halves; start += INT16_BLOCKS) {
            const int64_t stop = start + INT16_BLOCKS < halves ? start + INT16_BLOCKS : halves;
            __m256i short_sum = _mm256_maddubs_epi16(codes[k * halves + start], part[start]);
            for (int64_t j = start + 1; j < stop; ++j)
              short_sum = _mm256_add_epi16(short_sum, _mm256_maddubs_epi16(codes[k * halves + j], part[j]));
            total = _mm256_add_epi32(total, _mm256_madd_epi16(short_sum, ones));
          }
          sums[k] = total;
        }
        largest[q] = _mm256_max_epi32(largest[q], lane_sums(sums));
      }
    }
    for (int64_t q = 0; q < count; ++q) out[q * pages + page] = lane_max(largest[q]) - offsets[q];
  }
}

// Pages [0, pages) split across threads; run(fixed, first, end) gets the width fixed at compile time
// where it is Small or Large (0 otherwise), so that the kernel's loops unroll for the common D.
template <int64_t Small, int64_t Large, typename Run>
void over_pages(int64_t pages, int64_t width, const Run& run) {
  at::parallel_for(0, pages, 16, [&](int64_t first, int64_t end) {
    if (width == Small) {
      run(std::integral_constant<int64_t, Small>{}, first, end);
    } else if (width == Large) {
      run(std::integral_constant<int64_t, Large>{}, first, end);
    } else {
      run(std::integral_constant<int64_t, 0>{}, first, end);
    }
  });
}

at::Tensor page_max_nibble_dots(const at::Tensor& packed, const at::Tensor& queries, int64_t page_size) {
  TORCH_CHECK(packed.device().is_cpu() && queries.device().is_cpu(), "page_max_nibble_dots runs on the CPU");
  TORCH_CHECK(packed.dim() == 2 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "packed must be a contiguous uint8 matrix (N, D / 2)");
  TORCH_CHECK(queries.dim() == 2 && queries.scalar_type() == at::kChar && queries.is_contiguous(),
              "queries must be a contiguous int8 matrix (Q, D)");
  const int64_t keys = packed.size(0), dim = queries.size(1), count = queries.size(0);
  TORCH_CHECK(packed.size(1) * 2 == dim && dim % NIBBLE_BLOCK == 0 && dim <= 512,
              "queries must have twice the packed width, a multiple of 64 and at most 512");
  TORCH_CHECK(page_size % KEYS_PER_GROUP == 0 && keys % page_size == 0, "pages of a multiple of 8 keys");
  const int64_t pages = keys / page_size, blocks = dim / NIBBLE_BLOCK;
  auto out = at::empty({count, pages}, packed.options().dtype(at::kInt));
  const uint8_t* packed_data = packed.data_ptr<uint8_t>();
  const int8_t* query_data = queries.data_ptr<int8_t>();
  int32_t* out_data = out.data_ptr<int32_t>();
  over_pages<1, 2>(pages, blocks, [&](auto fixed, int64_t first, int64_t end) {
    nibble_pages_against_queries<decltype(fixed)::value>(packed_data, query_data, out_data, first, end, pages,
                                                         page_size, count, blocks);
  });
  return out;
}

at::Tensor page_max_dots(const at::Tensor& codes, const at::Tensor& queries, int64_t page_size) {
  TORCH_CHECK(codes.device().is_cpu() && queries.device().is_cpu(), "page_max_dots runs on the CPU");
  TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kChar && codes.is_contiguous(),
              "codes must be a contiguous int8 matrix (N, D)");
  TORCH_CHECK(queries.dim() == 2 && queries.scalar_type() == at::kShort && queries.is_contiguous(),
              "queries must be a contiguous int16 matrix (Q, D)");
  const int64_t keys = codes.size(0), dim = codes.size(1), count = queries.size(0);
  TORCH_CHECK(queries.size(1) == dim && dim % LANES == 0 && dim <= 512,
              "queries must have the codes' D, a multiple of 16 and at most 512");
  TORCH_CHECK(page_size % KEYS_PER_GROUP == 0 && keys % page_size == 0, "pages of a multiple of 8 keys");
  const int64_t pages = keys / page_size, chunks = dim / LANES;
  auto out = at::empty({count, pages}, codes.options().dtype(at::kInt));
  const int8_t* code_data = codes.data_ptr<int8_t>();
  const int16_t* query_data = queries.data_ptr<int16_t>();
  int32_t* out_data = out.data_ptr<int32_t>();
  over_pages<4, 8>(pages, chunks, [&](auto fixed, int64_t first, int64_t end) {
    pages_against_queries<decltype(fixed)::value>(code_data, query_data, out_data, first, end, pages, page_size,
                                                  count, chunks);
  });
  return out;
}

TORCH_LIBRARY(sparsa_sketch, m) {
  m.def("page_max_dots(Tensor codes, Tensor queries, int page_size) -> Tensor", &page_max_dots);
  m.def("page_max_nibble_dots(Tensor packed, Tensor queries, int page_size) -> Tensor", &page_max_nibble_dots);
}
