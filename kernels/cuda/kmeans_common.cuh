// Shared helpers for the spurfast k-means kernels.
//
// Self-contained on purpose: no CUDA or C++ standard headers, so the same text compiles
// with nvcc (ahead of time, CMakeLists.txt) and with NVRTC (kernels/kmeans_cupy.py, which
// pastes this file in place of its #include line).  fp16 and bf16 arrive as raw 16-bit
// patterns and are widened to fp32 here; every accumulation is fp32.
#pragma once

typedef long long i64;
typedef unsigned long long u64;

struct f16_t { unsigned short bits; };
struct bf16_t { unsigned short bits; };

__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(f16_t v) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}
__device__ __forceinline__ float to_f32(bf16_t v) { return __uint_as_float(((unsigned)v.bits) << 16); }

__device__ __forceinline__ float f32_inf() { return __int_as_float(0x7f800000); }
// 1 - cos rounds below 0 for a point on its centroid; NaN (a NaN row) stays NaN, as fmaxf would not keep it
__device__ __forceinline__ float nonneg(float v) { return v < 0.f ? 0.f : v; }

// Work item -> segment for CSR-described work: given the nondecreasing prefix array
// first[0..S] (first[s] = first work item of segment s, first[S] = total), the segment
// s with first[s] <= b < first[s+1].  Empty segments (first[s] == first[s+1]) are skipped.
__device__ __forceinline__ i64 find_segment(const i64* __restrict__ first, i64 S, i64 b) {
    i64 lo = 0, hi = S;
    while (lo < hi) {
        i64 mid = (lo + hi) >> 1;
        if (first[mid + 1] <= b) lo = mid + 1; else hi = mid;
    }
    return lo;
}

// Every entry point exists once per input dtype.
#define SPURFAST_FOR_DTYPES(M) M(f32, float) M(f16, f16_t) M(bf16, bf16_t)
