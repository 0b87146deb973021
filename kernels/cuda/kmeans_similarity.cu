// Per-cluster statistics for discovery scoring.
//
// spurfast_sim_point_<dtype>: one warp per point: cosine similarity to its own centroid and
//   the squared L2 distance, computed directly as sum (x - c)^2 (no cancellation).
// spurfast_sim_cluster: one block per (group, cluster) segment of the points sorted by
//   segment (perm, seg_first from the launcher): mean cosine and mean squared distance
//   (block tree sum in a fixed order: deterministic), and the m members nearest the
//   centroid.  Exemplar keys pack (squared distance, point index) into one u64 (the float
//   bits of a non-negative float order like the float), so "nearest, ties by lower index"
//   is a plain integer minimum: every thread keeps its own sorted top-m, then m rounds of
//   a block-wide minimum pop the winners.
#include "kmeans_common.cuh"

#define SIM_WARPS 8          // points per block in spurfast_sim_point_*
#define SIM_THREADS 128      // threads per cluster in spurfast_sim_cluster
#define SIM_MAXM 32          // largest m the kernel supports (the launcher checks)

template <typename T>
__device__ __forceinline__ void sim_point(
    const T* __restrict__ x, const float* __restrict__ cent, const i64* __restrict__ gid,
    const i64* __restrict__ assign, float* __restrict__ cos_out, float* __restrict__ sq_out,
    i64 N, i64 kmax, i64 d)
{
    const int lane = threadIdx.x & 31;
    const i64 i = (i64)blockIdx.x * SIM_WARPS + (threadIdx.x >> 5);
    if (i >= N) return;                                  // whole warp leaves together
    const float* c = cent + (gid[i] * kmax + assign[i]) * d;
    float dot = 0.f, xx = 0.f, cc = 0.f, sq = 0.f;
    for (i64 col = lane; col < d; col += 32) {
        const float xv = to_f32(x[i * d + col]), cv = c[col];
        dot = fmaf(xv, cv, dot);
        xx = fmaf(xv, xv, xx);
        cc = fmaf(cv, cv, cc);
        const float df = xv - cv;
        sq = fmaf(df, df, sq);
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        dot += __shfl_xor_sync(0xffffffffu, dot, off);
        xx += __shfl_xor_sync(0xffffffffu, xx, off);
        cc += __shfl_xor_sync(0xffffffffu, cc, off);
        sq += __shfl_xor_sync(0xffffffffu, sq, off);
    }
    if (lane == 0) {
        cos_out[i] = dot / (fmaxf(sqrtf(xx), 1e-12f) * fmaxf(sqrtf(cc), 1e-12f));
        sq_out[i] = sq;
    }
}

#define SPURFAST_SIM_ENTRY(NAME, T)                                                              \
    extern "C" __global__ void __launch_bounds__(SIM_WARPS * 32) spurfast_sim_point_##NAME(     \
        const T* __restrict__ x, const float* __restrict__ cent, const i64* __restrict__ gid,    \
        const i64* __restrict__ assign, float* __restrict__ cos_out, float* __restrict__ sq_out, \
        i64 N, i64 kmax, i64 d) {                                                                \
        sim_point<T>(x, cent, gid, assign, cos_out, sq_out, N, kmax, d);                         \
    }
SPURFAST_FOR_DTYPES(SPURFAST_SIM_ENTRY)

__device__ __forceinline__ u64 warp_min_u64(u64 v) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) {
        const u64 o = __shfl_xor_sync(0xffffffffu, v, off);
        v = o < v ? o : v;
    }
    return v;
}

extern "C" __global__ void __launch_bounds__(SIM_THREADS) spurfast_sim_cluster(
    const i64* __restrict__ perm, const i64* __restrict__ seg_first, const float* __restrict__ cosv,
    const float* __restrict__ sqv, i64* __restrict__ exemplars, float* __restrict__ mean_cos,
    float* __restrict__ mean_sq, i64 m)
{
    __shared__ float rc[SIM_THREADS], rs[SIM_THREADS];
    __shared__ u64 wmin[SIM_THREADS / 32];
    const i64 s = blockIdx.x;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const i64 r0 = seg_first[s], r1 = seg_first[s + 1];
    const u64 NONE = ~0ull;

    u64 top[SIM_MAXM];
    for (int q = 0; q < m; ++q) top[q] = NONE;
    float sc = 0.f, ss = 0.f;
    for (i64 r = r0 + tid; r < r1; r += SIM_THREADS) {
        const i64 p = perm[r];
        sc += cosv[p];
        const float sqp = sqv[p];
        ss += sqp;
        // NaN keys sort after +inf as the reference's argsort puts them (fmaxf(NaN, 0) is 0)
        const unsigned kb = (sqp != sqp) ? 0x7fffffffu : __float_as_uint(fmaxf(sqp, 0.f));
        const u64 key = ((u64)kb << 32) | (u64)(unsigned)p;
        if (m > 0 && key < top[m - 1]) {                // insertion into the sorted list
            int q = (int)m - 1;
            while (q > 0 && top[q - 1] > key) { top[q] = top[q - 1]; --q; }
            top[q] = key;
        }
    }
    rc[tid] = sc;
    rs[tid] = ss;
    __syncthreads();
    for (int w = SIM_THREADS / 2; w > 0; w >>= 1) {      // fixed-shape tree: deterministic
        if (tid < w) { rc[tid] += rc[tid + w]; rs[tid] += rs[tid + w]; }
        __syncthreads();
    }
    if (tid == 0) {
        const float n = (float)max(r1 - r0, (i64)1);
        mean_cos[s] = rc[0] / n;
        mean_sq[s] = rs[0] / n;
    }
    int head = 0;
    for (int q = 0; q < m; ++q) {
        const u64 mine = head < m ? top[head] : NONE;
        const u64 wm = warp_min_u64(mine);
        if (lane == 0) wmin[warp] = wm;
        __syncthreads();
        u64 best = wmin[0];
#pragma unroll
        for (int w = 1; w < SIM_THREADS / 32; ++w) best = wmin[w] < best ? wmin[w] : best;
        if (mine == best && best != NONE) ++head;        // keys are unique: one winner
        if (tid == 0) exemplars[s * m + q] = best == NONE ? -1 : (i64)(best & 0xffffffffull);
        __syncthreads();                                 // wmin reused next round
    }
}
