// y = silu(h @ W_gate^T) * (h @ W_up^T), h = rmsnorm(x): the decoder MLP's input in one pass.
// Matches vita_kernels.gate_up.norm_gate_up_ref (w_gate_up [2I, H], gate rows first).
//
// Each warp holds the gate and the up tile of the same 16 output columns (MT = 2), so the
// SiLU * mul epilogue pairs them in registers: neither gate nor up ever reaches memory.
// Memory traffic: 2*I*H*2 weight bytes read once (the floor: 271.6 MB at 7B); R*H*2 x bytes and
// H*2 norm-weight bytes read (per block from L2 for the fused norm); R*I*2 bytes written.
// Unfused it would also write and re-read h (R*H*2) and gate/up (2*R*I*2 each way).
#include "gemv.cuh"

extern "C" cudaError_t vk_norm_gate_up(const void* x, int64_t x_stride, const void* norm_weight,
                                       const void* w_gate_up, void* out, int64_t out_stride, int rows, int inter,
                                       int hidden, float eps, int dtype, cudaStream_t stream) {
  vk::GemvArgs a = {};
  a.x = x;
  a.x_stride = x_stride;
  a.w = w_gate_up;
  a.norm_w = norm_weight;
  a.out = out;
  a.out_stride = out_stride;
  a.rows = rows;
  a.n = inter;
  a.k = hidden;
  a.eps = eps;
  switch (dtype) {
    case VK_DTYPE_BF16: return vk::launch_gemv<__nv_bfloat16, vk::Epilogue::kGateUp, true>(a, stream);
    case VK_DTYPE_FP16: return vk::launch_gemv<__half, vk::Epilogue::kGateUp, true>(a, stream);
    default: return cudaErrorInvalidValue;
  }
}
