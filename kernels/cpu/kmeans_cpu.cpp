// Fused CPU k-means steps (AVX2 + FMA), called through ctypes by kernels/kmeans_cpu.py.
//
// assign: for every point the nearest centroid of its own group, distances formed in
// registers and reduced on the spot (the reference writes a distance block to memory and
// runs numpy's argmin over it; that pass, and the separate winner-distance pass, are gone).
// Centroids arrive packed per group in 16-centroid panels, cT[g][j/16][t][j%16] (each
// tile's d x 16 block contiguous: a strided d x kp layout put every row of a tile in the
// same few L1 sets once kp*4 bytes reached 1 KB; kp = kmax rounded up to 16), with a
// per-centroid term cterm[g][j] (|c|^2 for L2, 0 for cosine, +inf for padding), so the
// score s = cterm + alpha * x.c (alpha = -2 L2, -1 cosine) is minimised with 16-wide
// vector compares.  Micro-tile: 6 points x 16 centroids = 12 ymm accumulators.
// Ties go to the lower centroid index (strict < within a lane; lowest index across lanes).
//
// plusplus: batched k-means++ seeding with the reference's draws (passed in): one thread
// per group (all threads on one D^2 pass for a very large group), D^2 in fp32 updated in
// one pass per seed, its running sum in fp64.
//
// knn: every row's k nearest other rows (exact), scores |zj|^2 - 2 zi.zj from the same
// 6 x 16 register tiles, each row keeping its best m candidates by score in a short
// sorted list (a vector compare against the list's worst skips almost every tile), then
// the m candidates re-ranked by directly computed distances as the reference does.
//
// update: sums of a contiguous row range into a caller-owned partial buffer (the caller
// splits rows over threads and adds the partials in a fixed order: deterministic).  The
// assign adds each row into the same kind of partials when given them (the one-pass step).
//
// Threads: OpenMP over fixed contiguous row ranges (`parts` of them, cut as the Python
// reference cuts them), so results never depend on scheduling.  The library is loaded
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

// f(std::integral_constant<int, R>) for R = rows in 1..MR: the micro-kernels take the
// row count as a template argument so their accumulators stay in registers
template <class F>
inline void by_rows(int R, F&& f) {
    switch (R) {
        case 6: f(std::integral_constant<int, 6>{}); break;
        case 5: f(std::integral_constant<int, 5>{}); break;
        case 4: f(std::integral_constant<int, 4>{}); break;
        case 3: f(std::integral_constant<int, 3>{}); break;
        case 2: f(std::integral_constant<int, 2>{}); break;
        default: f(std::integral_constant<int, 1>{}); break;
    }
}

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

// parts x n partial buffers: add parts 1.. into part 0 in order (call inside a parallel region)
inline void add_parts(float* sums, i64* counts, i64 S, i64 d, i64 parts) {
    const i64 n = S * d;
#pragma omp for schedule(static)
    for (i64 e = 0; e < n; ++e)
        for (i64 p = 1; p < parts; ++p) sums[e] += sums[p * n + e];
#pragma omp for schedule(static)
    for (i64 e = 0; e < S; ++e)
        for (i64 p = 1; p < parts; ++p) counts[e] += counts[p * S + e];
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

// f(p, lo, hi) for the `parts` contiguous ranges of [0, N) (the Python reference's cut),
// shared out over the threads of the enclosing parallel region
template <class F>
inline void each_part(i64 N, i64 parts, F&& f) {
#pragma omp for schedule(static, 1)
    for (i64 p = 0; p < parts; ++p) f(p, N * p / parts, N * (p + 1) / parts);
}

}  // namespace

extern "C" {

// Rows [r0, r1) of x (N x d, sorted by group, CSR offsets[G+1]).  cT: (G, kp/16, d, 16),
// cterm: (G, kp), cent: (G, kmax, d) fp32 (for exact winner distances), xn: |x|^2 per row
// or null.  cosine: score -x.c_hat, dist = 1 + s / |x|.  Writes assign[r], dist[r].
// sums (G*kmax x d) and counts (G*kmax), when not null: each row is also added to its
// winner's sum while it is still in L1 (the fused step; no second pass over x).
void spurfast_cpu_assign(const float* x, i64 d, const i64* offsets, i64 G, const float* cT,
                         const float* cterm, i64 kp, const float* cent, i64 kmax, const float* xn,
                         int cosine, i64 r0, i64 r1, i64* assign, float* dist, float* sums, i64* counts) {
    const float alpha = cosine ? -1.0f : -2.0f;
    float s[MR];
    int jj[MR];
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
            by_rows(R, [&](auto rows) { rows_block<decltype(rows)::value>(xi, d, cTg, tg, kp, alpha, s, jj); });
            for (int r = 0; r < R; ++r) {
                const float* xr = xi + r * d;
                const float* cr = cg + (i64)jj[r] * d;
                float xx;
                if (xn) xx = xn[i + r];
                else xx = sqdist(xr, nullptr, d);
                float dv;
                if (cosine) {
                    dv = 1.0f + s[r] / std::fmax(std::sqrt(xx), 1e-12f);
                } else {
                    // s + |x|^2 cancels digits for tight clusters away from the origin:
                    // recompute those directly, as the reference does
                    const float cc = tg[jj[r]];
                    dv = s[r] + xx;
                    if (!(dv >= (1.0f / 16) * (xx + cc))) dv = sqdist(xr, cr, d);
                    dv = dv > 0.f ? dv : 0.f;
                }
                assign[i + r] = jj[r];
                dist[i + r] = dv;
                if (sums) {
                    add_row(sums + (g * kmax + jj[r]) * d, xr, d);
                    counts[g * kmax + jj[r]] += 1;
                }
            }
        }
    }
}

// sums[flat[i]] += x[i] and counts[flat[i]] += 1 for rows [r0, r1) (buffers zeroed by
// the caller).  Fails (returns the row) on a flat index outside [0, S).
i64 spurfast_cpu_update(const float* x, i64 d, const i64* flat, i64 S, i64 r0, i64 r1,
                        float* sums, i64* counts) {
    for (i64 i = r0; i < r1; ++i) {
        const i64 f = flat[i];
        if (f < 0 || f >= S) return i;
        add_row(sums + f * d, x + i * d, d);
        counts[f] += 1;
    }
    return -1;
}

int spurfast_cpu_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// spurfast_cpu_assign over all N rows, `parts` fixed ranges on up to `parts` threads.
// sums/counts (parts x G*kmax x d / parts x G*kmax, zeroed; or null): part p's rows go
// into partial p, then the partials are added into part 0 in order, exactly as
// spurfast_cpu_update_parts adds them: the fused sums equal assign-then-update's bit for bit.
void spurfast_cpu_assign_parts(const float* x, i64 d, const i64* offsets, i64 G, const float* cT,
                               const float* cterm, i64 kp, const float* cent, i64 kmax, const float* xn,
                               int cosine, i64 N, i64 parts, i64* assign, float* dist, float* sums,
                               i64* counts) {
    const i64 S = G * kmax;
#pragma omp parallel num_threads((int)parts)
    {
        each_part(N, parts, [&](i64 p, i64 lo, i64 hi) {
            spurfast_cpu_assign(x, d, offsets, G, cT, cterm, kp, cent, kmax, xn, cosine, lo, hi, assign, dist,
                                sums ? sums + p * S * d : nullptr, sums ? counts + p * S : nullptr);
        });
        if (sums) add_parts(sums, counts, S, d, parts);
    }
}

// spurfast_cpu_update over all N rows: part p sums into sums + p*S*d (parts x S x d,
// zeroed by the caller), then parts 1.. are added into part 0 in order, so the result
// depends on `parts` only.  Returns the first bad row, or -1.
i64 spurfast_cpu_update_parts(const float* x, i64 d, const i64* flat, i64 S, i64 N, i64 parts,
                              float* sums, i64* counts) {
    std::vector<i64> bad((size_t)parts, -1);
#pragma omp parallel num_threads((int)parts)
    {
        each_part(N, parts, [&](i64 p, i64 lo, i64 hi) {
            bad[p] = spurfast_cpu_update(x, d, flat, S, lo, hi, sums + p * S * d, counts + p * S);
        });
        add_parts(sums, counts, S, d, parts);
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
// candidates per row by score, re-ranked by sum (zi - zj)^2 (stable: ties keep the
// candidate order, i.e. lower score then lower index).  out: (n, k).
void spurfast_cpu_knn(const float* z, i64 d, i64 n, const float* panels, const float* cterm, i64 np_, i64 k,
                      i64 m, i64 r0, i64 r1, int64_t* out) {
    constexpr i64 ROWS = 16 * MR;      // rows sharing one pass over a column chunk
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
            for (i64 i = a; i < b; i += MR) {
                Best* bb = best.data() + (i - a);
                by_rows((int)(b - i < MR ? b - i : MR),
                        [&](auto rows) { knn_block<decltype(rows)::value>(z, d, panels, cterm, c0, c1, i, bb); });
            }
        }
        for (i64 i = a; i < b; ++i) {
            const Best& r = best[i - a];
            for (i64 q = 0; q < r.n; ++q) {
                ex[q] = sqdist(z + i * d, z + r.j[q] * d, d);
                order[q] = q;
            }
            std::stable_sort(order.begin(), order.begin() + r.n, [&](i64 u, i64 v) { return ex[u] < ex[v]; });
            for (i64 q = 0; q < k; ++q) out[i * k + q] = q < r.n ? r.j[order[q]] : -1;   // -1: NaN scores only
        }
    }
}

// spurfast_cpu_knn over all n rows in `parts` fixed ranges, one thread each
void spurfast_cpu_knn_parts(const float* z, i64 d, i64 n, const float* panels, const float* cterm, i64 np_, i64 k,
                            i64 m, i64 parts, int64_t* out) {
#pragma omp parallel num_threads((int)parts)
    each_part(n, parts, [&](i64, i64 lo, i64 hi) { spurfast_cpu_knn(z, d, n, panels, cterm, np_, k, m, lo, hi, out); });
}

}  // extern "C"
