// Batched k-means update: per-(group, cluster) sums of member rows, without contended
// float atomics.
//
// The launcher sorts the points by segment s = group * kmax + cluster (stable sort, so the
// order is fixed by the input) and counts members per segment (integer bincount).  Each
// segment is cut into chunks of UPDATE_ROWS sorted rows:
//   pass 1 (spurfast_update_partial_<dtype>): one block per chunk sums its rows in a fixed
//     order.  A segment with a single chunk (every small cluster) is written straight into
//     sums; otherwise the chunk's partial goes to partial[chunk] (deterministic mode) or is
//     atomically added to sums (fast mode: at most ceil(count / UPDATE_ROWS) adders per
//     cluster, never one per point).
//   pass 2 (spurfast_update_finalize, deterministic mode only): sums[s] = partials of s
//     added in chunk order.
// Empty clusters keep sums = 0 and count = 0 so the Lloyd loop can re-seed them.
#include "kmeans_common.cuh"

#define UPDATE_ROWS 64    // rows per chunk
#define UPDATE_TX 32      // lanes along d (coalesced row reads)
#define UPDATE_TY 8       // row lanes; combined in a fixed order through shared memory

template <typename T>
__device__ __forceinline__ void update_partial(
    const T* __restrict__ x, const i64* __restrict__ perm, const i64* __restrict__ seg_first,
    const i64* __restrict__ chunk_first, float* __restrict__ partial, float* __restrict__ sums,
    i64 S, i64 d, int deterministic)
{
    __shared__ float red[UPDATE_TY][UPDATE_TX];
    const i64 b = blockIdx.x;
    if (b >= chunk_first[S]) return;                     // grid is an upper bound
    const i64 s = find_segment(chunk_first, S, b);
    const i64 nchunks = chunk_first[s + 1] - chunk_first[s];
    const i64 r0 = seg_first[s] + (b - chunk_first[s]) * UPDATE_ROWS;
    const i64 r1 = min(r0 + UPDATE_ROWS, seg_first[s + 1]);
    const int tx = threadIdx.x, ty = threadIdx.y;
    for (i64 c0 = 0; c0 < d; c0 += UPDATE_TX) {
        const i64 col = c0 + tx;
        float acc = 0.f;
        if (col < d)
            for (i64 r = r0 + ty; r < r1; r += UPDATE_TY) acc += to_f32(x[perm[r] * d + col]);
        red[ty][tx] = acc;
        __syncthreads();
        if (ty == 0 && col < d) {
            float tot = red[0][tx];
#pragma unroll
            for (int t = 1; t < UPDATE_TY; ++t) tot += red[t][tx];
            if (nchunks == 1) sums[s * d + col] = tot;
            else if (deterministic) partial[b * d + col] = tot;
            else atomicAdd(&sums[s * d + col], tot);
        }
        __syncthreads();
    }
}

#define SPURFAST_UPDATE_ENTRY(NAME, T)                                                          \
    extern "C" __global__ void __launch_bounds__(UPDATE_TX * UPDATE_TY)                         \
    spurfast_update_partial_##NAME(                                                             \
        const T* __restrict__ x, const i64* __restrict__ perm, const i64* __restrict__ seg_first, \
        const i64* __restrict__ chunk_first, float* __restrict__ partial, float* __restrict__ sums, \
        i64 S, i64 d, i64 deterministic) {                                                      \
        update_partial<T>(x, perm, seg_first, chunk_first, partial, sums, S, d, (int)deterministic); \
    }
SPURFAST_FOR_DTYPES(SPURFAST_UPDATE_ENTRY)

// Pass 2: one thread per (segment, column); only segments cut into several chunks work.
extern "C" __global__ void spurfast_update_finalize(
    const i64* __restrict__ chunk_first, const float* __restrict__ partial, float* __restrict__ sums,
    i64 S, i64 d)
{
    const i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= S * d) return;
    const i64 s = t / d, col = t % d;
    const i64 c0 = chunk_first[s], c1 = chunk_first[s + 1];
    if (c1 - c0 < 2) return;
    float tot = 0.f;
    for (i64 c = c0; c < c1; ++c) tot += partial[c * d + col];
    sums[t] = tot;
}
