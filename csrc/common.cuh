// Shared device helpers for the vita_kernels CUDA kernels: element conversions with the exact
// rounding of the PyTorch references, 16-byte vector access, and the bf16/fp16 tensor-core MMA.
// Plain CUDA: only CUDA headers, so every .cu compiles wherever nvcc exists (no torch needed).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "vita_kernels.h"

namespace vk {

// ---- element conversions: every rounding to the model dtype is round-to-nearest-even ----
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }

// Round an fp32 value to T and back: the value a PyTorch op returning T would hold.
template <typename T> __device__ __forceinline__ float round_to(float v) { return to_float(from_float<T>(v)); }

// ---- 16-byte vectors: 8 elements of a 2-byte type ----
constexpr int kVecElems = 8;

union Vec8 {
  uint4 u;
  uint32_t r[4];
  unsigned short h[8];
};

__device__ __forceinline__ unsigned short bits_of(__nv_bfloat16 v) { return __bfloat16_as_ushort(v); }
__device__ __forceinline__ unsigned short bits_of(__half v) { return __half_as_ushort(v); }
template <typename T> __device__ __forceinline__ T from_bits(unsigned short b);
template <> __device__ __forceinline__ __nv_bfloat16 from_bits<__nv_bfloat16>(unsigned short b) { return __ushort_as_bfloat16(b); }
template <> __device__ __forceinline__ __half from_bits<__half>(unsigned short b) { return __ushort_as_half(b); }

template <typename T> __device__ __forceinline__ float vec_get(const Vec8& v, int i) { return to_float(from_bits<T>(v.h[i])); }
template <typename T> __device__ __forceinline__ void vec_set(Vec8& v, int i, float f) { v.h[i] = bits_of(from_float<T>(f)); }

// Weight streams are read exactly once per launch: bypass L1 (no allocation) so the L1/shared
// carve-out serves the reused activations. Not volatile: the compiler may hoist and batch them.
__device__ __forceinline__ uint4 load_stream(const void* p) {
  uint4 r;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
      : "l"(p));
  return r;
}

__device__ __forceinline__ uint4 load_vec(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ void store_vec(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

// ---- D = A(16x16, row) * B(16x8, col) + D, fp32 accumulation (sm_80+) ----
template <typename T> __device__ __forceinline__ void mma_16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                               uint32_t a3, uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                                         uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                                  uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Qwen2 RMSNorm statistics: variance = sum(x^2) * (1/H) (torch's mean multiplies by a
// precomputed fp32 factor), then rsqrt(variance + eps) in fp32.
__device__ __forceinline__ float rms_rstd(float sum_squares, int h, float eps) {
  return rsqrtf(sum_squares * (1.0f / static_cast<float>(h)) + eps);
}

// Qwen2 RMSNorm's two roundings: w * (x * rstd).to(dtype), the product rounded again.
template <typename T> __device__ __forceinline__ float rms_apply(float x, float rstd, float w) {
  return round_to<T>(w * round_to<T>(x * rstd));
}

// Number of multiprocessors of the current device, cached per device (host side).
inline int device_sm_count() {
  static int cached[64] = {0};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 132;
  if (cached[dev] == 0) {
    int n = 0;
    if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 132;
    cached[dev] = n;
  }
  return cached[dev];
}

}  // namespace vk
