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
 * Two paths give the same bytes: AVX2 (x86-64, chosen at run time when the CPU has AVX2 and F16C)
 * and portable C. nf4_quantize_blocks(..., simd=0) forces the portable one, for the tests.
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

/* Codes of 8 scaled values as int32 lanes: a 4-level binary search over the 15 thresholds,
 * each level comparing against t[code + 7], t[code + 3], t[code + 1], t[code] (code so far). */
NF4_AVX2 static __m256i codes8_avx2(__m256 v, __m256 t7, __m256 t3, __m256 t11, __m256 odd, __m256 even) {
    const __m256i one = _mm256_set1_epi32(1);
    __m256 gt = _mm256_cmp_ps(v, t7, _CMP_GT_OQ);
    __m256i code = _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(8));
    gt = _mm256_cmp_ps(v, _mm256_blendv_ps(t3, t11, gt), _CMP_GT_OQ);
    code = _mm256_or_si256(code, _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(4)));
    gt = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(odd, _mm256_srli_epi32(code, 2)), _CMP_GT_OQ);
    code = _mm256_or_si256(code, _mm256_and_si256(_mm256_castps_si256(gt), _mm256_set1_epi32(2)));
    gt = _mm256_cmp_ps(v, _mm256_permutevar8x32_ps(even, _mm256_srli_epi32(code, 1)), _CMP_GT_OQ);
    return _mm256_or_si256(code, _mm256_and_si256(_mm256_castps_si256(gt), one));
}

NF4_AVX2 static void blocks_avx2(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                                 const float *t, float floor, uint8_t *packed, float *absmax) {
    const __m256 t7 = _mm256_set1_ps(t[7]), t3 = _mm256_set1_ps(t[3]), t11 = _mm256_set1_ps(t[11]);
    const __m256 odd = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0);
    const __m256 even = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    const __m256i high_then_low = _mm256_set1_epi16(0x0110); /* byte weights 16, 1 */
    for (int64_t b = first; b < first + count; b++) {
        int64_t base = b * bs;
        absmax[b] = bits_to_float(absmax_bits_avx2(src, dtype, base, bs));
        const __m256 inv = _mm256_set1_ps(scale(absmax[b], floor));
        for (int64_t i = 0; i < bs; i += 32) {
            __m256i c[4];
            for (int k = 0; k < 4; k++)
                c[k] = codes8_avx2(_mm256_mul_ps(load8_avx2(src, dtype, base + i + 8 * k), inv), t7, t3, t11, odd, even);
            /* 32 int32 codes -> 32 bytes in order -> 16 bytes of (first << 4 | second). */
            __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]), _mm256_packus_epi32(c[2], c[3]));
            bytes = _mm256_permutevar8x32_epi32(bytes, order);
            __m256i pairs = _mm256_maddubs_epi16(bytes, high_then_low);
            pairs = _mm256_permute4x64_epi64(_mm256_packus_epi16(pairs, pairs), 0x08);
            _mm_storeu_si128((__m128i *)(packed + (base + i) / 2), _mm256_castsi256_si128(pairs));
        }
    }
}

int nf4_simd(void) { return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"); }
#else
int nf4_simd(void) { return 0; }
#endif

/* Quantize blocks [first, first + count) of `bs` elements (bs a multiple of 32) of `src`
 * (dtype NF4_F32/F16/BF16) into `packed` (bs / 2 bytes a block) and `absmax` (one float a block);
 * `thresholds` holds the 15 float32 thresholds in increasing order. Uses AVX2 when `simd` is
 * non-zero and the CPU has it. */
void nf4_quantize_blocks(const void *src, int dtype, int64_t first, int64_t count, int64_t bs,
                         const float *thresholds, float floor, uint8_t *packed, float *absmax, int simd) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (simd && nf4_simd()) {
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

static void decode_fp8_portable(const uint8_t *q, int64_t rows, int64_t cols, const float *scale,
                                int64_t scale_cols, int64_t first_row, int64_t br, int64_t bc, float *out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *srow = scale + ((first_row + r) / br) * scale_cols;
        for (int64_t c = 0; c < cols; c++) out[r * cols + c] = fp8_e4m3(q[r * cols + c]) * srow[c / bc];
    }
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* The same, 8 codes at a time: fp8_e4m3's bit arithmetic on 32-bit lanes. */
NF4_AVX2 static void decode_fp8_avx2(const uint8_t *q, int64_t rows, int64_t cols, const float *scale,
                                     int64_t scale_cols, int64_t first_row, int64_t br, int64_t bc, float *out) {
    const __m256i k80 = _mm256_set1_epi32(0x80), k7f = _mm256_set1_epi32(0x7F), kf = _mm256_set1_epi32(0xF);
    const __m256i k7 = _mm256_set1_epi32(7), k120 = _mm256_set1_epi32(120), knan = _mm256_set1_epi32(0x7FC00000);
    const __m256 ksub = _mm256_set1_ps(0x1p-9f);
    for (int64_t r = 0; r < rows; r++) {
        const float *srow = scale + ((first_row + r) / br) * scale_cols;
        const uint8_t *qr = q + r * cols;
        float *o = out + r * cols;
        for (int64_t c0 = 0; c0 < cols; c0 += bc) {
            int64_t c1 = c0 + bc < cols ? c0 + bc : cols, c = c0;
            float s = srow[c0 / bc];
            __m256 vs = _mm256_set1_ps(s);
            for (; c + 8 <= c1; c += 8) {
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
            for (; c < c1; c++) o[c] = fp8_e4m3(qr[c]) * s;
        }
    }
}
#endif

/* Rows [0, rows) of an FP8 weight of `cols` columns, the first being row `first_row` of the
 * weight, decoded to float32: out[r][c] = value(q[r][c]) * scale[(first_row + r) / br][c / bc],
 * one IEEE single multiply. */
void nf4_decode_fp8(const uint8_t *q, int64_t rows, int64_t cols, const float *scale, int64_t scale_cols,
                    int64_t first_row, int64_t br, int64_t bc, float *out, int simd) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (simd && nf4_simd()) {
        decode_fp8_avx2(q, rows, cols, scale, scale_cols, first_row, br, bc, out);
        return;
    }
#endif
    (void)simd;
    decode_fp8_portable(q, rows, cols, scale, scale_cols, first_row, br, bc, out);
}

/* --scales search (spec section 2.6), portable and AVX2: every float operation and its order are
 * fixed (8 lanes of partial sums, added in a fixed tree), so both give the same bytes. */

/* Eight partial sums (lane i % 8), added in a fixed tree: the same result on every machine. */
static float lanes_sum(const float l[8]) { return ((l[0] + l[1]) + (l[2] + l[3])) + ((l[4] + l[5]) + (l[6] + l[7])); }

static void pack_block(const uint8_t *q, int64_t n, uint8_t *packed) {
    for (int64_t i = 0; i < n; i += 2) packed[i / 2] = (uint8_t)(q[i] << 4 | (i + 1 < n ? q[i + 1] : 7));
}

/* Weighted squared error sum w * (x - s c[q])^2 of coding x[0..n) (n a multiple of 8; padding zeros
 * add nothing) as c[q[i]] * s, with sum w x c and sum w c c for the least-squares refit; each term is
 * w * (its product), so weights of 1 give the unweighted sums exactly. With `inv` non-zero the codes
 * are first chosen for x * inv: the number of thresholds below it. */
typedef float (*block_error_fn)(const float *, const float *, int64_t, float, float, const float *, const float *, uint8_t *, float *, float *);

static float block_error_portable(const float *x, const float *w, int64_t n, float s, float inv, const float *t, const float *c,
                                  uint8_t *q, float *num, float *den) {
    float e[8] = {0}, a[8] = {0}, d[8] = {0};
    for (int64_t i = 0; i < n; i += 8)
        for (int j = 0; j < 8; j++) {
            float xv = x[i + j];
            if (inv != 0.0f) {
                float v = xv * inv;
                int k = 0;
                for (int m = 0; m < 15; m++) k += t[m] < v;
                q[i + j] = (uint8_t)k;
            }
            float cq = c[q[i + j]], r = xv - s * cq, wv = w[i + j];
            e[j] += wv * (r * r);
            a[j] += wv * (xv * cq);
            d[j] += wv * (cq * cq);
        }
    *num = lanes_sum(a);
    *den = lanes_sum(d);
    return lanes_sum(e);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
/* Whole groups of 8 of x[0..len); returns how many values it loaded. */
NF4_AVX2 static int64_t load_block_avx2(const void *src, int dtype, int64_t base, int64_t len, float *x) {
    int64_t i = 0;
    for (; i + 8 <= len; i += 8) _mm256_storeu_ps(x + i, load8_avx2(src, dtype, base + i));
    return i;
}

/* The same operations on 8 lanes: lane j takes elements i + j, as the partial sums above. */
NF4_AVX2 static float block_error_avx2(const float *x, const float *w, int64_t n, float s, float inv, const float *t, const float *c,
                                       uint8_t *q, float *num, float *den) {
    const __m256 t7 = _mm256_set1_ps(t[7]), t3 = _mm256_set1_ps(t[3]), t11 = _mm256_set1_ps(t[11]);
    const __m256 odd = _mm256_setr_ps(t[1], t[5], t[9], t[13], 0, 0, 0, 0);
    const __m256 even = _mm256_setr_ps(t[0], t[2], t[4], t[6], t[8], t[10], t[12], t[14]);
    const __m256 c_lo = _mm256_loadu_ps(c), c_hi = _mm256_loadu_ps(c + 8), vs = _mm256_set1_ps(s), vinv = _mm256_set1_ps(inv);
    __m256 e = _mm256_setzero_ps(), a = _mm256_setzero_ps(), d = _mm256_setzero_ps();
    for (int64_t i = 0; i < n; i += 8) {
        __m256 xv = _mm256_loadu_ps(x + i);
        __m256i code;
        if (inv != 0.0f) {
            code = codes8_avx2(_mm256_mul_ps(xv, vinv), t7, t3, t11, odd, even);
            __m128i w = _mm_packus_epi32(_mm256_castsi256_si128(code), _mm256_extracti128_si256(code, 1));
            _mm_storel_epi64((__m128i *)(q + i), _mm_packus_epi16(w, w));
        } else {
            code = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)));
        }
        __m256 cq = _mm256_blendv_ps(_mm256_permutevar8x32_ps(c_lo, code), _mm256_permutevar8x32_ps(c_hi, code),
                                     _mm256_castsi256_ps(_mm256_slli_epi32(code, 28)));
        __m256 r = _mm256_sub_ps(xv, _mm256_mul_ps(vs, cq)), wv = _mm256_loadu_ps(w + i);
        e = _mm256_add_ps(e, _mm256_mul_ps(wv, _mm256_mul_ps(r, r)));
        a = _mm256_add_ps(a, _mm256_mul_ps(wv, _mm256_mul_ps(xv, cq)));
        d = _mm256_add_ps(d, _mm256_mul_ps(wv, _mm256_mul_ps(cq, cq)));
    }
    float le[8], la[8], ld[8];
    _mm256_storeu_ps(le, e);
    _mm256_storeu_ps(la, a);
    _mm256_storeu_ps(ld, d);
    *num = lanes_sum(la);
    *den = lanes_sum(ld);
    return lanes_sum(le);
}
#endif

/* x[0..len) = the block's values as float32. */
static void load_block(const void *src, int dtype, int64_t base, int64_t len, float *x, int simd) {
    int64_t i = 0;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (simd && nf4_simd()) i = load_block_avx2(src, dtype, base, len, x);
#endif
    (void)simd;
    for (; i < len; i++) x[i] = bits_to_float(element_bits(src, dtype, base + i));
}

static block_error_fn block_error_for(int simd) {
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
    if (simd && nf4_simd()) return block_error_avx2;
#endif
    (void)simd;
    return block_error_portable;
}

/* Blocks [first, first + count) of the n elements of `src`, already coded by absmax (`absmax`,
 * `packed`): for each block whose absmax is at least `min_scale`, keep the scale of least (weighted)
 * squared error among: absmax with its codes; then for each scale s in absmax * factors[k] the codes of
 * x * (1/s); and after absmax and after each s, the least-squares refit r = sum(x c) / sum(c c) of
 * those codes, with the codes of x * (1/r). A later candidate wins only with a strictly smaller
 * error. Writes the chosen scale to absmax[b] and its codes to packed. With `importance` (float32,
 * `cols` of them), element i of src weighs importance[(offset + i) % cols], where offset is src's
 * first element's place in its tensor; else every element weighs 1. */
void nf4_search_blocks(const void *src, int dtype, int64_t n, int64_t first, int64_t count, int64_t bs,
                       const float *t, const float *c, const float *factors, int nfactors, float min_scale,
                       const float *importance, int64_t cols, int64_t offset,
                       float *absmax, uint8_t *packed, int simd) {
    block_error_fn block_error = block_error_for(simd);
    float x[4096], w[4096];
    uint8_t q[4096], best_q[4096];
    for (int64_t i = 0; i < 4096; i++) w[i] = 1.0f;
    for (int64_t b = first; b < first + count; b++) {
        int64_t base = b * bs, len = n - base < bs ? n - base : bs, padded = (len + 7) & ~(int64_t)7;
        float m = absmax[b], num, den;
        if (!(m >= min_scale)) continue;
        load_block(src, dtype, base, len, x, simd);
        for (int64_t i = len; i < padded; i++) x[i] = 0.0f;
        if (importance)
            for (int64_t i = 0, col = (offset + base) % cols; i < len; i++, col = col + 1 == cols ? 0 : col + 1) w[i] = importance[col];
        for (int64_t i = 0; i < padded; i++)
            best_q[i] = i >= len ? 7 : (uint8_t)(i & 1 ? packed[(base + i) / 2] & 0xF : packed[(base + i) / 2] >> 4);
        float best = block_error(x, w, padded, m, 0.0f, t, c, best_q, &num, &den), best_s = m;
        for (int k = -1; k < nfactors; k++) {
            float s = m, err;
            if (k >= 0) {
                s = m * factors[k];
                err = block_error(x, w, padded, s, 1.0f / s, t, c, q, &num, &den);
                if (err < best) best = err, best_s = s, memcpy(best_q, q, (size_t)padded);
            }
            if (!(num > 0.0f && den > 0.0f)) continue;
            float r = num / den;
            if (!(r >= min_scale)) continue;
            err = block_error(x, w, padded, r, 1.0f / r, t, c, q, &num, &den);
            if (err < best) best = err, best_s = r, memcpy(best_q, q, (size_t)padded);
        }
        absmax[b] = best_s;
        pack_block(best_q, len, packed + base / 2);
    }
}

/* Codes of blocks [first, first + count) for given scales (with double quantization, the scales a
 * loader will use): x * (1/s), or code 7 (zero) everywhere where s < min_scale. */
void nf4_encode_blocks(const void *src, int dtype, int64_t n, int64_t first, int64_t count, int64_t bs,
                       const float *t, const float *scales, float min_scale, uint8_t *packed) {
    uint8_t q[4096];
    for (int64_t b = first; b < first + count; b++) {
        int64_t base = b * bs, len = n - base < bs ? n - base : bs;
        float s = scales[b], inv = s >= min_scale ? 1.0f / s : 0.0f;
        for (int64_t i = 0; i < len; i++) {
            float v = bits_to_float(element_bits(src, dtype, base + i)) * inv;
            q[i] = 0;
            for (int k = 0; k < 15; k++) q[i] += t[k] < v;
            q[i] = inv != 0.0f ? q[i] : 7;
        }
        pack_block(q, len, packed + base / 2);
    }
}
