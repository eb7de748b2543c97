// s = x + residual (rounded to dtype), y = rmsnorm(s): the decoder layer's "residual add, then
// the next norm" in one pass. Matches vita_kernels.norm.add_rmsnorm_ref (returns y and s).
//
// One block per row; the row stays in registers between the statistics and the scaling, so
// each byte is touched once. Memory traffic per call: R*H*2 read of x (+ R*H*2 residual),
// H*2 norm weight, R*H*2 written for y (+ R*H*2 for s when there is a residual); 4*R*H*2 + H*2
// bytes with a residual, 2*R*H*2 + H*2 without: the floor for an op that must return both.
#include "common.cuh"

namespace {

constexpr int kVecsPerThread = 4;
constexpr int kMaxThreads = 1024;
static_assert(kMaxThreads * kVecsPerThread * vk::kVecElems == VK_ADD_RMSNORM_MAX_HIDDEN, "limit out of sync");

template <typename T>
__global__ void __launch_bounds__(kMaxThreads) add_rmsnorm_kernel(const T* __restrict__ x, int64_t x_stride,
                                                                  const T* __restrict__ residual,
                                                                  int64_t residual_stride, const T* __restrict__ w,
                                                                  T* __restrict__ y, int64_t y_stride,
                                                                  T* __restrict__ s, int64_t s_stride, int hidden,
                                                                  float eps) {
  __shared__ float warp_sums[32];
  const int row = blockIdx.x, nvec = hidden / vk::kVecElems;
  x += row * x_stride;
  y += row * y_stride;
  if (residual != nullptr) {
    residual += row * residual_stride;
    s += row * s_stride;
  }

  vk::Vec8 sv[kVecsPerThread];
  float ss = 0.0f;
#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v >= nvec) break;
    sv[i].u = vk::load_vec(x + v * vk::kVecElems);
    if (residual != nullptr) {  // s = x + residual, rounded to the dtype (a plain torch add)
      vk::Vec8 rv;
      rv.u = vk::load_vec(residual + v * vk::kVecElems);
#pragma unroll
      for (int e = 0; e < vk::kVecElems; ++e)
        vk::vec_set<T>(sv[i], e, vk::vec_get<T>(sv[i], e) + vk::vec_get<T>(rv, e));
      vk::store_vec(s + v * vk::kVecElems, sv[i].u);
    }
#pragma unroll
    for (int e = 0; e < vk::kVecElems; ++e) {
      const float f = vk::vec_get<T>(sv[i], e);
      ss += f * f;
    }
  }
  ss = vk::warp_sum(ss);
  if ((threadIdx.x & 31) == 0) warp_sums[threadIdx.x >> 5] = ss;
  __syncthreads();
  if (threadIdx.x < 32) {
    float t = threadIdx.x < (blockDim.x >> 5) ? warp_sums[threadIdx.x] : 0.0f;
    t = vk::warp_sum(t);
    if (threadIdx.x == 0) warp_sums[0] = t;
  }
  __syncthreads();
  const float rstd = vk::rms_rstd(warp_sums[0], hidden, eps);

#pragma unroll
  for (int i = 0; i < kVecsPerThread; ++i) {
    const int v = threadIdx.x + i * blockDim.x;
    if (v >= nvec) break;
    vk::Vec8 wv, yv;
    wv.u = vk::load_vec(w + v * vk::kVecElems);
#pragma unroll
    for (int e = 0; e < vk::kVecElems; ++e)
      vk::vec_set<T>(yv, e, vk::rms_apply<T>(vk::vec_get<T>(sv[i], e), rstd, vk::vec_get<T>(wv, e)));
    vk::store_vec(y + v * vk::kVecElems, yv.u);
  }
}

template <typename T>
cudaError_t launch(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                   const void* weight, void* y, int64_t y_stride, void* s, int64_t s_stride, int rows, int hidden,
                   float eps, cudaStream_t stream) {
  const int nvec = hidden / vk::kVecElems;
  int threads = (nvec + kVecsPerThread - 1) / kVecsPerThread;
  threads = (threads + 31) / 32 * 32;
  add_rmsnorm_kernel<T><<<rows, threads, 0, stream>>>(
      static_cast<const T*>(x), x_stride, static_cast<const T*>(residual), residual_stride,
      static_cast<const T*>(weight), static_cast<T*>(y), y_stride, static_cast<T*>(s), s_stride, hidden, eps);
  return cudaGetLastError();
}

}  // namespace

extern "C" cudaError_t vk_add_rmsnorm(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                                      const void* weight, void* y, int64_t y_stride, void* s, int64_t s_stride,
                                      int rows, int hidden, float eps, int dtype, cudaStream_t stream) {
  if (rows <= 0 || hidden <= 0 || hidden % vk::kVecElems != 0 || hidden > VK_ADD_RMSNORM_MAX_HIDDEN ||
      (residual != nullptr && s == nullptr))
    return cudaErrorInvalidValue;
  switch (dtype) {
    case VK_DTYPE_BF16:
      return launch<__nv_bfloat16>(x, x_stride, residual, residual_stride, weight, y, y_stride, s, s_stride, rows,
                                   hidden, eps, stream);
    case VK_DTYPE_FP16:
      return launch<__half>(x, x_stride, residual, residual_stride, weight, y, y_stride, s, s_stride, rows, hidden,
                            eps, stream);
    default: return cudaErrorInvalidValue;
  }
}
