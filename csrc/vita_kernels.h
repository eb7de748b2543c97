// C interface of the vita_kernels CUDA kernels: raw pointers, sizes, a dtype code and a stream.
// Each launcher returns cudaSuccess or the first CUDA error (cudaErrorInvalidValue for arguments
// it cannot handle); the torch binding layer (bindings.cpp) validates tensors and names them.
//
// Layout contract shared by every launcher:
//   - element type is VK_DTYPE_BF16 or VK_DTYPE_FP16 for every tensor argument;
//   - weights are contiguous row-major; activation rows may be strided (`*_stride` in elements)
//     but their last dimension is contiguous;
//   - the reduced dimension (K or H) is a multiple of 8, and every pointer and row stride is
//     16-byte aligned (the kernels move 16-byte vectors).
#pragma once

#include <cuda_runtime_api.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

enum vk_dtype { VK_DTYPE_BF16 = 0, VK_DTYPE_FP16 = 1 };

// out[R, N] = residual + (x[R, K] @ weight[N, K]^T + bias).to(dtype)   (bias, residual may be NULL)
cudaError_t vk_linear(const void* x, int64_t x_stride, const void* weight, const void* bias, const void* residual,
                      int64_t residual_stride, void* out, int64_t out_stride, int rows, int n, int k, int dtype,
                      cudaStream_t stream);

// out[R, I] = silu(h @ W_gate^T) * (h @ W_up^T), h = rmsnorm(x[R, H]); w_gate_up is [2I, H], gate rows first.
cudaError_t vk_norm_gate_up(const void* x, int64_t x_stride, const void* norm_weight, const void* w_gate_up,
                            void* out, int64_t out_stride, int rows, int inter, int hidden, float eps, int dtype,
                            cudaStream_t stream);

// ids[R] (int64) = argmax over V of (rmsnorm(x[R, H]) @ w_head[V, H]^T).to(dtype), lowest id among ties.
cudaError_t vk_head_argmax(const void* x, int64_t x_stride, const void* norm_weight, const void* w_head,
                           int64_t* ids, int rows, int vocab, int hidden, float eps, int dtype, cudaStream_t stream);

// s = x + residual (rounded to dtype; residual may be NULL, then s is x and `s` is not written);
// y = rmsnorm(s). x, residual, y, s: [R, H].
cudaError_t vk_add_rmsnorm(const void* x, int64_t x_stride, const void* residual, int64_t residual_stride,
                           const void* weight, void* y, int64_t y_stride, void* s, int64_t s_stride, int rows,
                           int hidden, float eps, int dtype, cudaStream_t stream);

// Largest hidden size vk_add_rmsnorm handles (a row lives in registers: 1024 threads x 4 vectors x 8).
#define VK_ADD_RMSNORM_MAX_HIDDEN 32768

#ifdef __cplusplus
}
#endif
