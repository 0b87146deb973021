// Batched k-means assignment: every point gets the nearest centroid of its own group.
//
// Points are sorted by group (CSR offsets); centroids are padded to (G, kmax, d) and group
// g uses its first k_g rows.  One block owns a tile of TP points of one group and sweeps
// that group's centroids in tiles of TK.  Distances are formed in registers (a 4 x 4
// micro-tile of dot products per thread, operands staged through shared memory in TD-wide
// slices of d) and reduced to (best score, index) on chip: the N x k matrix never exists.
// No atomics: a point's whole reduction happens inside its block (TK/4 lanes of one warp).
//
// Score used for the argmin (the point's own term is constant over centroids):
//   L2:     s = |c|^2 - 2 x.c      -> dist = sum (x - c_win)^2, recomputed for the winner
//   cosine: s = -x.c_hat            -> dist = 1 + s / max(|x|, 1e-12)
// cterm[g*kmax+j] holds |c|^2 (L2) or 0 (cosine; the launcher passes unit centroids).
// Ties go to the lower centroid index.
#include "kmeans_common.cuh"

#define ASSIGN_THREADS 256
#define ASSIGN_TD 32

template <typename T, int TP, int TK>
__device__ __forceinline__ void assign_tile(
    const T* __restrict__ x, const float* __restrict__ cent, const float* __restrict__ cterm,
    const i64* __restrict__ offsets, const i64* __restrict__ kpg, const i64* __restrict__ tile_first,
    i64* __restrict__ assign, float* __restrict__ dist, i64 G, i64 kmax, i64 d, int cosine)
{
    constexpr int TX = TK / 4;            // lanes along centroids (share the same points)
    constexpr int TY = TP / 4;            // lanes along points
    static_assert(TX * TY == ASSIGN_THREADS, "tile shape must use every thread");
    __shared__ float xs[ASSIGN_TD][TP + 1];   // +1: conflict-free transposed stores
    __shared__ float cs[ASSIGN_TD][TK + 1];

    const i64 b = blockIdx.x;
    if (b >= tile_first[G]) return;                      // grid is an upper bound
    const i64 g = find_segment(tile_first, G, b);
    const i64 start = offsets[g] + (b - tile_first[g]) * TP;
    const int npts = (int)min((i64)TP, offsets[g + 1] - start);
    const i64 k = kpg[g];
    const float* cg = cent + g * kmax * d;
    const float* tg = cterm + g * kmax;

    const int tid = threadIdx.x;
    const int tx = tid % TX, ty = tid / TX;
    const float alpha = cosine ? -1.0f : -2.0f;

    float best[4], xn[4];
    int bidx[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) { best[i] = f32_inf(); bidx[i] = 0x7fffffff; xn[i] = 0.f; }

    for (i64 k0 = 0; k0 < k; k0 += TK) {
        float acc[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = 0.f;

        for (i64 d0 = 0; d0 < d; d0 += ASSIGN_TD) {
            __syncthreads();                               // previous slice fully consumed
            for (int e = tid; e < TP * ASSIGN_TD; e += ASSIGN_THREADS) {
                const int p = e / ASSIGN_TD, dd = e % ASSIGN_TD;
                float v = 0.f;
                if (p < npts && d0 + dd < d) v = to_f32(x[(start + p) * d + d0 + dd]);
                xs[dd][p] = v;
            }
            for (int e = tid; e < TK * ASSIGN_TD; e += ASSIGN_THREADS) {
                const int j = e / ASSIGN_TD, dd = e % ASSIGN_TD;
                float v = 0.f;
                if (k0 + j < k && d0 + dd < d) v = cg[(k0 + j) * d + d0 + dd];
                cs[dd][j] = v;
            }
            __syncthreads();
#pragma unroll 8
            for (int dd = 0; dd < ASSIGN_TD; ++dd) {
                float a[4], c[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) a[i] = xs[dd][ty + i * TY];
#pragma unroll
                for (int j = 0; j < 4; ++j) c[j] = cs[dd][tx + j * TX];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    if (cosine && k0 == 0) xn[i] = fmaf(a[i], a[i], xn[i]);   // |x|^2, cosine only
#pragma unroll
                    for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(a[i], c[j], acc[i][j]);
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const i64 cj = k0 + tx + j * TX;
            if (cj < k) {
                const float t = tg[cj];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float s = fmaf(alpha, acc[i][j], t);
                    if (s < best[i] || (s == best[i] && (int)cj < bidx[i])) { best[i] = s; bidx[i] = (int)cj; }
                }
            }
        }
    }
    // Combine the TX lanes that share these points (consecutive lanes of one warp).
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
        for (int off = TX / 2; off > 0; off >>= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best[i], off);
            const int oi = __shfl_xor_sync(0xffffffffu, bidx[i], off);
            if (ob < best[i] || (ob == best[i] && oi < bidx[i])) { best[i] = ob; bidx[i] = oi; }
        }
    }
    // Every lane now holds its row's winner.  L2: the winner's distance is recomputed
    // directly, sum (x - c)^2, by the TX lanes of the row (the expansion |x|^2 + |c|^2 - 2x.c
    // cancels badly for tight clusters far from the origin).  Loads are guarded, shuffles
    // are not: every lane of the warp takes part in them.
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int p = ty + i * TY;
        const int idx = bidx[i] == 0x7fffffff ? 0 : bidx[i];   // NaN input: index 0
        float dv;
        if (cosine) {
            dv = 1.0f + best[i] / fmaxf(sqrtf(xn[i]), 1e-12f);
        } else {
            float sq = 0.f;
            if (p < npts) {
                const T* xr = x + (start + p) * d;
                const float* cr = cg + (i64)idx * d;
                for (i64 col = tx; col < d; col += TX) {
                    const float df = to_f32(xr[col]) - cr[col];
                    sq = fmaf(df, df, sq);
                }
            }
#pragma unroll
            for (int off = TX / 2; off > 0; off >>= 1) sq += __shfl_xor_sync(0xffffffffu, sq, off);
            dv = sq;
        }
        if (tx == 0 && p < npts) {
            assign[start + p] = idx;
            dist[start + p] = dv;
        }
    }
}

// Entry points: spurfast_assign_<dtype>_<TP>x<TK>.  Launch with ASSIGN_THREADS threads and
// at least tile_first[G] blocks (ceil(N / TP) + G is a safe upper bound).
#define SPURFAST_ASSIGN_ENTRY(NAME, T, TP, TK)                                                    \
    extern "C" __global__ void __launch_bounds__(ASSIGN_THREADS)                                  \
    spurfast_assign_##NAME##_##TP##x##TK(                                                         \
        const T* __restrict__ x, const float* __restrict__ cent, const float* __restrict__ cterm, \
        const i64* __restrict__ offsets, const i64* __restrict__ kpg,                             \
        const i64* __restrict__ tile_first, i64* __restrict__ assign, float* __restrict__ dist,   \
        i64 G, i64 kmax, i64 d, i64 cosine) {                                                     \
        assign_tile<T, TP, TK>(x, cent, cterm, offsets, kpg, tile_first, assign, dist,            \
                               G, kmax, d, (int)cosine);                                          \
    }
#define SPURFAST_ASSIGN_SHAPES(NAME, T)          \
    SPURFAST_ASSIGN_ENTRY(NAME, T, 64, 64)       \
    SPURFAST_ASSIGN_ENTRY(NAME, T, 128, 32)      \
    SPURFAST_ASSIGN_ENTRY(NAME, T, 256, 16)
SPURFAST_FOR_DTYPES(SPURFAST_ASSIGN_SHAPES)
