/* NF4 quantization of full blocks: spec/FORMAT.md section 2, in C.
 *
 * Built by nf4convert/native.py at first use (cc -O3 -shared -fPIC -ffp-contract=off) and called
 * through ctypes, which releases the GIL: Python threads run it on disjoint block ranges.
 *
 * Bit-exactness with bitsandbytes rests on doing the spec's float32 operations and nothing else:
 *   absmax = max |x| (compared as integers: for non-negative IEEE floats the order is the same,
 *            and a NaN sorts above +Inf, so a non-finite block always gives a non-finite absmax);
 *   inv    = 1.0f / max(absmax, floor);  v = x * inv  (IEEE single, no fused operations);
 *   code   = the number of thresholds t[i] with t[i] < v  (ties go to the lower code).
 * Clamping v to [-1, 1] cannot change a code (every threshold lies inside), so it is left out.
 * The thresholds and the floor come from the caller (nf4convert/constants.py), not from here.
 *
 * Three paths give the same bytes: AVX-512 (F and BW, for nf4_quantize_blocks and nf4_decode_fp8),
 * AVX2 (with F16C) and portable C, chosen at run time by what the CPU has. The `simd` argument caps the path: 0 portable,
 * 1 AVX2, 2 AVX-512 (for the tests, which compare them).
 *
 * The functions that read a source (nf4_quantize_blocks, nf4_decode_fp8, nf4_search_blocks,
 * nf4_encode_blocks) may read a memory-mapped file: they return 0, or -1 where the file shrank
 * under the mapping (SIGBUS, caught by nf4_guard's handler), with their output unfinished.
 */
#include <stdint.h>
#include <string.h>

enum { NF4_F32 = 0, NF4_F16 = 1, NF4_BF16 = 2 };

static float bits_to_float(uint32_t u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* IEEE half -> single, exact for every value (subnormals, Inf, NaN). */
static uint32_t half_to_single_bits(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    if (exp == 0x1F) return sign | 0x7F800000 | (man << 13);
    if (exp != 0) return sign | ((exp + 112) << 23) | (man << 13);
    if (man == 0) return sign;
    exp = 113; /* subnormal: normalize */
    while (!(man & 0x400)) {
        man <<= 1;
        exp--;
    }
    return sign | (exp << 23) | ((man & 0x3FF) << 13);
}

static uint32_t element_bits(const void *src, int dtype, int64_t i) {
    if (dtype == NF4_F32) return ((const uint32_t *)src)[i];
    uint16_t h = ((const uint16_t *)src)[i];
    return dtype == NF4_BF16 ? (uint32_t)h << 16 : half_to_single_bits(h);
}

static float scale(float absmax, float floor) { return 1.0f / (absmax > floor ? absmax : floor); }

static void blocks_portable(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                            const float *t, float floor, uint8_t *packed, float *absmax) {
    float v[4096]; /* one block; loops simple enough for the compiler to vectorize */
    uint8_t codes[4096];
    for (int64_t b = first; b < first + count; b++) {
        int64_t base = b * bs;
        uint32_t m = 0;
        for (int64_t i = 0; i < bs; i++) {
            uint32_t a = element_bits(src, dtype, base + i) & 0x7FFFFFFF;
            m = a > m ? a : m;
        }
        absmax[b] = bits_to_float(m);
        float inv = scale(absmax[b], floor);
        for (int64_t i = 0; i < bs; i++) {
            v[i] = bits_to_float(element_bits(src, dtype, base + i)) * inv;
            codes[i] = 0;
        }
        for (int k = 0; k < 15; k++)
            for (int64_t i = 0; i < bs; i++) codes[i] += t[k] < v[i];
        for (int64_t i = 0; i < bs; i += 2) packed[(base + i) / 2] = (uint8_t)(codes[i] << 4 | codes[i + 1]);
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define NF4_AVX2 __attribute__((target("avx2,f16c")))

/* The block's absmax as float32 bits: integer max of |x| bits, 256 bits at a time. */
NF4_AVX2 static uint32_t absmax_bits_avx2(const void *src, int dtype, int64_t base, int64_t bs) {
    if (dtype == NF4_F32) {
        const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
        __m256i m = _mm256_setzero_si256();
        for (int64_t i = 0; i < bs; i += 8)
            m = _mm256_max_epi32(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)((const uint32_t *)src + base + i)), mask));
        __m128i h = _mm_max_epi32(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
        h = _mm_max_epi32(h, _mm_shuffle_epi32(h, 0x4E));
        return (uint32_t)_mm_cvtsi128_si32(_mm_max_epi32(h, _mm_shuffle_epi32(h, 0xB1)));
    }
    const __m256i mask = _mm256_set1_epi16(0x7FFF);
    __m256i m = _mm256_setzero_si256();
    for (int64_t i = 0; i < bs; i += 16)
        m = _mm256_max_epu16(m, _mm256_and_si256(_mm256_loadu_si256((const __m256i *)((const uint16_t *)src + base + i)), mask));
    __m128i h = _mm_max_epu16(_mm256_castsi256_si128(m), _mm256_extracti128_si256(m, 1));
    h = _mm_max_epu16(h, _mm_shuffle_epi32(h, 0x4E));
    h = _mm_max_epu16(h, _mm_shuffle_epi32(h, 0xB1));
    uint16_t r = (uint16_t)_mm_extract_epi16(_mm_max_epu16(h, _mm_srli_epi32(h, 16)), 0);
    return dtype == NF4_BF16 ? (uint32_t)r << 16 : half_to_single_bits(r);
}

NF4_AVX2 static __m256 load8_avx2(const void *src, int dtype, int64_t i) {
    if (dtype == NF4_F32) return _mm256_loadu_ps((const float *)src + i);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)src + i));
    if (dtype == NF4_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

/* The thresholds and the levels as vectors: t[3], t[7], t[11] broadcast, and 4-entry tables indexed by
 * the code's top two bits, k = code >> 2, repeated in both 128-bit lanes for in-lane permutes:
 * t_r = (t[r], t[4 + r], t[8 + r], t[12 + r]) and c_r likewise. */
typedef struct {
    const float *t, *c; /* for scalar tails */
    __m256 t3, t7, t11, t_0, t_1, t_2, c_0, c_1, c_2, c_3;
} levels_avx2;

NF4_AVX2 static __m256 table4(const float *v, int r) { return _mm256_setr_ps(v[r], v[4 + r], v[8 + r], v[12 + r], v[r], v[4 + r], v[8 + r], v[12 + r]); }

NF4_AVX2 static void levels_for_avx2(const float *t, const float *c, levels_avx2 *L) {
    L->t = t, L->c = c;
    L->t3 = _mm256_set1_ps(t[3]), L->t7 = _mm256_set1_ps(t[7]), L->t11 = _mm256_set1_ps(t[11]);
    L->t_0 = table4(t, 0), L->t_1 = table4(t, 1), L->t_2 = table4(t, 2);
    if (c) L->c_0 = table4(c, 0), L->c_1 = table4(c, 1), L->c_2 = table4(c, 2), L->c_3 = table4(c, 3);
}

/* The code of 8 scaled values by a binary search over the 15 thresholds: t[7], then t[3] or t[11],
 * give the top two bits, k = code >> 2 (int32 lanes, 0 to 3); then t[4k + 1] gives bit 1, and
 * t[4k + 2 bit1] bit 0 (as masks). */
NF4_AVX2 static inline __m256i search_avx2(const levels_avx2 *L, __m256 v, __m256 *bit1, __m256 *bit0) {
    __m256 gt7 = _mm256_cmp_ps(v, L->t7, _CMP_GT_OQ);
    __m256 gt2 = _mm256_cmp_ps(v, _mm256_blendv_ps(L->t3, L->t11, gt7), _CMP_GT_OQ);
    __m256i k = _mm256_sub_epi32(_mm256_and_si256(_mm256_castps_si256(gt7), _mm256_set1_epi32(2)), _mm256_castps_si256(gt2));
    *bit1 = _mm256_cmp_ps(v, _mm256_permutevar_ps(L->t_1, k), _CMP_GT_OQ);
    __m256 last = _mm256_blendv_ps(_mm256_permutevar_ps(L->t_0, k), _mm256_permutevar_ps(L->t_2, k), *bit1);
    *bit0 = _mm256_cmp_ps(v, last, _CMP_GT_OQ);
    return k;
}

/* Codes of 8 scaled values as int32 lanes: the number of thresholds below each. */
NF4_AVX2 static __m256i codes8_avx2(const levels_avx2 *L, __m256 v) {
    __m256 bit1, bit0;
    __m256i k = search_avx2(L, v, &bit1, &bit0);
    __m256i low = _mm256_or_si256(_mm256_and_si256(_mm256_castps_si256(bit1), _mm256_set1_epi32(2)), _mm256_srli_epi32(_mm256_castps_si256(bit0), 31));
    return _mm256_or_si256(_mm256_slli_epi32(k, 2), low);
}

/* 32 int32 codes -> 32 bytes in order -> 16 bytes of (first << 4 | second). */
NF4_AVX2 static void pack32_avx2(const __m256i q[4], uint8_t *packed) {
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i high_then_low = _mm256_set1_epi16(0x0110); /* byte weights 16, 1 */
    __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(q[0], q[1]), _mm256_packus_epi32(q[2], q[3]));
    bytes = _mm256_permutevar8x32_epi32(bytes, order);
    __m256i pairs = _mm256_maddubs_epi16(bytes, high_then_low);
    pairs = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);
    _mm_storeu_si128((__m128i *)packed, _mm256_castsi256_si128(pairs));
}

NF4_AVX2 static void blocks_avx2(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                                 const float *t, float floor, uint8_t *packed, float *absmax) {
    levels_avx2 L;
    levels_for_avx2(t, NULL, &L);
    const __m256 ones = _mm256_set1_ps(1.0f), floors = _mm256_set1_ps(floor);
    for (int64_t b0 = first; b0 < first + count; b0 += 8) { /* 8 blocks: their absmax, then 8 reciprocals at once */
        int nb = first + count - b0 < 8 ? (int)(first + count - b0) : 8;
        float a[8] = {0}, inv[8];
        for (int j = 0; j < nb; j++) a[j] = absmax[b0 + j] = bits_to_float(absmax_bits_avx2(src, dtype, (b0 + j) * bs, bs));
        /* scale(): max_ps gives the floor where absmax is NaN or below it, as the scalar comparison does */
        _mm256_storeu_ps(inv, _mm256_div_ps(ones, _mm256_max_ps(_mm256_loadu_ps(a), floors)));
        for (int j = 0; j < nb; j++) {
            int64_t base = (b0 + j) * bs;
            const __m256 scale8 = _mm256_set1_ps(inv[j]);
            for (int64_t i = 0; i < bs; i += 32) {
                __m256i c[4];
                for (int k = 0; k < 4; k++)
                    c[k] = codes8_avx2(&L, _mm256_mul_ps(load8_avx2(src, dtype, base + i + 8 * k), scale8));
                pack32_avx2(c, packed + (base + i) / 2);
            }
        }
    }
}

#define NF4_AVX512 __attribute__((target("avx512f,avx512bw,avx2,f16c")))

/* 16 elements as float32 (exact). */
NF4_AVX512 static __m512 load16_avx512(const void *src, int dtype, int64_t i) {
    if (dtype == NF4_F32) return _mm512_loadu_ps((const float *)src + i);
    __m256i h = _mm256_loadu_si256((const __m256i *)((const uint16_t *)src + i));
    if (dtype == NF4_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* absmax_bits_avx2, 512 bits at a time. */
NF4_AVX512 static uint32_t absmax_bits_avx512(const void *src, int dtype, int64_t base, int64_t bs) {
    if (dtype == NF4_F32) {
        const __m512i mask = _mm512_set1_epi32(0x7FFFFFFF);
        __m512i m = _mm512_setzero_si512();
        for (int64_t i = 0; i < bs; i += 16)
            m = _mm512_max_epu32(m, _mm512_and_si512(_mm512_loadu_si512((const uint32_t *)src + base + i), mask));
        return (uint32_t)_mm512_reduce_max_epu32(m);
    }
    const __m512i mask = _mm512_set1_epi16(0x7FFF);
    __m512i m = _mm512_setzero_si512();
    for (int64_t i = 0; i < bs; i += 32) m = _mm512_max_epu16(m, _mm512_and_si512(_mm512_loadu_si512((const uint16_t *)src + base + i), mask));
    /* the largest uint16 lane: widen both halves to uint32 lanes */
    __m512i wide = _mm512_max_epu32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(m)), _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(m, 1)));
    uint16_t r = (uint16_t)_mm512_reduce_max_epu32(wide);
    return dtype == NF4_BF16 ? (uint32_t)r << 16 : half_to_single_bits(r);
}

/* The same codes as blocks_avx2, 16 at a time: a binary search over the 15 thresholds, each step one
 * 16-entry table lookup (t[k + 3], t[k + 1], t[k] for the code so far, k) and one comparison: the
 * count of thresholds below v, as in blocks_portable. */
NF4_AVX512 static void blocks_avx512(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                                     const float *t, float floor, uint8_t *packed, float *absmax) {
    float padded[19]; /* the thresholds, then +Inf (never looked up: every index stays below 15) */
    for (int k = 0; k < 19; k++) padded[k] = k < 15 ? t[k] : __builtin_inff();
    const __m512 t7 = _mm512_set1_ps(t[7]), from0 = _mm512_loadu_ps(padded), from1 = _mm512_loadu_ps(padded + 1), from3 = _mm512_loadu_ps(padded + 3);
    const __m512i eight = _mm512_set1_epi32(8), four = _mm512_set1_epi32(4), two = _mm512_set1_epi32(2), one = _mm512_set1_epi32(1);
    const __m512 ones = _mm512_set1_ps(1.0f), floors = _mm512_set1_ps(floor);
    for (int64_t b0 = first; b0 < first + count; b0 += 16) { /* 16 blocks: their absmax, then 16 reciprocals at once */
        int nb = first + count - b0 < 16 ? (int)(first + count - b0) : 16;
        float inv[16];
        for (int j = 0; j < nb; j++) absmax[b0 + j] = bits_to_float(absmax_bits_avx512(src, dtype, (b0 + j) * bs, bs));
        /* scale(): max_ps gives the floor where absmax is NaN or below it, as the scalar comparison does */
        __mmask16 live = (__mmask16)((1u << nb) - 1);
        _mm512_storeu_ps(inv, _mm512_div_ps(ones, _mm512_max_ps(_mm512_maskz_loadu_ps(live, absmax + b0), floors)));
        for (int j = 0; j < nb; j++) {
            int64_t base = (b0 + j) * bs;
            const __m512 scale16 = _mm512_set1_ps(inv[j]);
            for (int64_t i = 0; i < bs; i += 16) {
                __m512 v = _mm512_mul_ps(load16_avx512(src, dtype, base + i), scale16);
                __m512i k = _mm512_maskz_mov_epi32(_mm512_cmp_ps_mask(v, t7, _CMP_GT_OQ), eight);
                k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(k, from3), _CMP_GT_OQ), k, four);
                k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(k, from1), _CMP_GT_OQ), k, two);
                k = _mm512_mask_add_epi32(k, _mm512_cmp_ps_mask(v, _mm512_permutexvar_ps(k, from0), _CMP_GT_OQ), k, one);
                /* 64-bit lane m holds codes 2m (low half) and 2m + 1: its low byte becomes (2m << 4 | 2m + 1) */
                __m512i pairs = _mm512_or_si512(_mm512_slli_epi64(k, 4), _mm512_srli_epi64(k, 32));
                _mm_storel_epi64((__m128i *)(packed + (base + i) / 2), _mm512_cvtepi64_epi8(pairs));
            }
        }
    }
}

/* The best path this CPU runs: 2 AVX-512 (F and BW), 1 AVX2 (with F16C), 0 portable C. */
int nf4_simd(void) {
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("f16c")) return 0;
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") ? 2 : 1;
}
#else
int nf4_simd(void) { return 0; }
#endif

/* Quantize blocks [first, first + count) of `bs` elements (bs a multiple of 32) of `src`
 * (dtype NF4_F32/F16/BF16) into `packed` (bs / 2 bytes a block) and `absmax` (one float a block);
 * `thresholds` holds the 15 float32 thresholds in increasing order. Uses the best SIMD path the CPU
 * has, up to level `simd` (see the top). */
static void quantize_blocks(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                            const float *thresholds, float floor, uint8_t *packed, float *absmax, int simd) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    int level = simd < nf4_simd() ? simd : nf4_simd();
    if (level >= 2) {
        blocks_avx512(src, dtype, first, count, bs, thresholds, floor, packed, absmax);
        return;
    }
    if (level == 1) {
        blocks_avx2(src, dtype, first, count, bs, thresholds, floor, packed, absmax);
        return;
    }
#endif
    (void)simd;
    blocks_portable(src, dtype, first, count, bs, thresholds, floor, packed, absmax);
}

/* Double quantization (spec section 3), step 1: the significands of `n` non-negative finite
 * floats summed by biased exponent, `sums[e]` (with the implicit bit where e > 0), so that the
 * exact sum is sum(sums[e] << max(e, 1)) / 2^150. Exact while n < 2^39. */
void nf4_exponent_sums(const float *v, int64_t n, int64_t *sums) {
    int64_t lanes[4][256] = {{0}}; /* four partial sums: neighbours mostly share an exponent */
    for (int64_t i = 0; i < n; i++) {
        uint32_t u;
        memcpy(&u, v + i, sizeof u);
        uint32_t e = (u >> 23) & 0xFF, m = u & 0x7FFFFF;
        lanes[i & 3][e] += e ? (m | 0x800000) : m;
    }
    for (int e = 0; e < 256; e++) sums[e] = lanes[0][e] + lanes[1][e] + lanes[2][e] + lanes[3][e];
}

/* An order-preserving map of float32 bits to uint32: a < b as floats iff key(a) < key(b)
 * (for non-NaN values, with -0 just below +0, which no threshold separates). */
static uint32_t order_key(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u >> 31 ? ~u : u | 0x80000000u;
}

enum { NESTED_BUCKET_SHIFT = 18, NESTED_BUCKETS = 1 << (32 - NESTED_BUCKET_SHIFT) };

/* Double quantization, step 2: d = absmax[i] - offset, blockwise over `nested_bs` values to the
 * count of the 255 `thresholds` below the scaled value. A full block is scaled by
 * 1 / max(its max |d|, floor) and stores max |d|; a partial last block is divided by
 * m = max(max |d|, floor) and stores m.
 * The count is found through a table over the top bits of order_key(v): the number of
 * thresholds below the bucket, then a comparison with each threshold inside the bucket. */
void nf4_quantize_nested(const float *absmax, int64_t n, int64_t nested_bs, float offset,
                         const float *thresholds, float floor, uint8_t *codes, float *nested) {
    uint8_t below[NESTED_BUCKETS];
    float t[2 * 255]; /* padded with +Inf: a bucket's comparisons never run off the end */
    int per_bucket = 0;
    for (int k = 0; k < 2 * 255; k++) t[k] = k < 255 ? thresholds[k] : __builtin_inff();
    for (int64_t b = 0, k = 0; b < NESTED_BUCKETS; b++) {
        while (k < 255 && (order_key(t[k]) >> NESTED_BUCKET_SHIFT) < (uint64_t)b) k++;
        below[b] = (uint8_t)k;
    }
    for (int k = 0, run = 0; k < 255; k++) {
        run = k && (order_key(t[k]) >> NESTED_BUCKET_SHIFT) == (order_key(t[k - 1]) >> NESTED_BUCKET_SHIFT) ? run + 1 : 1;
        per_bucket = run > per_bucket ? run : per_bucket;
    }
    for (int64_t b = 0; b * nested_bs < n; b++) {
        int64_t start = b * nested_bs, end = start + nested_bs < n ? start + nested_bs : n;
        int full = end - start == nested_bs;
        uint32_t m_bits = 0; /* max |d|, compared as integers (see absmax above) */
        for (int64_t i = start; i < end; i++) {
            float d = absmax[i] - offset;
            uint32_t u;
            memcpy(&u, &d, sizeof u);
            u &= 0x7FFFFFFF;
            m_bits = u > m_bits ? u : m_bits;
        }
        float m = bits_to_float(m_bits), divisor = m > floor ? m : floor, inv = 1.0f / divisor;
        nested[b] = full ? m : divisor;
        for (int64_t i = start; i < end; i++) {
            float d = absmax[i] - offset, v = full ? d * inv : d / divisor;
            int pos = below[order_key(v) >> NESTED_BUCKET_SHIFT];
            const float *candidates = t + pos;
            for (int j = 0; j < per_bucket; j++) pos += candidates[j] < v;
            codes[i] = (uint8_t)pos;
        }
    }
}

/* Block-scaled FP8 sources (spec section 6.3): the float32 value of one E4M3 code (sign, 4 exponent
 * bits of bias 7, 3 significand bits; no infinities; S.1111.111 is NaN), branch-free so that loops
 * over it vectorize. */
static inline float fp8_e4m3(uint8_t b) {
    uint32_t sign = (uint32_t)(b & 0x80) << 24, e = (b >> 3) & 0xF, m = b & 7;
    uint32_t normal = sign | ((e + 120) << 23) | (m << 20);
    float sub = (float)m * 0x1p-9f, v;
    uint32_t sub_bits;
    memcpy(&sub_bits, &sub, sizeof sub_bits);
    sub_bits |= sign;
    uint32_t bits = e ? normal : sub_bits;
    bits = (e == 15 && m == 7) ? 0x7FC00000u : bits;
    memcpy(&v, &bits, sizeof v);
    return v;
}

/* One FP8 row `qr` of `cols` codes (its block scales `srow`, one per `bc` columns) into `o`. */
static void fp8_row_portable(const uint8_t *qr, const float *srow, int64_t cols, int64_t bc, float *o) {
    for (int64_t c = 0; c < cols; c++) o[c] = fp8_e4m3(qr[c]) * srow[c / bc];
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The same, 8 codes at a time: fp8_e4m3's bit arithmetic on 32-bit lanes. */
NF4_AVX2 static void fp8_row_avx2(const uint8_t *qr, const float *srow, int64_t cols, int64_t bc, float *o) {
    const __m256i k80 = _mm256_set1_epi32(0x80), k7f = _mm256_set1_epi32(0x7F), kf = _mm256_set1_epi32(0xF);
    const __m256i k7 = _mm256_set1_epi32(7), k120 = _mm256_set1_epi32(120), knan = _mm256_set1_epi32(0x7FC00000);
    const __m256 ksub = _mm256_set1_ps(0x1p-9f);
    for (int64_t c = 0; c < cols;) {
        int64_t end = c + bc < cols ? c + bc : cols;
        float s = srow[c / bc];
        __m256 vs = _mm256_set1_ps(s);
        for (; c + 8 <= end; c += 8) {
            int64_t eight;
            memcpy(&eight, qr + c, sizeof eight);
            __m256i b = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(eight));
            __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, k80), 24);
            __m256i e = _mm256_and_si256(_mm256_srli_epi32(b, 3), kf), m = _mm256_and_si256(b, k7);
            __m256i normal = _mm256_or_si256(sign, _mm256_or_si256(_mm256_slli_epi32(_mm256_add_epi32(e, k120), 23), _mm256_slli_epi32(m, 20)));
            __m256i sub = _mm256_or_si256(_mm256_castps_si256(_mm256_mul_ps(_mm256_cvtepi32_ps(m), ksub)), sign);
            __m256i bits = _mm256_blendv_epi8(normal, sub, _mm256_cmpeq_epi32(e, _mm256_setzero_si256()));
            bits = _mm256_blendv_epi8(bits, knan, _mm256_cmpeq_epi32(_mm256_and_si256(b, k7f), k7f));
            _mm256_storeu_ps(o + c, _mm256_mul_ps(_mm256_castsi256_ps(bits), vs));
        }
        for (; c < end; c++) o[c] = fp8_e4m3(qr[c]) * s;
    }
}

/* The same, 16 codes at a time, with masks: a normal code's magnitude bits moved into place and
 * rebiased (<< 20, + 120 << 23), a subnormal one's significand times 2^-9, then the sign; NaN last,
 * positive, as fp8_e4m3 gives it. */
NF4_AVX512 static void fp8_row_avx512(const uint8_t *qr, const float *srow, int64_t cols, int64_t bc, float *o) {
    const __m512i k80 = _mm512_set1_epi32(0x80), k7f = _mm512_set1_epi32(0x7F), k8 = _mm512_set1_epi32(8);
    const __m512i kbias = _mm512_set1_epi32(120 << 23), knan = _mm512_set1_epi32(0x7FC00000);
    const __m512 ksub = _mm512_set1_ps(0x1p-9f);
    for (int64_t c = 0; c < cols;) {
        int64_t end = c + bc < cols ? c + bc : cols;
        float s = srow[c / bc];
        __m512 vs = _mm512_set1_ps(s);
        for (; c + 16 <= end; c += 16) {
            __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(qr + c)));
            __m512i mag = _mm512_and_si512(b, k7f);
            __m512i bits = _mm512_add_epi32(_mm512_slli_epi32(mag, 20), kbias);
            bits = _mm512_mask_mov_epi32(bits, _mm512_cmplt_epi32_mask(mag, k8), _mm512_castps_si512(_mm512_mul_ps(_mm512_cvtepi32_ps(mag), ksub)));
            bits = _mm512_or_si512(bits, _mm512_slli_epi32(_mm512_and_si512(b, k80), 24));
            bits = _mm512_mask_mov_epi32(bits, _mm512_cmpeq_epi32_mask(mag, k7f), knan);
            _mm512_storeu_ps(o + c, _mm512_mul_ps(_mm512_castsi512_ps(bits), vs));
        }
        for (; c < end; c++) o[c] = fp8_e4m3(qr[c]) * s;
    }
}
#endif

static void fp8_row(const uint8_t *qr, const float *srow, int64_t cols, int64_t bc, float *o, int simd) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    int level = simd < nf4_simd() ? simd : nf4_simd();
    if (level >= 2) {
        fp8_row_avx512(qr, srow, cols, bc, o);
        return;
    }
    if (level == 1) {
        fp8_row_avx2(qr, srow, cols, bc, o);
        return;
    }
#endif
    (void)simd;
    fp8_row_portable(qr, srow, cols, bc, o);
}

/* Rows [0, rows) of an FP8 weight of `cols` columns, the first being row `first_row` of the
 * weight, decoded to float32: out[r][c] = value(q[r][c]) * scale[(first_row + r) / br][c / bc],
 * one IEEE single multiply. */
static void decode_fp8(const uint8_t *q, int64_t rows, int64_t cols, const float *scale, int64_t scale_cols,
                       int64_t first_row, int64_t br, int64_t bc, float *out, int simd) {
    for (int64_t r = 0; r < rows; r++) fp8_row(q + r * cols, scale + ((first_row + r) / br) * scale_cols, cols, bc, out + r * cols, simd);
}

/* --scales search (spec section 2.6), portable and AVX2: every float operation and its order are
 * fixed (8 lanes of partial sums, added in a fixed tree), so both give the same bytes. */

/* Eight partial sums (lane i % 8), added in a fixed tree: the same result on every machine. */
static float lanes_sum(const float l[8]) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

/* The code of one value: the number of thresholds below it. */
static uint8_t code_of(float v, const float *t) {
    uint8_t k = 0;
    for (int m = 0; m < 15; m++) k += t[m] < v;
    return k;
}

/* The thresholds and the levels, as the portable path uses them. */
typedef struct {
    const float *t, *c;
} levels_portable;

/* Codes of x[0..n) * inv, packed (the high nibble first; an odd n pads with code 7). */
static void encode_portable(const void *levels, const float *x, int64_t n, float inv, uint8_t *packed) {
    const float *t = ((const levels_portable *)levels)->t;
    for (int64_t i = 0; i < n; i += 2)
        packed[i / 2] = (uint8_t)(code_of(x[i] * inv, t) << 4 | (i + 1 < n ? code_of(x[i + 1] * inv, t) : 7));
}

/* A candidate's sums over x[0..n) (n a multiple of 8; padding zeros add nothing): with codes q for
 * x * inv, A = sum wx c[q] and D = sum w (c[q] c[q]), where wx = fl(w x). Unweighted (w NULL), the
 * terms are x c[q] and c[q] c[q]: what weights of 1 give, exactly. */
static void candidate_portable(const void *levels, const float *x, const float *wx, const float *w, int64_t n, float inv,
                               float *A, float *D) {
    const levels_portable *L = levels;
    float a[8] = {0}, d[8] = {0};
    for (int64_t i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) {
            float cq = L->c[code_of(x[i + j] * inv, L->t)];
            a[j] += (w ? wx[i + j] : x[i + j]) * cq;
            d[j] += w ? w[i + j] * (cq * cq) : cq * cq;
        }
    *A = lanes_sum(a);
    *D = lanes_sum(d);
}

/* candidate_portable for `nb` blocks of n values each, block i at x + i n with reciprocal inv[i]. */
static void candidates_portable(const void *levels, const float *x, const float *wx, const float *w, int64_t n, int nb,
                                const float *inv, float *A, float *D) {
    for (int i = 0; i < nb; i++) candidate_portable(levels, x + i * n, wx + i * n, w ? w + i * n : NULL, n, inv[i], A + i, D + i);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* Whole groups of 8 of x[0..len), and the largest of their |x| bits in *max_bits; returns how many
 * values it loaded. */
NF4_AVX2 static int64_t load_block_avx2(const void *src, int dtype, int64_t base, int64_t len, float *x, uint32_t *max_bits) {
    const __m256i mask = _mm256_set1_epi32(0x7FFFFFFF);
    __m256i m = _mm256_setzero_si256();
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) {
        __m256 v = load8_avx2(src, dtype, base + i);
        _mm256_storeu_ps(x + i, v);
        m = _mm256_max_epu32(m, _mm256_and_si256(_mm256_castps_si256(v), mask));
    }
    uint32_t lanes[8];
    _mm256_storeu_si256((__m256i *)lanes, m);
    for (int k = 0; k < 8; k++) *max_bits = lanes[k] > *max_bits ? lanes[k] : *max_bits;
    return i;
}

NF4_AVX2 static void encode_avx2(const void *levels, const float *x, int64_t n, float inv, uint8_t *packed) {
    const levels_avx2 *L = levels;
    const __m256 vinv = _mm256_set1_ps(inv);
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = codes8_avx2(L, _mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * k), vinv));
        pack32_avx2(q, packed + i / 2);
    }
    levels_portable scalar = {L->t, L->c};
    encode_portable(&scalar, x + i, n - i, inv, packed + i / 2);
}

/* candidate_portable on 8 lanes. The code's level comes from search_avx2's parts: k picks the level of
 * each table c_r, bit 1 and bit 0 the table. The two lane sums are added in lanes_sum's tree: hadd
 * adds neighbours, twice, then the halves are added. */
NF4_AVX2 static inline void candidate_avx2(const levels_avx2 *L, const float *x, const float *wx, const float *w, int64_t n,
                                           float inv, float *A, float *D, int weighted) {
    const __m256 vinv = _mm256_set1_ps(inv);
    __m256 a = _mm256_setzero_ps(), d = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i), v = _mm256_mul_ps(xv, vinv);
        __m256 bit1, bit0;
        __m256i k = search_avx2(L, v, &bit1, &bit0);
        __m256 even = _mm256_blendv_ps(_mm256_permutevar_ps(L->c_0, k), _mm256_permutevar_ps(L->c_2, k), bit1);
        __m256 odd = _mm256_blendv_ps(_mm256_permutevar_ps(L->c_1, k), _mm256_permutevar_ps(L->c_3, k), bit1);
        __m256 cq = _mm256_blendv_ps(even, odd, bit0);
        if (weighted) {
            a = _mm256_add_ps(a, _mm256_mul_ps(_mm256_loadu_ps(wx + i), cq));
            d = _mm256_add_ps(d, _mm256_mul_ps(_mm256_loadu_ps(w + i), _mm256_mul_ps(cq, cq)));
        } else {
            a = _mm256_add_ps(a, _mm256_mul_ps(xv, cq));
            d = _mm256_add_ps(d, _mm256_mul_ps(cq, cq));
        }
    }
    __m256 h = _mm256_hadd_ps(a, d);
    h = _mm256_hadd_ps(h, h);
    __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    *A = _mm_cvtss_f32(sums);
    *D = _mm_cvtss_f32(_mm_shuffle_ps(sums, sums, 1));
}

NF4_AVX2 static void candidates_avx2_plain(const void *levels, const float *x, const float *wx, const float *w, int64_t n, int nb,
                                           const float *inv, float *A, float *D) {
    for (int i = 0; i < nb; i++) candidate_avx2(levels, x + i * n, wx, w, n, inv[i], A + i, D + i, 0);
}

NF4_AVX2 static void candidates_avx2_weighted(const void *levels, const float *x, const float *wx, const float *w, int64_t n, int nb,
                                              const float *inv, float *A, float *D) {
    for (int i = 0; i < nb; i++) candidate_avx2(levels, x + i * n, wx + i * n, w + i * n, n, inv[i], A + i, D + i, 1);
}
#endif

/* The tables of both paths. */
typedef struct {
    levels_portable portable;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    levels_avx2 vectors;
#endif
} levels_storage;

/* x[0..len) = the block's values as float32; returns the largest |x| as float32 bits, compared as
 * integers (a NaN sorts above +Inf). */
static uint32_t load_block(const void *src, int dtype, int64_t base, int64_t len, float *x, int simd) {
    int64_t i = 0;
    uint32_t max_bits = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (simd) i = load_block_avx2(src, dtype, base, len, x, &max_bits);
#else
    (void)simd;
#endif
    for (; i < len; i++) {
        uint32_t u = element_bits(src, dtype, base + i);
        x[i] = bits_to_float(u);
        max_bits = (u & 0x7FFFFFFF) > max_bits ? u & 0x7FFFFFFF : max_bits;
    }
    return max_bits;
}

/* The AVX2 or the portable functions, and the tables they take. */
typedef struct {
    void (*candidates)(const void *, const float *, const float *, const float *, int64_t, int, const float *, float *, float *);
    void (*encode)(const void *, const float *, int64_t, float, uint8_t *);
    const void *levels;
    int simd;
} search_path;

/* AVX2 where `simd` asks for it and the CPU has it, else portable C; the tables go to *storage. */
static search_path search_path_for(int simd, int weighted, const float *t, const float *c, levels_storage *storage) {
    storage->portable = (levels_portable){t, c};
    search_path path = {candidates_portable, encode_portable, &storage->portable, 0};
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (simd && nf4_simd()) {
        levels_for_avx2(t, c, &storage->vectors);
        path = (search_path){weighted ? candidates_avx2_weighted : candidates_avx2_plain, encode_avx2, &storage->vectors, 1};
    }
#else
    (void)simd, (void)weighted;
#endif
    return path;
}

enum { SEARCH_BATCH = 8, SEARCH_GRID_MAX = 16 };

/* Blocks [first, first + count) of the n elements of `src`, encoded by the search: for a block of
 * largest magnitude m (finite, at least `min_scale`), each grid scale s = m * grid[k] gives codes
 * for x * (1/s) and their sums A, D (candidate_portable); the first candidate of largest score
 * A * A / D among those with A > 0 and D > 0 is refitted, r = A / D, and the block stores r
 * (when r >= min_scale and finite) with the codes of x * (1/r). Any other block gets the absmax
 * encoding (sections 2.2 to 2.4), written here for a full block; a partial last block's is the
 * caller's. With `importance` (float32, `cols` of them), element i of src weighs
 * importance[(offset + i) % cols], where offset is src's first element's place in its tensor;
 * else every element weighs 1. At most SEARCH_GRID_MAX grid factors.
 *
 * Blocks go in batches, each step over all blocks of a batch, so that no block waits on another's
 * divisions; the per-block arithmetic is loops over the batch, which the compiler vectorizes. */
static void search_blocks(const void *src, int dtype, int64_t n, int64_t first, int64_t count, int64_t bs,
                          const float *t, const float *c, const float *grid, int ngrid, float floor, float min_scale,
                          const float *importance, int64_t cols, int64_t offset, float *absmax, uint8_t *packed, int simd) {
    levels_storage storage;
    search_path path = search_path_for(simd, importance != NULL, t, c, &storage);
    const int batch = bs * SEARCH_BATCH <= 4096 ? SEARCH_BATCH : (int)(4096 / bs);
    float x[4096], wx[4096], w[4096];
    float m[SEARCH_BATCH], inv[SEARCH_GRID_MAX][SEARCH_BATCH], A[SEARCH_GRID_MAX][SEARCH_BATCH], D[SEARCH_GRID_MAX][SEARCH_BATCH];
    for (int64_t b0 = first; b0 < first + count; b0 += batch) {
        int nb = first + count - b0 < batch ? (int)(first + count - b0) : batch;
        int64_t total = nb * bs;
        for (int i = 0; i < nb; i++) {
            int64_t base = (b0 + i) * bs, len = n - base < bs ? n - base : bs;
            uint32_t bits = load_block(src, dtype, base, len, x + i * bs, path.simd);
            for (int64_t j = len; j < bs; j++) x[i * bs + j] = 0.0f;
            m[i] = bits < 0x7F800000 && bits_to_float(bits) >= min_scale ? bits_to_float(bits) : __builtin_inff(); /* Inf: not searched */
        }
        const float *wb = NULL; /* the batch's weights: in place where the batch lies inside one row */
        if (importance) {
            int64_t col = (offset + b0 * bs) % cols;
            wb = importance + col;
            if (col + total > cols || (b0 + nb) * bs > n) {
                for (int64_t i = 0; i < total; col = 0) {
                    int64_t run = cols - col < total - i ? cols - col : total - i;
                    memcpy(w + i, importance + col, sizeof(float) * (size_t)run);
                    i += run;
                }
                for (int64_t i = n - b0 * bs; i < total; i++) w[i] = 0.0f; /* past the tensor's end */
                wb = w;
            }
            for (int64_t i = 0; i < total; i++) wx[i] = wb[i] * x[i];
        }
        for (int k = 0; k < ngrid; k++)
            for (int i = 0; i < nb; i++) inv[k][i] = 1.0f / (m[i] * grid[k]); /* 0 where not searched: every code 7 */
        for (int k = 0; k < ngrid; k++) path.candidates(path.levels, x, wx, wb, bs, nb, inv[k], A[k], D[k]);
        float best_score[SEARCH_BATCH], best_a[SEARCH_BATCH], best_d[SEARCH_BATCH];
        for (int i = 0; i < nb; i++) best_score[i] = -1.0f, best_a[i] = 0.0f, best_d[i] = 1.0f;
        for (int k = 0; k < ngrid; k++)
            for (int i = 0; i < nb; i++) {
                int valid = (A[k][i] > 0.0f) & (D[k][i] > 0.0f); /* below, D is 1 where not: no division by 0 */
                float score = valid ? A[k][i] * A[k][i] / (valid ? D[k][i] : 1.0f) : -1.0f;
                int take = score > best_score[i];
                best_score[i] = take ? score : best_score[i];
                best_a[i] = take ? A[k][i] : best_a[i];
                best_d[i] = take ? D[k][i] : best_d[i];
            }
        for (int i = 0; i < nb; i++) {
            int64_t b = b0 + i, base = b * bs, len = n - base < bs ? n - base : bs;
            float r = best_a[i] / best_d[i];
            if (best_score[i] > 0.0f && r >= min_scale && r < __builtin_inff()) {
                absmax[b] = r;
                path.encode(path.levels, x + i * bs, len, 1.0f / r, packed + base / 2);
            } else if (len == bs) {
                quantize_blocks(src, dtype, b, 1, bs, t, floor, packed, absmax, simd);
            }
        }
    }
}

/* Codes of blocks [first, first + count) for given scales (with double quantization, the scales a
 * loader will use): x * (1/s), or code 7 (zero) everywhere where s < min_scale. */
static void encode_blocks(const void *src, int dtype, int64_t n, int64_t first, int64_t count, int64_t bs,
                          const float *t, const float *scales, float min_scale, uint8_t *packed, int simd) {
    levels_storage storage;
    search_path path = search_path_for(simd, 0, t, NULL, &storage);
    float x[4096];
    for (int64_t b = first; b < first + count; b++) {
        int64_t base = b * bs, len = n - base < bs ? n - base : bs;
        float s = scales[b];
        if (s >= min_scale) {
            load_block(src, dtype, base, len, x, path.simd);
            path.encode(path.levels, x, len, 1.0f / s, packed + base / 2);
        } else {
            memset(packed + base / 2, 0x77, (size_t)(len + 1) / 2);
        }
    }
}

/* Reading mapped files: a file truncated under a mapping raises SIGBUS on the next access to the
 * lost pages. nf4_guard installs a handler (once; again if something replaced it) that, in a thread
 * inside one of the functions below, jumps back to the function's entry, which returns -1. In any
 * other thread, or outside them, the fault goes to the handler installed before (by default: the
 * end of the process, as without this). */
#if defined(__unix__) || defined(__APPLE__)
#include <setjmp.h>
#include <signal.h>

static __thread sigjmp_buf *fault_exit; /* where the calling thread's guarded call resumes; NULL outside one */
static struct sigaction before;          /* the SIGBUS action before nf4_guard's */

static void on_fault(int sig, siginfo_t *info, void *context) {
    if (fault_exit) siglongjmp(*fault_exit, 1);
    if (before.sa_flags & SA_SIGINFO) {
        before.sa_sigaction(sig, info, context);
    } else if (before.sa_handler != SIG_DFL && before.sa_handler != SIG_IGN) {
        before.sa_handler(sig);
    } else {
        sigaction(sig, &before, NULL); /* returning repeats the access, which then ends the process */
    }
}

/* Install the handler unless it is in place: 0, or -1 where it cannot (not thread-safe: one caller
 * at a time). */
int nf4_guard(void) {
    struct sigaction now, mine;
    if (sigaction(SIGBUS, NULL, &now)) return -1;
    if ((now.sa_flags & SA_SIGINFO) && now.sa_sigaction == on_fault) return 0;
    memset(&mine, 0, sizeof mine);
    mine.sa_sigaction = on_fault;
    mine.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&mine.sa_mask);
    before = now;
    return sigaction(SIGBUS, &mine, NULL) ? -1 : 0;
}

/* Run `call` with SIGBUS caught: return 0, or -1 after a fault (the signal mask restored). */
#define GUARDED(call)                          \
    do {                                       \
        sigjmp_buf env;                        \
        sigjmp_buf *outer = fault_exit;        \
        if (sigsetjmp(env, 1)) {               \
            fault_exit = outer;                \
            return -1;                         \
        }                                      \
        fault_exit = &env;                     \
        call;                                  \
        fault_exit = outer;                    \
        return 0;                              \
    } while (0)
#else
int nf4_guard(void) { return -1; } /* no SIGBUS here: callers read through buffers */
#define GUARDED(call) \
    do {              \
        call;         \
        return 0;     \
    } while (0)
#endif

/* quantize_blocks, guarded. */
int nf4_quantize_blocks(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                        const float *thresholds, float floor, uint8_t *packed, float *absmax, int simd) {
    GUARDED(quantize_blocks(src, dtype, first, count, bs, thresholds, floor, packed, absmax, simd));
}

/* decode_fp8, guarded. */
int nf4_decode_fp8(const uint8_t *q, int64_t rows, int64_t cols, const float *scale, int64_t scale_cols,
                   int64_t first_row, int64_t br, int64_t bc, float *out, int simd) {
    GUARDED(decode_fp8(q, rows, cols, scale, scale_cols, first_row, br, bc, out, simd));
}

/* search_blocks, guarded. */
int nf4_search_blocks(const void *src, int dtype, int64_t n, int64_t first, int64_t count, int64_t bs,
                      const float *t, const float *c, const float *grid, int ngrid, float floor, float min_scale,
                      const float *importance, int64_t cols, int64_t offset, float *absmax, uint8_t *packed, int simd) {
    GUARDED(search_blocks(src, dtype, n, first, count, bs, t, c, grid, ngrid, floor, min_scale, importance, cols, offset, absmax, packed, simd));
}

/* encode_blocks, guarded. */
int nf4_encode_blocks(const void *src, int dtype, int64_t n, int64_t first, int64_t count, int64_t bs,
                      const float *t, const float *scales, float min_scale, uint8_t *packed, int simd) {
    GUARDED(encode_blocks(src, dtype, n, first, count, bs, t, scales, min_scale, packed, simd));
}
