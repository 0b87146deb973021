// Fused CPU k-means steps (AVX2 + FMA), called through ctypes by kernels/kmeans_cpu.py.
//
// assign: for every point the nearest centroid of its own group, distances formed in
// registers and reduced on the spot (the reference writes a distance block to memory and
// runs numpy's argmin over it; that pass, and the separate winner-distance pass, are gone).
// Centroids arrive packed per group as cT[g][t][j] (d x kp, kp = kmax rounded up to 16)
// with a per-centroid term cterm[g][j] (|c|^2 for L2, 0 for cosine, +inf for padding), so
// the score s = cterm + alpha * x.c (alpha = -2 L2, -1 cosine) is minimised with
// 16-wide vector compares.  Micro-tile: 6 points x 16 centroids = 12 ymm accumulators.
// Ties go to the lower centroid index (strict < within a lane; lowest index across lanes).
//
// update: sums of a contiguous row range into a caller-owned partial buffer (the caller
// splits rows over threads and adds the partials in a fixed order: deterministic).
//
// Threads: none here; the Python side runs fixed row ranges in its own threads (ctypes
// releases the GIL), so no second OpenMP runtime shares the process with torch's.
#include <immintrin.h>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

typedef int64_t i64;

namespace {

constexpr int NR = 16;   // centroids per micro-tile (two ymm)
constexpr int MR = 6;    // points per micro-tile

template <int R>
inline void tile(const float* __restrict x, i64 d, const float* __restrict cT, i64 kp, i64 j,
                 const float* __restrict cterm, float alpha, __m256* best, __m256i* bidx) {
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (i64 t = 0; t < d; ++t) {
        const __m256 c0 = _mm256_loadu_ps(cT + t * kp + j);
        const __m256 c1 = _mm256_loadu_ps(cT + t * kp + j + 8);
        for (int r = 0; r < R; ++r) {
            const __m256 xb = _mm256_broadcast_ss(x + r * d + t);
            acc[r][0] = _mm256_fmadd_ps(xb, c0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xb, c1, acc[r][1]);
        }
    }
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

// min over 16 (value, index) lanes; ties -> lowest index; an all-NaN/inf row -> index 0
inline void reduce16(const __m256 b0, const __m256 b1, const __m256i i0, const __m256i i1,
                     float* out_s, int* out_j) {
    alignas(32) float v[16];
    alignas(32) int ix[16];
    _mm256_store_ps(v, b0);
    _mm256_store_ps(v + 8, b1);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ix), i0);
    _mm256_store_si256(reinterpret_cast<__m256i*>(ix + 8), i1);
    float bs = std::numeric_limits<float>::infinity();
    int bj = 0x7fffffff;
    for (int l = 0; l < 16; ++l)
        if (v[l] < bs || (v[l] == bs && ix[l] < bj)) { bs = v[l]; bj = ix[l]; }
    *out_s = bs;
    *out_j = bj == 0x7fffffff ? 0 : bj;
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
    for (i64 j = 0; j < kp; j += NR) tile<R>(x, d, cT, kp, j, cterm, alpha, best, bidx);
    for (int r = 0; r < R; ++r) reduce16(best[2 * r], best[2 * r + 1], bidx[2 * r], bidx[2 * r + 1], out_s + r, out_j + r);
}

}  // namespace

extern "C" {

// Rows [r0, r1) of x (N x d, sorted by group, CSR offsets[G+1]).  cT: (G, d, kp),
// cterm: (G, kp), cent: (G, kmax, d) fp32 (for exact winner distances), xn: |x|^2 per row
// or null.  cosine: score -x.c_hat, dist = 1 + s / |x|.  Writes assign[r], dist[r].
void spurfast_cpu_assign(const float* x, i64 d, const i64* offsets, i64 G, const float* cT,
                         const float* cterm, i64 kp, const float* cent, i64 kmax, const float* xn,
                         int cosine, i64 r0, i64 r1, i64* assign, float* dist) {
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
            switch (R) {
                case 6: rows_block<6>(xi, d, cTg, tg, kp, alpha, s, jj); break;
                case 5: rows_block<5>(xi, d, cTg, tg, kp, alpha, s, jj); break;
                case 4: rows_block<4>(xi, d, cTg, tg, kp, alpha, s, jj); break;
                case 3: rows_block<3>(xi, d, cTg, tg, kp, alpha, s, jj); break;
                case 2: rows_block<2>(xi, d, cTg, tg, kp, alpha, s, jj); break;
                default: rows_block<1>(xi, d, cTg, tg, kp, alpha, s, jj); break;
            }
            for (int r = 0; r < R; ++r) {
                const float* xr = xi + r * d;
                const float* cr = cg + (i64)jj[r] * d;
                float xx;
                if (xn) xx = xn[i + r];
                else { xx = 0.f; for (i64 t = 0; t < d; ++t) xx += xr[t] * xr[t]; }
                float dv;
                if (cosine) {
                    dv = 1.0f + s[r] / std::fmax(std::sqrt(xx), 1e-12f);
                } else {
                    // s + |x|^2 cancels digits for tight clusters away from the origin:
                    // recompute those directly, as the reference does
                    const float cc = tg[jj[r]];
                    dv = s[r] + xx;
                    if (!(dv >= (1.0f / 16) * (xx + cc))) {
                        float acc = 0.f;
                        for (i64 t = 0; t < d; ++t) { const float df = xr[t] - cr[t]; acc += df * df; }
                        dv = acc;
                    }
                    dv = dv > 0.f ? dv : 0.f;
                }
                assign[i + r] = jj[r];
                dist[i + r] = dv;
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
        float* dst = sums + f * d;
        const float* src = x + i * d;
        i64 t = 0;
        for (; t + 8 <= d; t += 8)
            _mm256_storeu_ps(dst + t, _mm256_add_ps(_mm256_loadu_ps(dst + t), _mm256_loadu_ps(src + t)));
        for (; t < d; ++t) dst[t] += src[t];
        counts[f] += 1;
    }
    return -1;
}

}  // extern "C"
