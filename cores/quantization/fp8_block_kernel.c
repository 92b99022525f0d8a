/* FP8 e4m3 tile quantization, fused: tile absmax -> scale_inv, w / scale_inv -> e4m3 codes, and the error
 * statistics of the check, in one pass over each row of a tile while it is in registers.
 *
 * Built at first use by cores/quantization/fp8_native.py (plain C with GCC vector extensions, OpenMP; no
 * -ffast-math and -ffp-contract=off, so that every fp32 operation rounds as written) and called through
 * ctypes. Codes and scales are bit-identical to the torch path of cores/quantization/fp8_block.py:
 *
 *   scale_inv = max(absmax, (float)1e-12) / 448.0f   (mode max; the other modes pass their scales in)
 *   q         = (float)w / scale_inv                  (IEEE fp32 division)
 *   code      = e4m3(q)                               (torch's saturating CPU cast: e4m3_from_f32x8)
 *   error     = fmaf(-(float)code, scale_inv, (float)w)   (one rounding, as torch's addcmul on CPU)
 *
 * A weight holding a NaN or an infinity is reported (the return value) and what was written for it is not to
 * be used: the caller takes the torch path for it.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

#define GROUP 4 /* tile columns per work item, at most (128 rows x 512 columns: 128 KiB of bf16) */

typedef double v4d __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef float v8f __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint8_t v8b __attribute__((vector_size(8)));

#define INLINE static inline __attribute__((always_inline))

INLINE uint32_t f2u(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
INLINE float u2f(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
INLINE v8i splat(int32_t v) { return (v8i){0} + v; }
/* Lane-wise max and min, written lane by lane: the vectoriser makes them one instruction (pmaxsd, pminsd),
 * where a mask blend stays a compare and a blend. */
INLINE v8i max8(v8i a, v8i b) {
    v8i r;
    for (int l = 0; l < 8; l++) r[l] = a[l] > b[l] ? a[l] : b[l];
    return r;
}
INLINE v8i min8(v8i a, v8i b) {
    v8i r;
    for (int l = 0; l < 8; l++) r[l] = a[l] < b[l] ? a[l] : b[l];
    return r;
}
INLINE v8f abs8(v8f v) { return (v8f)((v8i)v & 0x7FFFFFFF); }
INLINE v8f load8(const float *p) { v8f v; memcpy(&v, p, sizeof v); return v; }

/* The low byte of each lane. */
INLINE v8b narrow(v8i v) {
#if defined(__clang__) || __GNUC__ >= 12 /* one byte shuffle (convertvector goes lane by lane) */
    typedef uint8_t v32b __attribute__((vector_size(32)));
    return __builtin_shufflevector((v32b)v, (v32b)v, 0, 4, 8, 12, 16, 20, 24, 28);
#else
    return __builtin_convertvector(v, v8b);
#endif
}

/* The magnitude bits at and above which a value of dtype dt is NaN or infinite. */
static int32_t nonfinite_bits(int dt) { return dt == DT_F32 ? 0x7F800000 : dt == DT_BF16 ? 0x7F80 : 0x7C00; }

/* fp16 magnitude bits a (< 0x7C00) and sign bits -> fp32: exact; subnormals through an int -> float
 * conversion, blended with a mask (no float operation in a select arm). */
INLINE v8f f16_to_f32x8(v8i a, v8i sign) {
    const v8i norm = (a << 13) + (112 << 23);
    const v8i sub = (v8i)(__builtin_convertvector(a, v8f) * 0x1p-24f);
    const v8i is_sub = a < 0x400;
    return (v8f)((sub & is_sub) | (norm & ~is_sub) | (sign << 16));
}

/* |value| of magnitude bits of dtype dt (the largest magnitude bits are the bits of the absmax). */
static float magnitude(int dt, int32_t m) {
    if (dt == DT_F32) return u2f((uint32_t)m);
    if (dt == DT_BF16) return u2f((uint32_t)m << 16);
    return f16_to_f32x8(splat(m), splat(0))[0];
}

/* 8 values of dtype dt from p as fp32; mb: the running max of their magnitude bits. */
INLINE v8f load_values(const char *p, const int dt, v8i *mb) {
    if (dt == DT_F32) {
        v8i v;
        memcpy(&v, p, sizeof v);
        *mb = max8(*mb, v & 0x7FFFFFFF);
        return (v8f)v;
    }
    const uint16_t *h = (const uint16_t *)p;
    v8i v;
    for (int l = 0; l < 8; l++) v[l] = h[l]; /* one widening load */
    const v8i a = v & 0x7FFF;
    *mb = max8(*mb, a);
    return dt == DT_BF16 ? (v8f)(v << 16) : f16_to_f32x8(a, v & 0x8000);
}

/* fp32 -> float8_e4m3fn for 8 values, as torch's CPU cast (c10::Float8_e4m3fn): round to nearest even,
 * saturating at +-448 (every finite value and infinity: past 464 a non-saturating cast would give the NaN
 * code), the sign kept (also on zero); so torch's clamp(q, -448, 448) before the cast changes no code. A NaN,
 * which the caller never passes, would give 0x7E (torch: 0x7F).
 *
 * |q| (at most 448) plus big = 2^(e + 20), e its binary exponent (at least -6, e4m3's smallest normal one),
 * is |q| rounded to the e4m3 step of its binade, 2^(e - 3) (subnormals: 2^-9), ties to even: fp32's own
 * rounding, as c10 does for subnormals; the sum's mantissa is then the step count k (up to 16, which carries
 * into the next binade), and the code is k + 8 (e + 6). restored: the codes' values (exact). */
INLINE v8b e4m3_from_f32x8(v8f q, v8f *restored) {
    v8i b = (v8i)q;
    const v8i sign = b & (int32_t)0x80000000u;
    b ^= sign;
    b = min8(b, splat(0x43E00000)); /* 448.0f; b >= 0 as int32 */
    const v8i eb = max8(b & 0x7F800000, splat(121 << 23));
    const v8f big = (v8f)(eb + (20 << 23));
    const v8f sum = (v8f)b + big;
    *restored = (v8f)((v8i)(sum - big) | sign); /* exact (Sterbenz) */
    const v8i code = ((v8i)sum - (v8i)big) + (eb >> 20) - (121 << 3);
    return narrow(code | (v8i)((v8u)sign >> 24));
}

/* The error statistics of a work item, 8 lanes each: element j of a row segment goes to lane j % 8. Up to
 * SPAN values of a row segment are summed in fp32 vectors in registers (16 products a lane), then added to
 * these sums in double (two vectors of 4 each). The order is fixed by the weight's shape, not by the thread
 * count. */
typedef struct {
    v4d xx[2], xe[2], ee[2], ab[2]; /* sum x^2, x e, e^2, |e| */
    v8i mx, ps, pe; /* max |e|, max |x| a, max |e| a: non-negative floats, as their bits */
    v8i mb;         /* the largest magnitude bits read (NaN or inf: at least nonfinite_bits) */
} lanes;

/* sums[0..1] += the two halves of s, in double. */
INLINE void add_wide(v4d *sums, v8f s) {
    v4f half[2];
    memcpy(half, &s, sizeof half);
    sums[0] += __builtin_convertvector(half[0], v4d);
    sums[1] += __builtin_convertvector(half[1], v4d);
}

/* Running sums of a row segment (registers). */
typedef struct {
    v8f xx, xe, ee, ab;
    v8i mx, ps, pe, mb;
} acc;

/* 8 values at p: their codes into out (the first n, at most 8), and with check their error statistics
 * (with peaks, also the peak maxima under the peak weights at a). */
INLINE void chunk(const char *p, const int dt, float s, uint8_t *out, int n, const float *a, const int check,
                  const int peaks, acc *c) {
    const v8f x = load_values(p, dt, &c->mb);
    v8f restored;
    const v8b codes = e4m3_from_f32x8(x / s, &restored);
    if (n == 8) memcpy(out, &codes, 8);
    else for (int i = 0; i < n; i++) out[i] = codes[i];
    if (!check) return;
    v8f e;
    for (int l = 0; l < 8; l++) e[l] = fmaf(-restored[l], s, x[l]); /* torch's addcmul: one rounding */
    const v8f ae = abs8(e);
    c->xx += x * x;
    c->xe += x * e;
    c->ee += e * e;
    c->ab += ae;
    c->mx = max8(c->mx, (v8i)ae);
    if (!peaks) return;
    const v8f w = load8(a);
    c->ps = max8(c->ps, (v8i)(abs8(x) * w));
    c->pe = max8(c->pe, (v8i)(ae * w));
}

#define SPAN 128 /* values summed in fp32 before the double sums (16 a lane) */

/* A row segment of a tile: n values of dtype dt at src, under the scale s, codes into out; the statistics
 * into L (its maxima and magnitude bits always, its sums with check), the fp32 sums flushed to double every
 * SPAN values. */
INLINE void segment(const char *src, const int dt, int64_t n, float s, uint8_t *restrict out, const float *a,
                    const int check, const int peaks, lanes *L) {
    const int esize = dt == DT_F32 ? 4 : 2;
    for (int64_t j0 = 0; j0 < n; j0 += SPAN) {
        const int64_t j1 = j0 + SPAN < n ? j0 + SPAN : n;
        acc c = {.xx = {0}, .xe = {0}, .ee = {0}, .ab = {0}, .mx = L->mx, .ps = L->ps, .pe = L->pe, .mb = L->mb};
        int64_t j = j0;
        for (; j + 8 <= j1; j += 8) chunk(src + j * esize, dt, s, out + j, 8, a + (peaks ? j : 0), check, peaks, &c);
        if (j < j1) { /* the last values, zero-padded (a zero adds nothing to any statistic) */
            const int rest = (int)(j1 - j);
            char tail[32] = {0};
            float wt[8] = {0};
            memcpy(tail, src + j * esize, (size_t)rest * esize);
            if (peaks) memcpy(wt, a + j, (size_t)rest * sizeof(float));
            chunk(tail, dt, s, out + j, rest, wt, check, peaks, &c);
        }
        L->mx = c.mx, L->ps = c.ps, L->pe = c.pe, L->mb = c.mb;
        if (!check) continue;
        add_wide(L->xx, c.xx);
        add_wide(L->xe, c.xe);
        add_wide(L->ee, c.ee);
        add_wide(L->ab, c.ab);
    }
}

/* segment, its dtype and checks made constants (one loop each). */
typedef void (*segment_fn)(const char *, int64_t, float, uint8_t *restrict, const float *, lanes *);
#define SEGMENT(name, dt, check, peaks) \
    static void name(const char *src, int64_t n, float s, uint8_t *restrict out, const float *a, lanes *L) { \
        segment(src, dt, n, s, out, a, check, peaks, L); \
    }
SEGMENT(seg_f32, DT_F32, 0, 0)
SEGMENT(seg_f32_check, DT_F32, 1, 0)
SEGMENT(seg_f32_peaks, DT_F32, 1, 1)
SEGMENT(seg_bf16, DT_BF16, 0, 0)
SEGMENT(seg_bf16_check, DT_BF16, 1, 0)
SEGMENT(seg_bf16_peaks, DT_BF16, 1, 1)
SEGMENT(seg_f16, DT_F16, 0, 0)
SEGMENT(seg_f16_check, DT_F16, 1, 0)
SEGMENT(seg_f16_peaks, DT_F16, 1, 1)
static const segment_fn SEGMENTS[3][3] = {{seg_f32, seg_f32_check, seg_f32_peaks},
                                          {seg_bf16, seg_bf16_check, seg_bf16_peaks},
                                          {seg_f16, seg_f16_check, seg_f16_peaks}};

/* The largest magnitude bits of n values of dtype dt. */
static int32_t max_bits(const char *src, int dt, int64_t n) {
    int32_t m = 0;
    if (dt == DT_F32) {
        const uint32_t *p = (const uint32_t *)src;
        for (int64_t j = 0; j < n; j++) { const int32_t a = (int32_t)(p[j] & 0x7FFFFFFFu); m = a > m ? a : m; }
    } else { /* in 16-bit lanes: twice as many a vector */
        const uint16_t *p = (const uint16_t *)src;
        uint16_t m16 = 0;
        for (int64_t j = 0; j < n; j++) { const uint16_t a = p[j] & 0x7FFFu; m16 = a > m16 ? a : m16; }
        m = m16;
    }
    return m;
}

typedef struct {
    double xx, xe, ee, ab;    /* sum x^2, x e, e^2, |e| */
    float max_abs;            /* max |e| */
    float peak_src, peak_err; /* max |x| a, max |e| a (with peak weights a) */
    int32_t maxbits;          /* the largest magnitude bits */
} item_stats;

/* max(v, the non-negative float of bits b). */
static float fmax_bits(float v, int32_t b) { const float f = u2f((uint32_t)b); return f > v ? f : v; }

/* One work item: the tile row [r0, r1) x the tile columns [j0, j1) of the weight, read row by row: the
 * absmax of its tiles and their scales (compute_scale), then their codes and (check) the error statistics.
 * scale points at the tile row's scales. */
static void do_item(const char *w, int dt, int64_t ld, int64_t r0, int64_t r1, int64_t cols, int64_t b1,
                    int64_t j0, int64_t j1, float *scale, int compute_scale, uint8_t *codes, const float *pw,
                    int check, item_stats *st) {
    const int64_t esize = dt == DT_F32 ? 4 : 2;
    const int32_t bad = nonfinite_bits(dt);
    memset(st, 0, sizeof *st);
    if (compute_scale) {
        int32_t tile_max[GROUP] = {0}, m = 0;
        for (int64_t r = r0; r < r1; r++) {
            for (int64_t j = j0; j < j1; j++) {
                const int64_t cs = j * b1, ce = cs + b1 < cols ? cs + b1 : cols;
                const int32_t mr = max_bits(w + (r * ld + cs) * esize, dt, ce - cs);
                tile_max[j - j0] = mr > tile_max[j - j0] ? mr : tile_max[j - j0];
            }
        }
        for (int64_t j = j0; j < j1; j++) m = tile_max[j - j0] > m ? tile_max[j - j0] : m;
        if (m >= bad) {
            st->maxbits = m;
            return;
        }
        for (int64_t j = j0; j < j1; j++) {
            const float absmax = magnitude(dt, tile_max[j - j0]), floor = (float)1e-12;
            scale[j] = (absmax > floor ? absmax : floor) / 448.0f; /* torch: clamp_(min=1e-12) / 448 */
        }
    }
    const segment_fn seg = SEGMENTS[dt][check ? (pw != NULL ? 2 : 1) : 0];
    lanes L;
    memset(&L, 0, sizeof L);
    for (int64_t r = r0; r < r1; r++) {
        for (int64_t j = j0; j < j1; j++) {
            const int64_t cs = j * b1, ce = cs + b1 < cols ? cs + b1 : cols;
            seg(w + (r * ld + cs) * esize, ce - cs, scale[j], codes + r * cols + cs, pw != NULL ? pw + cs : NULL,
                &L);
        }
    }
    for (int h = 0; h < 2; h++) {
        for (int l = 0; l < 4; l++) {
            st->xx += L.xx[h][l];
            st->xe += L.xe[h][l];
            st->ee += L.ee[h][l];
            st->ab += L.ab[h][l];
        }
    }
    for (int l = 0; l < 8; l++) {
        st->max_abs = fmax_bits(st->max_abs, L.mx[l]);
        st->peak_src = fmax_bits(st->peak_src, L.ps[l]);
        st->peak_err = fmax_bits(st->peak_err, L.pe[l]);
        st->maxbits = L.mb[l] > st->maxbits ? L.mb[l] : st->maxbits;
    }
    if (pw == NULL) {
        st->peak_src = st->maxbits < bad ? magnitude(dt, st->maxbits) : 0.0f;
        st->peak_err = st->max_abs;
    }
}

/* Quantize a [rows, cols] weight (dtype: 0 fp32, 1 bf16, 2 fp16; row stride ld elements, unit column stride)
 * to e4m3 codes [rows, cols] (contiguous) under one scale_inv per b0 x b1 tile (scale: [ceil(rows / b0),
 * ceil(cols / b1)], contiguous; computed here from the tile absmax when compute_scale, else read).
 *
 * With check, stats receives (sum x^2, sum x e, sum e^2, sum |e|, max |e|, peak source, peak error) of the
 * error e = x - codes * scale_inv: the peak source and error are max |x| a and max |e| a under the
 * per-column peak weights a (peak_weight, [cols]), or max |x| and max |e| when peak_weight is NULL.
 *
 * The work items (a tile row x up to GROUP tile columns, split evenly) do not depend on nthreads, and their
 * statistics are summed in item order: neither do the results.
 *
 * Returns 0, or 1 when the weight holds a NaN or an infinity (nothing written is to be used), or -1 when
 * out of memory. */
int fp8_block_encode(const void *weight, int dtype, int64_t rows, int64_t cols, int64_t ld, int64_t b0,
                     int64_t b1, float *scale, int compute_scale, uint8_t *codes, const float *peak_weight,
                     int check, double *stats, int nthreads) {
    const int64_t tr = (rows + b0 - 1) / b0, tc = (cols + b1 - 1) / b1;
    const int64_t groups = (tc + GROUP - 1) / GROUP, per_group = groups > 0 ? (tc + groups - 1) / groups : 1;
    const int64_t items = tr * groups;
    item_stats *st = (item_stats *)malloc((size_t)(items > 0 ? items : 1) * sizeof(item_stats));
    if (st == NULL) return -1;
    const char *w = (const char *)weight;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads > 0 ? nthreads : 1)
    for (int64_t t = 0; t < items; t++) {
        const int64_t i = t / groups, g = t % groups;
        const int64_t r1 = (i + 1) * b0 < rows ? (i + 1) * b0 : rows;
        const int64_t j0 = g * per_group, j1 = j0 + per_group < tc ? j0 + per_group : tc;
        do_item(w, dtype, ld, i * b0, r1, cols, b1, j0, j1, scale + i * tc, compute_scale, codes, peak_weight,
                check, st + t);
    }
    const int32_t bad = nonfinite_bits(dtype);
    double out[7] = {0};
    int nonfinite = 0;
    for (int64_t t = 0; t < items; t++) {
        nonfinite |= st[t].maxbits >= bad;
        out[0] += st[t].xx;
        out[1] += st[t].xe;
        out[2] += st[t].ee;
        out[3] += st[t].ab;
        out[4] = st[t].max_abs > out[4] ? st[t].max_abs : out[4];
        out[5] = st[t].peak_src > out[5] ? st[t].peak_src : out[5];
        out[6] = st[t].peak_err > out[6] ? st[t].peak_err : out[6];
    }
    free(st);
    if (stats != NULL) memcpy(stats, out, sizeof out);
    return nonfinite;
}
