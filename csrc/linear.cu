// out = residual + (x @ W^T + bias): every projection of the decoder layer and the MCTP input
// projection at batch 1 (R = 1..16 rows). Matches vita_kernels.linear.linear_ref.
//
// Memory traffic: N*K*2 weight bytes, read once (the floor: 25.7 MB for o_proj, 136 MB for
// down_proj at 7B); R*K*2 x bytes, N*2 bias, R*N*2 residual read; R*N*2 written. See gemv.cuh.
#include "gemv.cuh"

extern "C" cudaError_t vk_linear(const void* x, int64_t x_stride, const void* weight, const void* bias,
                                 const void* residual, int64_t residual_stride, void* out, int64_t out_stride,
                                 int rows, int n, int k, int dtype, cudaStream_t stream) {
  vk::GemvArgs a = {};
  a.x = x;
  a.x_stride = x_stride;
  a.w = weight;
  a.bias = bias;
  a.residual = residual;
  a.residual_stride = residual_stride;
  a.out = out;
  a.out_stride = out_stride;
  a.rows = rows;
  a.n = n;
  a.k = k;
  switch (dtype) {
    case VK_DTYPE_BF16: return vk::launch_gemv<__nv_bfloat16, vk::Epilogue::kLinear, false>(a, stream);
    case VK_DTYPE_FP16: return vk::launch_gemv<__half, vk::Epilogue::kLinear, false>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
