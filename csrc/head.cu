// ids = argmax(rmsnorm(x) @ W_head^T), the logits compared as the model dtype rounds them and
// the lowest id winning ties. Matches vita_kernels.head.head_argmax_ref.
//
// Two passes, no workspace: (1) the GEMV kernel reduces each block's 64 vocabulary rows to one
// (max, lowest index) partial per x row, packed into an order-preserving 64-bit key, and merges
// it into ids[r] (reused as key storage) with atomicMax; max is commutative, so the result does
// not depend on block order; (2) a one-warp kernel unpacks each key into its index. ids is
// zeroed first with cudaMemsetAsync (capturable), so the whole op is three graph nodes and needs
// only the caller's int64 output.
//
// Memory traffic: V*H*2 weight bytes read once (the floor: 1204.7 MB at 7B, 70% of an MCTP
// step); R*H*2 x and H*2 norm-weight bytes (from L2 per block); 8*R bytes of ids. The [R, V]
// logits are never written: unfused they would add R*V*(2 + 4) bytes of writes and re-reads.
// Row offsets into W are 64-bit (168072 x 3584 elements > 2^29).
#include "gemv.cuh"

namespace {

__global__ void argmax_unpack_kernel(int64_t* ids, int rows) {
  const int r = threadIdx.x;
  if (r < rows) {
    const unsigned long long key = reinterpret_cast<unsigned long long*>(ids)[r];
    ids[r] = static_cast<int64_t>(0xffffffffu - static_cast<uint32_t>(key & 0xffffffffull));
  }
}

}  // namespace

extern "C" cudaError_t vk_head_argmax(const void* x, int64_t x_stride, const void* norm_weight, const void* w_head,
                                      int64_t* ids, int rows, int vocab, int hidden, float eps, int dtype,
                                      cudaStream_t stream) {
  if (rows <= 0 || rows > 1024) return cudaErrorInvalidValue;
  cudaError_t err = cudaMemsetAsync(ids, 0, sizeof(int64_t) * rows, stream);
  if (err != cudaSuccess) return err;
  vk::GemvArgs a = {};
  a.x = x;
  a.x_stride = x_stride;
  a.w = w_head;
  a.norm_w = norm_weight;
  a.keys = reinterpret_cast<unsigned long long*>(ids);
  a.rows = rows;
  a.n = vocab;
  a.k = hidden;
  a.eps = eps;
  switch (dtype) {
    case VK_DTYPE_BF16: err = vk::launch_gemv<__nv_bfloat16, vk::Epilogue::kArgmax, true>(a, stream); break;
    case VK_DTYPE_FP16: err = vk::launch_gemv<__half, vk::Epilogue::kArgmax, true>(a, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess) return err;
  argmax_unpack_kernel<<<1, (rows + 31) / 32 * 32, 0, stream>>>(ids, rows);
  return cudaGetLastError();
}
