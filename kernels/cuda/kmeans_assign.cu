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
            dv = nonneg(1.0f + best[i] / fmaxf(sqrtf(xn[i]), 1e-12f));
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
            dv = k > 0 ? sq : f32_inf();                // no centroid in the group: no distance
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

// ============================================================================ tensor cores
// fp16 / bf16 inputs on sm_80+: the dot products run on tensor cores with
// mma.sync.m16n8k16 (fp32 accumulate).  x is exact in its own dtype; each fp32 centroid is
// split into hi + lo in that dtype (c ~= hi + lo to ~2^-16 relative for bf16, ~2^-22 for
// fp16) and both halves are multiplied, so the scores keep nearly fp32 accuracy.  The
// winner's distance is recomputed exactly in fp32 as in the SIMT kernel.
//
// Block: 4 warps, 64 points (16 per warp = one m16 tile), centroids in tiles of 64 (eight
// n8 tiles), d in slices of 32 (two k16 steps).  Fragment layouts follow the PTX ISA
// ("Matrix Fragments for mma.m16n8k16 with floating point type"): with g = lane / 4 and
// t = lane % 4, A holds rows g, g+8 x cols 2t, 2t+1 (+8); B holds k rows 2t, 2t+1 (+8) of
// column g; C holds rows g, g+8 x cols 2t, 2t+1.  Both operands sit row-major in shared
// memory with dims contiguous, so every fragment register is one aligned 32-bit load.
#define TC_THREADS 128
#define TC_TP 64
#define TC_TK 64
#define TC_DK 32
#define TC_LD (TC_DK + 8)     // row stride in 16-bit elements: 80 bytes, conflict-free

__device__ __forceinline__ unsigned short f32_to_16(float v, f16_t) {
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
__device__ __forceinline__ float f16bits_to_f32(unsigned short h, f16_t) { f16_t v; v.bits = h; return to_f32(v); }
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ unsigned short f32_to_16(float v, bf16_t) {
    unsigned short h;
    asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(h) : "f"(v));
    return h;
}
#endif
__device__ __forceinline__ float f16bits_to_f32(unsigned short h, bf16_t) { bf16_t v; v.bits = h; return to_f32(v); }

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, f16_t) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1, bf16_t) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
#endif

template <typename T>
__device__ __forceinline__ void assign_tc(
    const T* __restrict__ x, const float* __restrict__ cent, const float* __restrict__ cterm,
    const i64* __restrict__ offsets, const i64* __restrict__ kpg, const i64* __restrict__ tile_first,
    i64* __restrict__ assign, float* __restrict__ dist, i64 G, i64 kmax, i64 d, int cosine)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();   // the launcher only picks this kernel on sm_80 and newer
#else
    __shared__ __align__(16) unsigned short xs[TC_TP][TC_LD];
    __shared__ __align__(16) unsigned short chi[TC_TK][TC_LD];
    __shared__ __align__(16) unsigned short clo[TC_TK][TC_LD];

    const i64 b = blockIdx.x;
    if (b >= tile_first[G]) return;
    const i64 g = find_segment(tile_first, G, b);
    const i64 start = offsets[g] + (b - tile_first[g]) * TC_TP;
    const int npts = (int)min((i64)TC_TP, offsets[g + 1] - start);
    const i64 k = kpg[g];
    const float* cg = cent + g * kmax * d;
    const float* tg = cterm + g * kmax;
    const unsigned short* xb = reinterpret_cast<const unsigned short*>(x);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const int r0 = warp * 16 + gq, r1 = r0 + 8;          // this lane's two points in the tile
    const float alpha = cosine ? -1.0f : -2.0f;
    float best[2] = {f32_inf(), f32_inf()};
    int bidx[2] = {0x7fffffff, 0x7fffffff};

    for (i64 k0 = 0; k0 < k; k0 += TC_TK) {
        float acc[8][4];
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[nt][q] = 0.f;
        for (i64 d0 = 0; d0 < d; d0 += TC_DK) {
            __syncthreads();
            for (int e = tid; e < TC_TP * TC_DK; e += TC_THREADS) {
                const int p = e / TC_DK, dd = e % TC_DK;
                unsigned short v = 0;
                if (p < npts && d0 + dd < d) v = xb[(start + p) * d + d0 + dd];
                xs[p][dd] = v;
            }
            for (int e = tid; e < TC_TK * TC_DK; e += TC_THREADS) {
                const int j = e / TC_DK, dd = e % TC_DK;
                float v = 0.f;
                if (k0 + j < k && d0 + dd < d) v = cg[(k0 + j) * d + d0 + dd];
                const unsigned short hi = f32_to_16(v, T());
                chi[j][dd] = hi;
                clo[j][dd] = f32_to_16(v - f16bits_to_f32(hi, T()), T());
            }
            __syncthreads();
#pragma unroll
            for (int ks = 0; ks < TC_DK; ks += 16) {
                unsigned a[4];
                const int wr = warp * 16 + gq;
                a[0] = *reinterpret_cast<const unsigned*>(&xs[wr][ks + 2 * tq]);
                a[1] = *reinterpret_cast<const unsigned*>(&xs[wr + 8][ks + 2 * tq]);
                a[2] = *reinterpret_cast<const unsigned*>(&xs[wr][ks + 2 * tq + 8]);
                a[3] = *reinterpret_cast<const unsigned*>(&xs[wr + 8][ks + 2 * tq + 8]);
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    if (k0 + nt * 8 >= k) break;             // warp-uniform: whole n8 tile unused
                    const int cr = nt * 8 + gq;
                    const unsigned h0 = *reinterpret_cast<const unsigned*>(&chi[cr][ks + 2 * tq]);
                    const unsigned h1 = *reinterpret_cast<const unsigned*>(&chi[cr][ks + 2 * tq + 8]);
                    const unsigned l0 = *reinterpret_cast<const unsigned*>(&clo[cr][ks + 2 * tq]);
                    const unsigned l1 = *reinterpret_cast<const unsigned*>(&clo[cr][ks + 2 * tq + 8]);
                    mma16816(acc[nt], a, h0, h1, T());
                    mma16816(acc[nt], a, l0, l1, T());
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const i64 cj = k0 + nt * 8 + 2 * tq + (q & 1);
                const int h = q >> 1;                        // 0: row gq, 1: row gq + 8
                if (cj < k) {
                    const float s = fmaf(alpha, acc[nt][q], tg[cj]);
                    if (s < best[h] || (s == best[h] && (int)cj < bidx[h])) { best[h] = s; bidx[h] = (int)cj; }
                }
            }
        }
    }
    // the 4 lanes of a quad share rows gq and gq + 8
#pragma unroll
    for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int off = 1; off < 4; off <<= 1) {
            const float ob = __shfl_xor_sync(0xffffffffu, best[h], off);
            const int oi = __shfl_xor_sync(0xffffffffu, bidx[h], off);
            if (ob < best[h] || (ob == best[h] && oi < bidx[h])) { best[h] = ob; bidx[h] = oi; }
        }
    }
    // exact distance of the winner (L2) or |x| (cosine), split over the quad's 4 lanes
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int p = h ? r1 : r0;
        const int idx = bidx[h] == 0x7fffffff ? 0 : bidx[h];
        float acc2 = 0.f;
        if (p < npts) {
            const T* xr = x + (start + p) * d;
            const float* crow = cg + (i64)idx * d;
            for (i64 col = tq; col < d; col += 4) {
                const float xv = to_f32(xr[col]);
                const float df = cosine ? xv : xv - crow[col];
                acc2 = fmaf(df, df, acc2);
            }
        }
        acc2 += __shfl_xor_sync(0xffffffffu, acc2, 1);
        acc2 += __shfl_xor_sync(0xffffffffu, acc2, 2);
        if (tq == 0 && p < npts) {
            assign[start + p] = idx;
            dist[start + p] = cosine ? nonneg(1.0f + best[h] / fmaxf(sqrtf(acc2), 1e-12f)) : (k > 0 ? acc2 : f32_inf());
        }
    }
#endif
}

// Entry points: spurfast_assign_tc_<f16|bf16>; TC_THREADS threads, TC_TP points per tile.
#define SPURFAST_ASSIGN_TC_ENTRY(NAME, T)                                                       \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) spurfast_assign_tc_##NAME(         \
        const T* __restrict__ x, const float* __restrict__ cent, const float* __restrict__ cterm, \
        const i64* __restrict__ offsets, const i64* __restrict__ kpg,                           \
        const i64* __restrict__ tile_first, i64* __restrict__ assign, float* __restrict__ dist, \
        i64 G, i64 kmax, i64 d, i64 cosine) {                                                   \
        assign_tc<T>(x, cent, cterm, offsets, kpg, tile_first, assign, dist, G, kmax, d, (int)cosine); \
    }
SPURFAST_ASSIGN_TC_ENTRY(f16, f16_t)
SPURFAST_ASSIGN_TC_ENTRY(bf16, bf16_t)

// ============================================================================ tensor cores, v2
// The same arithmetic as assign_tc (x exact in its dtype, centroids as hi + lo halves, two
// mma.sync per product, fp32 accumulate, the winner's distance recomputed in fp32), laid
// out so the tensor cores are fed instead of waiting:
// - the launcher splits the centroids into hi / lo once per call ((G*kmax, dp) 16-bit,
//   zero-padded to dp = d rounded up to 32), so blocks copy them with 16-byte loads
//   instead of converting fp32 centroids per block;
// - the block's x tile (TP points x dp) is loaded once into shared memory and stays there
//   for every centroid tile (16-byte loads when rows are 16-byte aligned);
// - each warp owns MT m16 tiles, so every centroid fragment feeds 2*MT mma.
// Shared memory (dynamic): xs[TP][dp+8] then chi[TK][DK+8], clo[TK][DK+8] (16-bit
// elements; the +8 padding keeps the fragment loads conflict-free).  TP = 64 * MT.
#define TC2_TK 64
#define TC2_DK 32
#define TC2_CLD (TC2_DK + 8)

template <typename T, int MT>
__device__ __forceinline__ void assign_tc2(
    const T* __restrict__ x, const unsigned short* __restrict__ chi_g, const unsigned short* __restrict__ clo_g,
    const float* __restrict__ cent, const float* __restrict__ cterm,
    const i64* __restrict__ offsets, const i64* __restrict__ kpg, const i64* __restrict__ tile_first,
    i64* __restrict__ assign, float* __restrict__ dist, i64 G, i64 kmax, i64 d, i64 dp, int cosine, int xvec)
{
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    __trap();   // the launcher only picks this kernel on sm_80 and newer
#else
    constexpr int TP = 64 * MT;
    extern __shared__ __align__(16) unsigned short smem[];
    const int xld = (int)dp + 8;
    unsigned short* xs = smem;                          // [TP][xld]
    unsigned short* chi = smem + TP * xld;              // [TK][CLD]
    unsigned short* clo = chi + TC2_TK * TC2_CLD;       // [TK][CLD]

    const i64 b = blockIdx.x;
    if (b >= tile_first[G]) return;
    const i64 g = find_segment(tile_first, G, b);
    const i64 start = offsets[g] + (b - tile_first[g]) * TP;
    const int npts = (int)min((i64)TP, offsets[g + 1] - start);
    const i64 k = kpg[g];
    const float* cg = cent + g * kmax * d;
    const float* tg = cterm + g * kmax;
    const unsigned short* hg = chi_g + g * kmax * dp;
    const unsigned short* lg = clo_g + g * kmax * dp;
    const unsigned short* xb = reinterpret_cast<const unsigned short*>(x);

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int gq = lane >> 2, tq = lane & 3;
    const float alpha = cosine ? -1.0f : -2.0f;

    // x tile -> shared memory, zero-padded (rows past npts, columns past d)
    if (xvec) {                                         // d % 8 == 0 and x 16-byte aligned
        const int cpr = (int)(dp >> 3);                 // 16-byte chunks per padded row
        for (int e = tid; e < TP * cpr; e += TC_THREADS) {
            const int p = e / cpr, col = (e % cpr) * 8;
            uint4 v = make_uint4(0u, 0u, 0u, 0u);
            if (p < npts && col < d) v = *reinterpret_cast<const uint4*>(xb + (start + p) * d + col);
            *reinterpret_cast<uint4*>(xs + p * xld + col) = v;
        }
    } else {
        for (int e = tid; e < TP * (int)dp; e += TC_THREADS) {
            const int p = e / (int)dp, col = e % (int)dp;
            xs[p * xld + col] = (p < npts && col < d) ? xb[(start + p) * d + col] : (unsigned short)0;
        }
    }
    // the epilogue reads rows other warps wrote; with k = 0 the centroid loop's barriers never run
    __syncthreads();

    float best[MT][2];
    int bidx[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
        best[mt][0] = best[mt][1] = f32_inf();
        bidx[mt][0] = bidx[mt][1] = 0x7fffffff;
    }

    for (i64 k0 = 0; k0 < k; k0 += TC2_TK) {
        float acc[MT][8][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < 8; ++nt)
#pragma unroll
                for (int q = 0; q < 4; ++q) acc[mt][nt][q] = 0.f;
        for (i64 d0 = 0; d0 < dp; d0 += TC2_DK) {
            __syncthreads();                            // previous slice consumed (and x tile written)
            // TK rows x 4 chunks of 8 for each of hi and lo: 512 chunks, 4 per thread
            for (int e = tid; e < 2 * TC2_TK * 4; e += TC_THREADS) {
                const int which = e >= TC2_TK * 4, r = e - which * TC2_TK * 4;
                const int j = r >> 2, col = (r & 3) * 8;
                uint4 v = make_uint4(0u, 0u, 0u, 0u);
                if (k0 + j < k)
                    v = *reinterpret_cast<const uint4*>((which ? lg : hg) + (k0 + j) * dp + d0 + col);
                *reinterpret_cast<uint4*>((which ? clo : chi) + j * TC2_CLD + col) = v;
            }
            __syncthreads();
#pragma unroll
            for (int ks = 0; ks < TC2_DK; ks += 16) {
                unsigned a[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    const unsigned short* xr = xs + (warp * 16 * MT + mt * 16 + gq) * xld + d0 + ks + 2 * tq;
                    a[mt][0] = *reinterpret_cast<const unsigned*>(xr);
                    a[mt][1] = *reinterpret_cast<const unsigned*>(xr + 8 * xld);
                    a[mt][2] = *reinterpret_cast<const unsigned*>(xr + 8);
                    a[mt][3] = *reinterpret_cast<const unsigned*>(xr + 8 * xld + 8);
                }
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    if (k0 + nt * 8 >= k) break;        // warp-uniform: whole n8 tile unused
                    const int off = (nt * 8 + gq) * TC2_CLD + ks + 2 * tq;
                    const unsigned h0 = *reinterpret_cast<const unsigned*>(chi + off);
                    const unsigned h1 = *reinterpret_cast<const unsigned*>(chi + off + 8);
                    const unsigned l0 = *reinterpret_cast<const unsigned*>(clo + off);
                    const unsigned l1 = *reinterpret_cast<const unsigned*>(clo + off + 8);
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        mma16816(acc[mt][nt], a[mt], h0, h1, T());
                        mma16816(acc[mt][nt], a[mt], l0, l1, T());
                    }
                }
            }
        }
#pragma unroll
        for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const i64 cj = k0 + nt * 8 + 2 * tq + (q & 1);
                if (cj < k) {
                    const float t = tg[cj];
#pragma unroll
                    for (int mt = 0; mt < MT; ++mt) {
                        const int h = q >> 1;           // 0: row gq, 1: row gq + 8
                        const float s = fmaf(alpha, acc[mt][nt][q], t);
                        if (s < best[mt][h] || (s == best[mt][h] && (int)cj < bidx[mt][h])) {
                            best[mt][h] = s;
                            bidx[mt][h] = (int)cj;
                        }
                    }
                }
            }
        }
    }
    // the 4 lanes of a quad share rows gq and gq + 8 of each m tile
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int off = 1; off < 4; off <<= 1) {
                const float ob = __shfl_xor_sync(0xffffffffu, best[mt][h], off);
                const int oi = __shfl_xor_sync(0xffffffffu, bidx[mt][h], off);
                if (ob < best[mt][h] || (ob == best[mt][h] && oi < bidx[mt][h])) { best[mt][h] = ob; bidx[mt][h] = oi; }
            }
    // exact distance of the winner (L2) or |x| (cosine) from the x tile in shared memory,
    // split over the quad's 4 lanes
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int p = warp * 16 * MT + mt * 16 + gq + 8 * h;
            const int idx = bidx[mt][h] == 0x7fffffff ? 0 : bidx[mt][h];
            float acc2 = 0.f;
            if (p < npts) {
                const unsigned short* xr = xs + p * xld;
                const float* crow = cg + (i64)idx * d;
                for (i64 col = tq; col < d; col += 4) {
                    T v; v.bits = xr[col];
                    const float xv = to_f32(v);
                    const float df = cosine ? xv : xv - crow[col];
                    acc2 = fmaf(df, df, acc2);
                }
            }
            acc2 += __shfl_xor_sync(0xffffffffu, acc2, 1);
            acc2 += __shfl_xor_sync(0xffffffffu, acc2, 2);
            if (tq == 0 && p < npts) {
                assign[start + p] = idx;
                dist[start + p] = cosine ? nonneg(1.0f + best[mt][h] / fmaxf(sqrtf(acc2), 1e-12f))
                                         : (k > 0 ? acc2 : f32_inf());
            }
        }
#endif
}

// Entry points: spurfast_assign_tc2_<f16|bf16>_m<MT>; TC_THREADS threads, 64*MT points per
// tile, dynamic shared memory (64*MT*(dp+8) + 2*TC2_TK*TC2_CLD) * 2 bytes.
#define SPURFAST_ASSIGN_TC2_ENTRY(NAME, T, MT)                                                     \
    extern "C" __global__ void __launch_bounds__(TC_THREADS) spurfast_assign_tc2_##NAME##_m##MT(   \
        const T* __restrict__ x, const unsigned short* __restrict__ chi,                          \
        const unsigned short* __restrict__ clo, const float* __restrict__ cent,                   \
        const float* __restrict__ cterm, const i64* __restrict__ offsets,                         \
        const i64* __restrict__ kpg, const i64* __restrict__ tile_first,                          \
        i64* __restrict__ assign, float* __restrict__ dist,                                       \
        i64 G, i64 kmax, i64 d, i64 dp, i64 cosine, i64 xvec) {                                   \
        assign_tc2<T, MT>(x, chi, clo, cent, cterm, offsets, kpg, tile_first, assign, dist,       \
                          G, kmax, d, dp, (int)cosine, (int)xvec);                                \
    }
SPURFAST_ASSIGN_TC2_ENTRY(f16, f16_t, 1)
SPURFAST_ASSIGN_TC2_ENTRY(f16, f16_t, 2)
SPURFAST_ASSIGN_TC2_ENTRY(bf16, bf16_t, 1)
SPURFAST_ASSIGN_TC2_ENTRY(bf16, bf16_t, 2)
