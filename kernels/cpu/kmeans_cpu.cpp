// Fused CPU k-means steps (AVX2 + FMA; the assign and knn tiles also in AVX-512, chosen at
// run time), called through ctypes by kernels/kmeans_cpu.py.
//
// assign: for every point the nearest centroid of its own group, distances formed in
// registers and reduced on the spot (the reference writes a distance block to memory and
// runs numpy's argmin over it; that pass, and the separate winner-distance pass, are gone).
// Centroids arrive packed per group in 16-centroid panels, cT[g][j/16][t][j%16] (each
// tile's d x 16 block contiguous: a strided d x kp layout put every row of a tile in the
// same few L1 sets once kp*4 bytes reached 1 KB; kp = kmax rounded up to 16), with a
// per-centroid term cterm[g][j] (|c|^2 for L2, 0 for cosine, +inf for padding), so the
// score s = cterm + alpha * x.c (alpha = -2 L2, -1 cosine) is minimised with 16-wide
// vector compares.  Micro-tile: 6 points x 16 centroids = 12 ymm accumulators (AVX-512:
// 6 points x 64 centroids, 24 zmm, where the CPU has it; same bits).
// Ties go to the lower centroid index (strict < within a lane; lowest index across lanes).
//
// plusplus: batched k-means++ seeding with the reference's draws (passed in): one thread
// per group (all threads on one D^2 pass for a very large group), D^2 in fp32 updated in
// one pass per seed, its running sum in fp64.
//
// knn: every row's k nearest other rows (exact), scores |zj|^2 - 2 zi.zj from the same
// 6 x 16 register tiles, each row keeping its best m candidates by score in a short
// sorted list (a vector compare against the list's worst skips almost every tile), then
// the m candidates re-ranked by directly computed distances as the reference does (AVX-512:
// 12 x 32 tiles, the same scores).
//
// update: sums of a contiguous row range into a caller-owned partial buffer (the caller
// cuts the rows into parts and adds the partials in a fixed order: deterministic).  The
// assign adds each row into the same kind of partials when given them (the one-pass step).
// Only a part's first and last group can have rows in other parts: those go to partials
// of the part's own, the groups between straight to the output (spurfast_cpu_plan).
//
// Threads: OpenMP over fixed contiguous row ranges (`parts` of them, cut as the Python
// reference cuts them; their number is the caller's function of N alone), shared out over
// `threads` threads, so results depend neither on scheduling nor on the thread count.
// (knn, whose rows are independent, passes parts = threads.)  The library is loaded
// after torch, and the loader resolves its libgomp.so.1 to the copy torch already loaded:
// one runtime and one thread pool.  (Python threads here raced torch's OpenMP workers,
// which spin for a while after every torch op: the assign ran ~40% slower inside the
// Lloyd loop than alone.)  Built without OpenMP, the *_parts entry points run serially
// and the Python side splits rows over its own threads instead.
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <algorithm>
#include <limits>
#include <memory>
#include <type_traits>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

typedef int64_t i64;

namespace {

constexpr int NR = 16;   // centroids per micro-tile (two ymm)
constexpr int MR = 6;    // points per micro-tile

// acc[r][0..1] = x_r . (the panel's 16 columns), rows x[0..R) (row stride d), panel d x 16
template <int R>
inline void tile_dot(const float* __restrict x, i64 d, const float* __restrict panel, __m256 (&acc)[R][2]) {
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (i64 t = 0; t < d; ++t) {
        const __m256 c0 = _mm256_loadu_ps(panel + t * NR);
        const __m256 c1 = _mm256_loadu_ps(panel + t * NR + 8);
        for (int r = 0; r < R; ++r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * d + t);
            acc[r][0] = _mm256_fmadd_ps(xb, c0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, c1, acc[r][1]);
        }
    }
}

// scores of rows x[0..R) against centroids j..j+15 folded into each lane's running best
template <int R>
inline void tile(const float* __restrict x, i64 d, const float* __restrict cT, i64 j,
                 const float* __restrict cterm, float alpha, __m256* best, __m256i* bidx) {
    __m256 acc[R][2];
    tile_dot<R>(x, d, cT + j * d, acc);
    const __m256 a = _mm256_set1_ps(alpha);
    const __m256 t0 = _mm256_loadu_ps(cterm + j), t1 = _mm256_loadu_ps(cterm + j + 8);
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const __m256i j0 = _mm256_add_epi32(lane, _mm256_set1_epi32((int)j));
    const __m256i j1 = _mm256_add_epi32(j0, _mm256_set1_epi32(8));
    for (int r = 0; r < R; ++r) {
        const __m256 s0 = _mm256_fmadd_ps(a, acc[r][0], t0);
        const __m256 s1 = _mm256_fmadd_ps(a, acc[r][1], t1);
        const __m256 m0 = _mm256_cmp_ps(s0, best[2 * r], _CMP_LT_OQ);
        const __m256 m1 = _mm256_cmp_ps(s1, best[2 * r + 1], _CMP_LT_OQ);
        best[2 * r] = _mm256_blendv_ps(best[2 * r], s0, m0);
        best[2 * r + 1] = _mm256_blendv_ps(best[2 * r + 1], s1, m1);
        bidx[2 * r] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bidx[2 * r]),
                                                           _mm256_castsi256_ps(j0), m0));
        bidx[2 * r + 1] = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(bidx[2 * r + 1]),
                                                               _mm256_castsi256_ps(j1), m1));
    }
}

// min over 16 (value, index) lanes; ties -> lowest index; an all-inf row -> index 0.
// Branch-free: the scalar loop it replaces mispredicted on every row.  Scores are never
// NaN here (a NaN never passes the strict < that writes best), so min is exact.
inline void reduce16(const __m256 b0, const __m256 b1, const __m256i i0, const __m256i i1,
                     float* out_s, int* out_j) {
    __m256 m = _mm256_min_ps(b0, b1);
    m = _mm256_min_ps(m, _mm256_permute2f128_ps(m, m, 1));
    m = _mm256_min_ps(m, _mm256_permute_ps(m, 0x4e));
    m = _mm256_min_ps(m, _mm256_permute_ps(m, 0xb1));     // every lane = the minimum
    const __m256i none = _mm256_set1_epi32(0x7fffffff);
    const __m256i c0 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(none), _mm256_castsi256_ps(i0),
                                                            _mm256_cmp_ps(b0, m, _CMP_EQ_OQ)));
    const __m256i c1 = _mm256_castps_si256(_mm256_blendv_ps(_mm256_castsi256_ps(none), _mm256_castsi256_ps(i1),
                                                            _mm256_cmp_ps(b1, m, _CMP_EQ_OQ)));
    __m256i j = _mm256_min_epi32(c0, c1);
    j = _mm256_min_epi32(j, _mm256_permute2x128_si256(j, j, 1));
    j = _mm256_min_epi32(j, _mm256_shuffle_epi32(j, 0x4e));
    j = _mm256_min_epi32(j, _mm256_shuffle_epi32(j, 0xb1));
    const int bj = _mm256_cvtsi256_si32(j);
    *out_s = _mm256_cvtss_f32(m);
    *out_j = bj == 0x7fffffff ? 0 : bj;
}

// the 8 lanes' sum by a fixed tree: the same value on every call
inline float hsum8(__m256 a) {
    const __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    const __m128 s2 = _mm_add_ps(s4, _mm_movehl_ps(s4, s4));
    return _mm_cvtss_f32(_mm_add_ss(s2, _mm_movehdup_ps(s2)));
}

// |x - c|^2 (c null: |x|^2) with 8 fixed lanes then hsum8
inline float sqdist(const float* x, const float* c, i64 d) {
    __m256 a = _mm256_setzero_ps();
    i64 t = 0;
    for (; t + 8 <= d; t += 8) {
        const __m256 v = c ? _mm256_sub_ps(_mm256_loadu_ps(x + t), _mm256_loadu_ps(c + t)) : _mm256_loadu_ps(x + t);
        a = _mm256_fmadd_ps(v, v, a);
    }
    float s = hsum8(a);
    for (; t < d; ++t) { const float v = c ? x[t] - c[t] : x[t]; s += v * v; }
    return s;
}

// f(std::integral_constant<int, R>) for R = rows in 1..M: the micro-kernels take the
// row count as a template argument so their accumulators stay in registers
template <int M, class F>
inline void by_rows(int R, F&& f) {
    if constexpr (M > 1) {
        if (R < M) return by_rows<M - 1>(R, f);
    }
    f(std::integral_constant<int, M>{});
}

// ---- AVX-512 tiles (assign; knn below), chosen at run time (spurfast_cpu_isa): same arithmetic per lane ----
// Each lane of a zmm accumulator does exactly what the matching lane of the AVX2 tile does
// (one FMA chain over t, then cterm + alpha * acc, a strict < into the lane's running best,
// panels in order, and the lowest index among the lanes that hold the minimum), so both
// paths give the same bits.  6 points x 4 panels = 24 zmm accumulators: per step of t, 4
// panel loads + 6 broadcasts feed 24 FMAs of 16 lanes (the AVX2 tile: 8 loads, 12 FMAs of 8).
// Measured (N = 1e5, one step, 2 threads): d = 64, k = 64 7.6 -> 5.0 ms; d = 16, k = 256
// 8.1 -> 4.3 ms; at k = 8 (one padded panel) no gain.
#define SPURFAST_AVX512 __attribute__((target("avx512f")))
constexpr int PR512 = 4;   // panels of 16 centroids per AVX-512 tile: MR x 4 = 24 zmm accumulators
constexpr int KNN_MR512 = 12;   // rows per AVX-512 knn tile, of 2 panels: 24 zmm accumulators

// acc[r][q] = x_r . (panel q's 16 columns), rows x[0..R) (row stride d), P consecutive d x 16
// panels: each lane one FMA chain over t from zero, as tile_dot's
template <int R, int P>
SPURFAST_AVX512 inline void tile_dot512(const float* __restrict x, i64 d, const float* __restrict panel,
                                        __m512 (&acc)[R][P]) {
    for (int r = 0; r < R; ++r)
        for (int q = 0; q < P; ++q) acc[r][q] = _mm512_setzero_ps();
    for (i64 t = 0; t < d; ++t) {
        __m512 c[P];
        for (int q = 0; q < P; ++q) c[q] = _mm512_loadu_ps(panel + q * d * NR + t * NR);
        for (int r = 0; r < R; ++r) {
            const __m512 xb = _mm512_set1_ps(x[r * d + t]);
            for (int q = 0; q < P; ++q) acc[r][q] = _mm512_fmadd_ps(xb, c[q], acc[r][q]);
        }
    }
}

// panels j .. j + P*16 of rows x[0..R) folded into each lane's running best, panel by panel
template <int R, int P>
SPURFAST_AVX512 inline void tile512(const float* __restrict x, i64 d, const float* __restrict cT, i64 j,
                                    const float* __restrict cterm, __m512 a, __m512* best, __m512i* bidx) {
    __m512 acc[R][P];
    tile_dot512<R, P>(x, d, cT + j * d, acc);
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int q = 0; q < P; ++q) {   // in panel order: the AVX2 tile's order of compares
        const __m512 tj = _mm512_loadu_ps(cterm + j + q * NR);
        const __m512i jv = _mm512_add_epi32(lane, _mm512_set1_epi32((int)(j + q * NR)));
        for (int r = 0; r < R; ++r) {
            const __m512 sc = _mm512_fmadd_ps(a, acc[r][q], tj);
            const __mmask16 lt = _mm512_cmp_ps_mask(sc, best[r], _CMP_LT_OQ);
            best[r] = _mm512_mask_mov_ps(best[r], lt, sc);
            bidx[r] = _mm512_mask_mov_epi32(bidx[r], lt, jv);
        }
    }
}

template <int R>
SPURFAST_AVX512 void rows_block512(const float* __restrict x, i64 d, const float* __restrict cT,
                                   const float* __restrict cterm, i64 kp, float alpha, float* out_s, int* out_j) {
    __m512 best[R];
    __m512i bidx[R];
    for (int r = 0; r < R; ++r) {
        best[r] = _mm512_set1_ps(std::numeric_limits<float>::infinity());
        bidx[r] = _mm512_set1_epi32(0x7fffffff);
    }
    const __m512 a = _mm512_set1_ps(alpha);
    i64 j = 0;
    for (; j + PR512 * NR <= kp; j += PR512 * NR) tile512<R, PR512>(x, d, cT, j, cterm, a, best, bidx);
    // kp not a multiple of 64: the rest in two panels, then one (each panel still in order)
    for (; j + 2 * NR <= kp; j += 2 * NR) tile512<R, 2>(x, d, cT, j, cterm, a, best, bidx);
    for (; j < kp; j += NR) tile512<R, 1>(x, d, cT, j, cterm, a, best, bidx);
    for (int r = 0; r < R; ++r) {   // reduce16's rule: the minimum, its lowest index, 0 for none
        const float m = _mm512_reduce_min_ps(best[r]);
        const __mmask16 at = _mm512_cmp_ps_mask(best[r], _mm512_set1_ps(m), _CMP_EQ_OQ);
        const int bj = _mm512_mask_reduce_min_epi32(at, bidx[r]);
        out_s[r] = m;
        out_j[r] = bj == 0x7fffffff ? 0 : bj;
    }
}

// checks the OS saves the zmm state too (libgcc reads XCR0), not only the CPUID bit
bool cpu_has_avx512() {
    __builtin_cpu_init();   // may run before libgcc's own constructor
    return __builtin_cpu_supports("avx512f");
}

const bool has_avx512 = cpu_has_avx512();
bool isa_avx512 = has_avx512;   // the assign's and knn's tiles; spurfast_cpu_isa switches them

inline bool use_avx512() { return isa_avx512; }

template <int R>
void rows_block(const float* x, i64 d, const float* cT, const float* cterm, i64 kp, float alpha,
                float* out_s, int* out_j) {
    __m256 best[2 * MR];
    __m256i bidx[2 * MR];
    for (int q = 0; q < 2 * R; ++q) {
        best[q] = _mm256_set1_ps(std::numeric_limits<float>::infinity());
        bidx[q] = _mm256_set1_epi32(0x7fffffff);
    }
    for (i64 j = 0; j < kp; j += NR) tile<R>(x, d, cT, j, cterm, alpha, best, bidx);
    for (int r = 0; r < R; ++r) reduce16(best[2 * r], best[2 * r + 1], bidx[2 * r], bidx[2 * r + 1], out_s + r, out_j + r);
}

// dst += src elementwise (the same adds, in the same row order, in update and the fused step)
inline void add_row(float* __restrict dst, const float* __restrict src, i64 d) {
    i64 t = 0;
    for (; t + 8 <= d; t += 8)
        _mm256_storeu_ps(dst + t, _mm256_add_ps(_mm256_loadu_ps(dst + t), _mm256_loadu_ps(src + t)));
    for (; t < d; ++t) dst[t] += src[t];
}

// sums (S x d) / counts (S) += the nv partials in order.  Partial v holds flat rows
// [w0[v], w1[v]) from row pbase[v] of psums / pcounts.  Worksharing over 16-row chunks of
// the output (call inside a parallel region, or serially).
inline void add_parts(i64 nv, const i64* w0, const i64* w1, const i64* pbase, const float* psums,
                      const i64* pcounts, i64 S, i64 d, float* sums, i64* counts) {
    constexpr i64 CH = 16;
#pragma omp for schedule(static)
    for (i64 c = 0; c < (S + CH - 1) / CH; ++c) {
        const i64 a = c * CH, b = a + CH < S ? a + CH : S;
        for (i64 p = 0; p < nv; ++p) {
            const i64 lo = a > w0[p] ? a : w0[p], hi = b < w1[p] ? b : w1[p];
            for (i64 f = lo; f < hi; ++f) {
                const i64 q = pbase[p] + f - w0[p];
                add_row(sums + f * d, psums + q * d, d);
                counts[f] += pcounts[q];
            }
        }
    }
}

// k-means++ seeds of group g (see spurfast_cpu_plusplus); rows_parallel: split each
// step's D^2 pass over threads (fixed static ranges: same result for any thread count,
// since each D^2 value is computed alone and the running sum stays sequential)
void plusplus_group(const float* x, i64 d, const i64* offsets, i64 G, i64 g, const i64* kpg, i64 kmax,
                    const float* u_first, const double* u_steps, i64 n_steps, float* cent, float* d2,
                    bool rows_parallel) {
    const i64 lo = offsets[g], sz = offsets[g + 1] - offsets[g];
    const i64 k = kpg[g] < kmax ? kpg[g] : kmax;
    if (sz <= 0 || k <= 0) return;
    const float* xg = x + lo * d;
    float* dg = d2 + lo;
    float* cg = cent + g * kmax * d;
    i64 first = (i64)(u_first[g] * (float)sz);
    if (first > sz - 1) first = sz - 1;
    std::memcpy(cg, xg + first * d, sizeof(float) * d);
    // D^2 sums per fixed block of rows (in row order inside a block, blocks added in
    // order): the D^2 pass produces them in parallel, the draw reads ~sz/BLOCK of them and
    // scans one block, and no sum depends on the thread count
    constexpr i64 BLOCK = 2048;
    const i64 nb = (sz + BLOCK - 1) / BLOCK;
    std::vector<double> bsum((size_t)nb);
    const float* c = cg;
    for (i64 j = 0; j < k && j <= n_steps; ++j) {
        if (j > 0) {
            const double u = u_steps[(j - 1) * G + g];
            double total = 0.0;
            for (i64 b = 0; b < nb; ++b) total += bsum[b];
            i64 pick = sz - 1;
            if (total > 0) {
                const double target = u * total;
                double before = 0.0;
                i64 b = 0;
                while (b < nb - 1 && before + bsum[b] <= target) before += bsum[b++];
                double run = before;   // rounding can put the crossing a block later: scan on
                for (i64 i = b * BLOCK; i < sz; ++i) {
                    run += dg[i];
                    if (run > target) { pick = i; break; }
                }
            } else {
                pick = (i64)(u * (double)sz);
                if (pick > sz - 1) pick = sz - 1;
            }
            float* cj = cg + j * d;
            std::memcpy(cj, xg + pick * d, sizeof(float) * d);
            c = cj;
        }
#pragma omp parallel for schedule(static) if (rows_parallel)
        for (i64 b = 0; b < nb; ++b) {
            const i64 end = (b + 1) * BLOCK < sz ? (b + 1) * BLOCK : sz;
            double acc = 0.0;
            for (i64 i = b * BLOCK; i < end; ++i) {
                const float v = sqdist(xg + i * d, c, d);
                dg[i] = (j == 0 || v < dg[i]) ? v : dg[i];
                acc += dg[i];
            }
            bsum[b] = acc;
        }
    }
}

// scores of rows x[0..R) against one 16-column panel, stored (`tile` without the argmin)
template <int R>
inline void tile_scores(const float* __restrict x, i64 d, const float* __restrict p, const float* __restrict cterm,
                        float* __restrict out /* R x 16 */) {
    __m256 acc[R][2];
    tile_dot<R>(x, d, p, acc);
    const __m256 a = _mm256_set1_ps(-2.0f);
    const __m256 t0 = _mm256_loadu_ps(cterm), t1 = _mm256_loadu_ps(cterm + 8);
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(out + r * NR, _mm256_fmadd_ps(a, acc[r][0], t0));
        _mm256_storeu_ps(out + r * NR + 8, _mm256_fmadd_ps(a, acc[r][1], t1));
    }
}

// a row's best m (score, index) so far, sorted by score (ties: earlier index first)
struct Best {
    float* s;
    int64_t* j;
    i64 m;
    i64 n = 0;
    float worst() const { return n < m ? std::numeric_limits<float>::infinity() : s[m - 1]; }
    void offer(float v, i64 idx) {   // columns arrive in increasing index: equal scores stay behind
        if (n == m && !(v < s[m - 1])) return;
        i64 pos = n < m ? n++ : m - 1;
        while (pos > 0 && v < s[pos - 1]) { s[pos] = s[pos - 1]; j[pos] = j[pos - 1]; --pos; }
        s[pos] = v;
        j[pos] = idx;
    }
};

template <int R>
void knn_block(const float* z, i64 d, const float* panels, const float* cterm, i64 c0, i64 c1, i64 row0,
               Best* best) {
    alignas(32) float sc[MR * NR];
    for (i64 c = c0; c < c1; c += NR) {
        tile_scores<R>(z + row0 * d, d, panels + c * d, cterm + c, sc);
        for (int r = 0; r < R; ++r) {
            const __m256 w = _mm256_set1_ps(best[r].worst());
            const int lt = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(sc + r * NR), w, _CMP_LT_OQ)) |
                           (_mm256_movemask_ps(_mm256_cmp_ps(_mm256_load_ps(sc + r * NR + 8), w, _CMP_LT_OQ)) << 8);
            if (!lt) continue;
            for (int l = 0; l < NR; ++l)
                if (((lt >> l) & 1) && c + l != row0 + r) best[r].offer(sc[r * NR + l], c + l);
        }
    }
}

// knn_block with an AVX-512 tile of KNN_MR512 rows x 2 panels (then 1): the same scores bit
// for bit (the assign tile's per-lane argument), offered to each row in the same column order.
// 12 x 2 rather than the assign's 6 x 4: at d = 16 a tile's few FMAs per score leave the
// scores' compares and the panels' L2 reads to bound it, and more rows share each panel read
// (n = 40,000, d = 16, k = 10: 0.79x the AVX2 tile's time, 6 x 4 0.81x; d = 64: 0.66x, 0.76x)
template <int R, int P>
SPURFAST_AVX512 inline void knn_tile512(const float* __restrict x, i64 d, const float* __restrict panel,
                                        const float* __restrict cterm, i64 c, i64 row0, Best* best) {
    __m512 acc[R][P];
    tile_dot512<R, P>(x, d, panel, acc);
    alignas(64) float sc[R * P * NR];
    const __m512 a = _mm512_set1_ps(-2.0f);
    for (int q = 0; q < P; ++q) {
        const __m512 tq = _mm512_loadu_ps(cterm + q * NR);
        for (int r = 0; r < R; ++r) _mm512_store_ps(sc + (r * P + q) * NR, _mm512_fmadd_ps(a, acc[r][q], tq));
    }
    for (int r = 0; r < R; ++r)
        for (int q = 0; q < P; ++q) {
            const float* sr = sc + (r * P + q) * NR;
            const __mmask16 lt = _mm512_cmp_ps_mask(_mm512_load_ps(sr), _mm512_set1_ps(best[r].worst()), _CMP_LT_OQ);
            if (!lt) continue;
            const i64 c0 = c + q * NR;
            for (int l = 0; l < NR; ++l)
                if (((lt >> l) & 1) && c0 + l != row0 + r) best[r].offer(sr[l], c0 + l);
        }
}

template <int R>
SPURFAST_AVX512 void knn_block512(const float* z, i64 d, const float* panels, const float* cterm, i64 c0, i64 c1,
                                  i64 row0, Best* best) {
    const float* x = z + row0 * d;
    i64 c = c0;
    for (; c + 2 * NR <= c1; c += 2 * NR) knn_tile512<R, 2>(x, d, panels + c * d, cterm + c, c, row0, best);
    for (; c < c1; c += NR) knn_tile512<R, 1>(x, d, panels + c * d, cterm + c, c, row0, best);
}

// true where no column left out of row zi's candidates can be among its k nearest: the
// reference's knn_screen_certain, in the same float64 steps.  `left`: the smallest score
// |zj|^2 - 2 zi.zj a left-out column can have (+inf: none left out); `kth`: the k-th
// candidate's direct fp32 distance.  Scores err by at most (2d + 3)(1 + 1e-3) u
// (|zi| + |zj|)^2 (any summation order, FMA or not; the |zj|^2 column included); eps is 4 (d + 2) u
// (|zi| + R)^2, twice that; a direct fp32 distance is at least (1 - gamma_{d+3}) times the
// true one, (1 - 2 (d + 3) u) here.  Certain when the left-out columns' lowest possible
// direct distance still exceeds kth strictly.
inline bool knn_certain(float left, const float* zi, i64 d, float kth, double R, double u) {
    double zn = 0;
    for (i64 t = 0; t < d; ++t) zn += (double)zi[t] * (double)zi[t];
    const double r = std::sqrt(zn) + R;
    const double eps = 4.0 * (double)(d + 2) * u * r * r;
    double lo = (double)left + zn - eps;
    if (lo > 0) lo *= 1.0 - 2.0 * (double)(d + 3) * u;
    return lo > (double)kth;
}

// point p's kk nearest rows of z (n x d) by sqdist over every column, nearest first,
// equal distances to the lower index (columns go in increasing index, a tie stays behind),
// no row excluded: the reference's knn_measure.  rd, ri: scratch of kk.  out: kk entries.
inline void knn_measure_one(const float* z, i64 d, i64 n, const float* p, i64 kk, std::vector<float>& rd,
                            std::vector<i64>& ri, int64_t* out) {
    i64 cnt = 0;
    for (i64 j = 0; j < n; ++j) {
        const float v = sqdist(p, z + j * d, d);
        if (cnt == kk && !(v < rd[kk - 1])) continue;
        i64 pos = cnt < kk ? cnt++ : kk - 1;
        while (pos > 0 && v < rd[pos - 1]) { rd[pos] = rd[pos - 1]; ri[pos] = ri[pos - 1]; --pos; }
        rd[pos] = v;
        ri[pos] = j;
    }
    for (i64 q = 0; q < kk; ++q) out[q] = q < cnt ? ri[q] : -1;
}

// f(p, lo, hi) for the `parts` contiguous ranges of [0, N) (the Python reference's cut),
// shared out over the threads of the enclosing parallel region, consecutive parts to one
// thread (one contiguous stream each; a part's result never depends on its thread)
template <class F>
inline void each_part(i64 N, i64 parts, F&& f) {
#pragma omp for schedule(static)
    for (i64 p = 0; p < parts; ++p) f(p, N * p / parts, N * (p + 1) / parts);
}

// f(r0, r1, v) over part p's rows in at most three runs: g0's rows into window v = 2p,
// the groups between (v = -1: the output), g1's rows into v = 2p+1
template <class F>
inline void part_runs(const i64* offsets, i64 G, i64 N, i64 parts, i64 p, F&& f) {
    const i64 lo = N * p / parts, hi = N * (p + 1) / parts;
    if (hi <= lo) return;
    const i64 g0 = std::upper_bound(offsets, offsets + G + 1, lo) - offsets - 1;
    const i64 g1 = std::upper_bound(offsets, offsets + G + 1, hi - 1) - offsets - 1;
    if (g1 == g0) return f(lo, hi, 2 * p);
    f(lo, offsets[g0 + 1], 2 * p);
    if (offsets[g1] > offsets[g0 + 1]) f(offsets[g0 + 1], offsets[g1], (i64)-1);
    f(offsets[g1], hi, 2 * p + 1);
}

// zero part p's partial rows: here, by the thread that fills them (zeroed by the caller
// they would sit in its cache, and other threads' first touches miss)
inline void zero_windows(i64 p, const i64* pbase, float* psums, i64* pcounts, i64 d) {
    const i64 a = pbase[2 * p], b = pbase[2 * p + 2];
    std::memset(psums + a * d, 0, sizeof(float) * (size_t)((b - a) * d));
    std::memset(pcounts + a, 0, sizeof(i64) * (size_t)(b - a));
}

}  // namespace

extern "C" {

// Rows [r0, r1) of x (N x d, sorted by group, CSR offsets[G+1]).  cT: (G, kp/16, d, 16),
// cterm: (G, kp), cent: (G, kmax, d) fp32 (for exact winner distances), xn: |x|^2 per row
// or null.  cosine: score -x.c_hat, dist = 1 + s / |x|.  Writes assign[r], dist[r].
// sums (x d) and counts, when not null: each row is also added to its winner's sum while
// it is still in L1 (the fused step; no second pass over x); they hold flat rows
// g*kmax + j from sbase on (the groups of rows [r0, r1) at least).
void spurfast_cpu_assign(const float* x, i64 d, const i64* offsets, i64 G, const float* cT,
                         const float* cterm, i64 kp, const float* cent, i64 kmax, const float* xn,
                         int cosine, i64 r0, i64 r1, i64* assign, float* dist, float* sums, i64* counts,
                         i64 sbase) {
    const float alpha = cosine ? -1.0f : -2.0f;
    float s[MR];
    int jj[MR];
    const bool wide = use_avx512();
    // first group with rows at or after r0
    i64 g = 0;
    while (g < G && offsets[g + 1] <= r0) ++g;
    for (; g < G && offsets[g] < r1; ++g) {
        const i64 lo = offsets[g] > r0 ? offsets[g] : r0;
        const i64 hi = offsets[g + 1] < r1 ? offsets[g + 1] : r1;
        const float* cTg = cT + g * d * kp;
        const float* tg = cterm + g * kp;
        const float* cg = cent + g * kmax * d;
        for (i64 i = lo; i < hi; i += MR) {
            const int R = (int)((hi - i) < MR ? (hi - i) : MR);
            const float* xi = x + i * d;
            if (wide) by_rows<MR>(R, [&](auto rows) {
                rows_block512<decltype(rows)::value>(xi, d, cTg, tg, kp, alpha, s, jj); });
            else by_rows<MR>(R, [&](auto rows) { rows_block<decltype(rows)::value>(xi, d, cTg, tg, kp, alpha, s, jj); });
            for (int r = 0; r < R; ++r) {
                const float* xr = xi + r * d;
                const float* cr = cg + (i64)jj[r] * d;
                float xx;
                if (xn) xx = xn[i + r];
                else xx = sqdist(xr, nullptr, d);
                float dv;
                // a NaN row (NaN |x|, every score NaN) must give NaN as the reference does:
                // no fmax / (dv > 0) clamps, which turn NaN into the other operand
                if (cosine) {
                    const float nx = std::sqrt(xx);
                    dv = 1.0f + s[r] / (nx < 1e-12f ? 1e-12f : nx);
                    if (dv < 0.0f) dv = 0.0f;   // 1 - cos rounds below 0; NaN stays NaN
                } else {
                    // s + |x|^2 cancels digits for tight clusters away from the origin:
                    // recompute those directly, as the reference does
                    const float cc = tg[jj[r]];
                    dv = s[r] + xx;
                    if (!(dv >= (1.0f / 16) * (xx + cc))) dv = sqdist(xr, cr, d);
                    dv = dv < 0.f ? 0.f : dv;
                }
                assign[i + r] = jj[r];
                dist[i + r] = dv;
                if (sums) {
                    add_row(sums + (g * kmax + jj[r] - sbase) * d, xr, d);
                    counts[g * kmax + jj[r] - sbase] += 1;
                }
            }
        }
    }
}

// sums[flat[i] - f0] += x[i] and counts[flat[i] - f0] += 1 for rows [r0, r1) (buffers
// for flat rows [f0, f1), zeroed by the caller).  Fails (returns the row) on a flat index
// outside [f0, f1).
i64 spurfast_cpu_update(const float* x, i64 d, const i64* flat, i64 f0, i64 f1, i64 r0, i64 r1,
                        float* sums, i64* counts) {
    const uint64_t n = (uint64_t)(f1 - f0);
    for (i64 i = r0; i < r1; ++i) {
        const i64 f = flat[i] - f0;
        if ((uint64_t)f >= n) return i;   // unsigned: one compare for both bounds
        add_row(sums + f * d, x + i * d, d);
        counts[f] += 1;
    }
    return -1;
}

// The assign's and knn's instruction set: request 1 = AVX-512 where the CPU has it, 0 = AVX2, -1 =
// leave it; returns 1 or 0, the one in effect (call between kernel calls, not during one)
int spurfast_cpu_isa(int request) {
    if (request >= 0) isa_avx512 = request == 1 && has_avx512;
    return isa_avx512 ? 1 : 0;
}

int spurfast_cpu_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// Row parts and their partial sums.  Part p holds rows [N*p/parts, N*(p+1)/parts) (rows
// sorted by group, CSR offsets), of groups g0..g1.  Only g0 and g1 can have rows in other
// parts too: their rows go to partials of the part's own, windows v = 2p (flat rows
// [g0*kmax, (g0+1)*kmax)) and v = 2p+1 (g1's, empty when g1 == g0), and the rows of the
// groups between go straight to the output, which no other part touches there.  The
// partials are then added into the output in window order (add_parts), so every sum
// depends on the cut alone, and partials cost ~2*parts*kmax*d, whatever G.
// w0/w1 (2*parts): window v's flat rows; pbase (2*parts + 1): its first partial row.
void spurfast_cpu_plan(const i64* offsets, i64 G, i64 kmax, i64 N, i64 parts, i64* w0, i64* w1, i64* pbase) {
    pbase[0] = 0;
    for (i64 p = 0; p < parts; ++p) {
        const i64 lo = N * p / parts, hi = N * (p + 1) / parts;
        i64 g0 = 0, g1 = -1;   // no rows: two empty windows
        if (hi > lo) {
            g0 = std::upper_bound(offsets, offsets + G + 1, lo) - offsets - 1;
            g1 = std::upper_bound(offsets, offsets + G + 1, hi - 1) - offsets - 1;
        }
        w0[2 * p] = g0 * kmax;
        w1[2 * p] = g1 >= g0 ? (g0 + 1) * kmax : g0 * kmax;
        w0[2 * p + 1] = g1 * kmax;
        w1[2 * p + 1] = g1 > g0 ? (g1 + 1) * kmax : g1 * kmax;
        for (i64 v = 2 * p; v < 2 * p + 2; ++v) pbase[v + 1] = pbase[v] + (w1[v] - w0[v]);
    }
}

// Part p of spurfast_cpu_update_parts (windows and partial buffers from spurfast_cpu_plan;
// sums/counts: the zeroed output).  Returns the first bad row, or -1.
i64 spurfast_cpu_update_part(const float* x, i64 d, const i64* flat, const i64* offsets, i64 G, i64 kmax,
                             i64 N, i64 parts, i64 p, const i64* w0, const i64* w1, const i64* pbase,
                             float* psums, i64* pcounts, float* sums, i64* counts) {
    zero_windows(p, pbase, psums, pcounts, d);
    i64 bad = -1;
    part_runs(offsets, G, N, parts, p, [&](i64 r0, i64 r1, i64 v) {
        if (bad >= 0) return;
        bad = v < 0 ? spurfast_cpu_update(x, d, flat, 0, G * kmax, r0, r1, sums, counts)
                    : spurfast_cpu_update(x, d, flat, w0[v], w1[v], r0, r1, psums + pbase[v] * d, pcounts + pbase[v]);
    });
    return bad;
}

// Part p of spurfast_cpu_assign_parts (as spurfast_cpu_update_part; sums null: no sums)
void spurfast_cpu_assign_part(const float* x, i64 d, const i64* offsets, i64 G, const float* cT,
                              const float* cterm, i64 kp, const float* cent, i64 kmax, const float* xn,
                              int cosine, i64 N, i64 parts, i64 p, i64* assign, float* dist,
                              const i64* w0, const i64* pbase, float* psums, i64* pcounts,
                              float* sums, i64* counts) {
    if (!sums) {
        spurfast_cpu_assign(x, d, offsets, G, cT, cterm, kp, cent, kmax, xn, cosine, N * p / parts,
                            N * (p + 1) / parts, assign, dist, nullptr, nullptr, 0);
        return;
    }
    zero_windows(p, pbase, psums, pcounts, d);
    part_runs(offsets, G, N, parts, p, [&](i64 r0, i64 r1, i64 v) {
        if (v < 0)
            spurfast_cpu_assign(x, d, offsets, G, cT, cterm, kp, cent, kmax, xn, cosine, r0, r1, assign, dist,
                                sums, counts, 0);
        else
            spurfast_cpu_assign(x, d, offsets, G, cT, cterm, kp, cent, kmax, xn, cosine, r0, r1, assign, dist,
                                psums + pbase[v] * d, pcounts + pbase[v], w0[v]);
    });
}

// add_parts on its own (the Python-threads path): nv = 2*parts windows
void spurfast_cpu_add_parts(i64 nv, const i64* w0, const i64* w1, const i64* pbase, const float* psums,
                            const i64* pcounts, i64 S, i64 d, float* sums, i64* counts) {
    add_parts(nv, w0, w1, pbase, psums, pcounts, S, d, sums, counts);
}

namespace {
struct Plan {
    std::vector<i64> w0, w1, pbase;
    std::unique_ptr<float[]> sums;
    std::unique_ptr<i64[]> counts;
    Plan(const i64* offsets, i64 G, i64 kmax, i64 N, i64 parts, i64 d)
        : w0((size_t)(2 * parts)), w1((size_t)(2 * parts)), pbase((size_t)(2 * parts + 1)) {
        spurfast_cpu_plan(offsets, G, kmax, N, parts, w0.data(), w1.data(), pbase.data());
        sums.reset(new float[(size_t)(pbase.back() * d)]);   // zeroed per part (zero_windows)
        counts.reset(new i64[(size_t)pbase.back()]);
    }
};
}  // namespace

// spurfast_cpu_assign over all N rows, `parts` fixed ranges on up to `threads` threads.
// sums/counts (G*kmax x d / G*kmax, zeroed; or null): rows added as spurfast_cpu_plan
// says, exactly as spurfast_cpu_update_parts adds them: the fused sums equal
// assign-then-update's bit for bit.
void spurfast_cpu_assign_parts(const float* x, i64 d, const i64* offsets, i64 G, const float* cT,
                               const float* cterm, i64 kp, const float* cent, i64 kmax, const float* xn,
                               int cosine, i64 N, i64 parts, i64 threads, i64* assign, float* dist,
                               float* sums, i64* counts) {
    Plan plan(offsets, G, kmax, N, sums ? parts : 0, d);
#pragma omp parallel num_threads((int)(threads < parts ? threads : parts))
    {
        each_part(N, parts, [&](i64 p, i64, i64) {
            spurfast_cpu_assign_part(x, d, offsets, G, cT, cterm, kp, cent, kmax, xn, cosine, N, parts, p, assign,
                                     dist, plan.w0.data(), plan.pbase.data(), plan.sums.get(), plan.counts.get(),
                                     sums, counts);
        });
        if (sums)
            add_parts(2 * parts, plan.w0.data(), plan.w1.data(), plan.pbase.data(), plan.sums.get(),
                      plan.counts.get(), G * kmax, d, sums, counts);
    }
}

// spurfast_cpu_update over all N rows (sorted by group, CSR offsets) in `parts` fixed
// ranges on up to `threads` threads, as spurfast_cpu_plan says: the result depends on
// `parts` only.  sums/counts zeroed.  Returns the first bad row, or -1.
i64 spurfast_cpu_update_parts(const float* x, i64 d, const i64* flat, const i64* offsets, i64 G, i64 kmax,
                              i64 N, i64 parts, i64 threads, float* sums, i64* counts) {
    Plan plan(offsets, G, kmax, N, parts, d);
    std::vector<i64> bad((size_t)parts, -1);
#pragma omp parallel num_threads((int)(threads < parts ? threads : parts))
    {
        each_part(N, parts, [&](i64 p, i64, i64) {
            bad[p] = spurfast_cpu_update_part(x, d, flat, offsets, G, kmax, N, parts, p, plan.w0.data(),
                                              plan.w1.data(), plan.pbase.data(), plan.sums.get(), plan.counts.get(),
                                              sums, counts);
        });
        add_parts(2 * parts, plan.w0.data(), plan.w1.data(), plan.pbase.data(), plan.sums.get(), plan.counts.get(),
                  G * kmax, d, sums, counts);
    }
    for (i64 p = 0; p < parts; ++p)
        if (bad[p] >= 0) return bad[p];
    return -1;
}

// k-means++ seeds of every group (rows sorted by group, CSR offsets).  u_first[g]: the
// first seed's draw (fp32, as torch.rand gives it); u_steps[(j-1)*G + g]: step j's draw
// (fp64), j = 1 .. n_steps.  Step j picks the first row whose running D^2 sum exceeds
// u * total (all-zero D^2: a uniform pick), as the reference's searchsorted does, then
// D^2 = min(D^2, |x - seed|^2).  cent (G x kmax x d) zeroed by the caller; d2 scratch (N).
void spurfast_cpu_plusplus(const float* x, i64 d, const i64* offsets, i64 G, const i64* kpg, i64 kmax,
                           const float* u_first, const double* u_steps, i64 n_steps, float* cent, float* d2) {
    // a group this large seeds with every thread on each step's D^2 pass; the rest
    // take one thread per group
    constexpr i64 BIG = 1 << 15;
    for (i64 g = 0; g < G; ++g)
        if (offsets[g + 1] - offsets[g] >= BIG)
            plusplus_group(x, d, offsets, G, g, kpg, kmax, u_first, u_steps, n_steps, cent, d2, true);
#pragma omp parallel for schedule(dynamic, 1)
    for (i64 g = 0; g < G; ++g)
        if (offsets[g + 1] - offsets[g] < BIG)
            plusplus_group(x, d, offsets, G, g, kpg, kmax, u_first, u_steps, n_steps, cent, d2, false);
}

// k nearest other rows of rows [r0, r1) of z (n x d, fp32): panels (np/16, d, 16) and
// cterm (np; |zj|^2, +inf past n) as pack_centroids makes them for one group; m >= k
// candidates per row by score (equal scores: lower index first), re-ranked by sum
// (zi - zj)^2 with equal distances going to the lower index, as the reference does (the
// candidate order would not do: two points at exactly the same distance can have scores
// |zj|^2 - 2 zi.zj that round differently).  Left as known: points whose true distances
// tie but whose direct fp32 distances round apart (the reference rounds them too), and
// a tie cut at the m-th candidate by score.  out: (n, k).
// The scores round by up to ~(d + 2) u (|zi| + |zj|)^2: a row whose screen may have left
// out a true neighbour (knn_certain, the reference's knn_screen_certain: R the largest row
// norm, u the unit roundoff, both from the caller) is flagged in `unsure` (n bytes) and
// measured again directly against every column by the caller (the reference's
// knn_remeasure, with spurfast_cpu_knn_measure), once per distinct latent.
void spurfast_cpu_knn(const float* z, i64 d, i64 n, const float* panels, const float* cterm, i64 np_, i64 k,
                      i64 m, double R, double u, i64 r0, i64 r1, int64_t* out, uint8_t* unsure) {
    constexpr i64 ROWS = 16 * MR;      // rows sharing one pass over a column chunk
    const bool wide = use_avx512();
    const i64 rows = wide ? KNN_MR512 : MR;   // rows per tile
    constexpr i64 COLS = 2048;         // columns per chunk: 2048 x d floats stay in L2
    std::vector<float> bs((size_t)(ROWS * m));
    std::vector<int64_t> bj((size_t)(ROWS * m));
    std::vector<float> ex((size_t)m);
    std::vector<i64> order((size_t)m);
    for (i64 a = r0; a < r1; a += ROWS) {
        const i64 b = a + ROWS < r1 ? a + ROWS : r1;
        std::vector<Best> best;
        best.reserve((size_t)(b - a));
        for (i64 i = a; i < b; ++i) best.push_back(Best{bs.data() + (i - a) * m, bj.data() + (i - a) * m, m});
        for (i64 c0 = 0; c0 < np_; c0 += COLS) {
            const i64 c1 = c0 + COLS < np_ ? c0 + COLS : np_;
            for (i64 i = a; i < b; i += rows) {
                Best* bb = best.data() + (i - a);
                const int R = (int)(b - i < rows ? b - i : rows);
                if (wide) by_rows<KNN_MR512>(R, [&](auto r) {
                    knn_block512<decltype(r)::value>(z, d, panels, cterm, c0, c1, i, bb); });
                else by_rows<MR>(R, [&](auto r) { knn_block<decltype(r)::value>(z, d, panels, cterm, c0, c1, i, bb); });
            }
        }
        for (i64 i = a; i < b; ++i) {
            const Best& r = best[i - a];
            for (i64 q = 0; q < r.n; ++q) {
                ex[q] = sqdist(z + i * d, z + r.j[q] * d, d);
                order[q] = q;
            }
            std::stable_sort(order.begin(), order.begin() + r.n, [&](i64 u, i64 v) {
                return ex[u] < ex[v] || (ex[u] == ex[v] && r.j[u] < r.j[v]);
            });
            // -1: NaN or inf scores only, and latent_knn refuses z that would give them
            for (i64 q = 0; q < k; ++q) out[i * k + q] = q < r.n ? r.j[order[q]] : -1;
            // every column left out scores at least the m-th candidate's (none is left out
            // when all n - 1 others are candidates)
            const float left = (m < n - 1 && r.n == m) ? r.s[m - 1] : std::numeric_limits<float>::infinity();
            const float kth = k <= r.n ? ex[order[k - 1]] : std::numeric_limits<float>::infinity();
            unsure[i] = !knn_certain(left, z + i * d, d, kth, R, u);
        }
    }
}

// spurfast_cpu_knn over rows [r0, r1) in `parts` fixed ranges, one thread each (the caller
// walks the rows in blocks of about a second, so Ctrl-C is seen between them)
void spurfast_cpu_knn_parts(const float* z, i64 d, i64 n, const float* panels, const float* cterm, i64 np_, i64 k,
                            i64 m, double R, double u, i64 r0, i64 r1, i64 parts, int64_t* out, uint8_t* unsure) {
#pragma omp parallel num_threads((int)parts)
    each_part(r1 - r0, parts, [&](i64, i64 lo, i64 hi) {
        spurfast_cpu_knn(z, d, n, panels, cterm, np_, k, m, R, u, r0 + lo, r0 + hi, out, unsure);
    });
}

// points [p0, p1) of pts (npts x d): each one's kk nearest rows of z (n x d), no row
// excluded (knn_measure_one); out: (npts, kk)
void spurfast_cpu_knn_measure(const float* z, i64 d, i64 n, const float* pts, i64 kk, i64 p0, i64 p1,
                              int64_t* out) {
    std::vector<float> rd((size_t)kk);
    std::vector<i64> ri((size_t)kk);
    for (i64 p = p0; p < p1; ++p) knn_measure_one(z, d, n, pts + p * d, kk, rd, ri, out + p * kk);
}

void spurfast_cpu_knn_measure_parts(const float* z, i64 d, i64 n, const float* pts, i64 npts, i64 kk, i64 parts,
                                    int64_t* out) {
#pragma omp parallel num_threads((int)parts)
    each_part(npts, parts, [&](i64, i64 lo, i64 hi) { spurfast_cpu_knn_measure(z, d, n, pts, kk, lo, hi, out); });
}

}  // extern "C"
