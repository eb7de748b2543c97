// One tensor-core GEMV kernel for batch-1 decode with R = 1..16 activation rows, shared by the
// projections (linear.cu), the MLP input (gate_up.cu) and the output head (head.cu). What
// differs between them is a compile-time prologue (fused RMSNorm of x) and epilogue.
//
// Why tensor cores for a GEMV: every weight element feeds R multiply-adds. At R = 16 and
// 3.35 TB/s (H100) that is 1.7e12 bf16 weights/s x 16 = 27 TFMA/s, close to the fp32 FMA peak,
// so CUDA-core FMAs would make R >= ~8 compute-bound; mma.sync (m16n8k16, fp32 accumulation)
// keeps every R memory-bound.
//
// Mapping. The warp computes out^T[16 weight rows, 8 or 16 x rows] = W[16, K] @ x^T[K, R]:
// W is the MMA's A operand, x its B operand. A dot product does not care in which order its
// K terms are summed, so A and B fragments may use any k permutation as long as both use the
// same one. Each lane (group g = lane/4, t = lane%4) loads 16 contiguous bytes (8 k) of weight
// rows g and g+8 straight into registers, plus the same 8 k of x row g from shared memory;
// registers .x/.y feed one MMA and .z/.w the next. So weights move in 16-byte vectors; per load
// instruction the 4 lanes of a row cover 64 contiguous bytes (two full 32-byte sectors), and the
// two vectors per lane per step (k offsets v*32 + t*8) complete the 128-byte line.
//
// Work split. A block owns `row_tiles` tiles of 16 output rows (one warp column each) and splits
// K over `ksplit` warps; partial sums are added in a fixed order through shared memory, so the
// result is deterministic (no atomics on values, no cross-block split-K). x (or the normalised
// x) is staged in shared memory in K chunks and shared by the block's row tiles. Each warp keeps
// two groups of weight loads in flight (ping-pong registers): with 8 warps/block and 2+ blocks
// per SM that is >= 64 KB in flight per SM, above the ~25 KB Little's law asks at 3.35 TB/s.
//
// Memory traffic (DRAM, per launch): N*K*2 weight bytes read exactly once (the floor), R*K*2
// activation bytes (+ K*2 norm weight) read from DRAM once and then from L2 once per block
// (ceil(N/(16*row_tiles)) blocks; at most ~R/16 of the weight bytes, L2 not DRAM), R*N*2 output
// bytes written (+ R*N*2 residual, N*2 bias read). Everything but the weights is < 1% at 7B.
#pragma once

#include "common.cuh"

namespace vk {

enum class Epilogue { kLinear, kGateUp, kArgmax };

struct GemvArgs {
  const void* x;            // [R, K] activation rows (row stride x_stride)
  int64_t x_stride;
  const void* w;            // [N, K] (kGateUp: [2N, K], gate rows first) contiguous
  const void* norm_w;       // [K], used when the RMSNorm prologue is on
  const void* bias;         // [N] or null (kLinear)
  const void* residual;     // [R, N] or null (kLinear)
  int64_t residual_stride;
  void* out;                // [R, N] (kLinear, kGateUp)
  int64_t out_stride;
  unsigned long long* keys; // [R] packed (logit, index) keys (kArgmax), zeroed before launch
  int rows, n, k;
  float eps;
  int k_chunk;              // K elements of x staged in shared memory at a time (multiple of 64)
  int row_tiles, ksplit;    // warps per block = row_tiles * ksplit
};

constexpr int kMaxRows = 16;        // rows handled by one launch (two MMA n-tiles of 8)
constexpr int kStepK = 64;          // k per warp step: 4 lanes x 2 vectors x 8 elements
constexpr int kVecPerStep = 2;
constexpr int kMaxWarps = 8;
// x rows in shared memory are padded by 64 bytes: a 16-byte load phase (8 lanes) reads 64
// contiguous bytes of row g and of row g+1, which then fall in disjoint halves of the 32 banks.
constexpr int kSmemPadElems = 32;
constexpr int kXSmemBudget = 64 * 1024;

// Orderable key for argmax: higher key = larger logit, then lower index. NaN ranks above every
// number (torch.argmax returns a NaN's index) and -0 equals +0, as torch compares them.
__device__ __forceinline__ unsigned long long argmax_key(float v, int index) {
  if (v != v) v = __uint_as_float(0x7fffffffu);
  if (v == 0.0f) v = 0.0f;
  const uint32_t b = __float_as_uint(v);
  const uint32_t ordered = (b & 0x80000000u) ? ~b : (b | 0x80000000u);
  return (static_cast<unsigned long long>(ordered) << 32) | (0xffffffffu - static_cast<uint32_t>(index));
}

__device__ __forceinline__ unsigned long long shfl_xor_u64(unsigned long long v, int m) {
  return __shfl_xor_sync(0xffffffffu, v, m);
}

template <typename T, int NT, Epilogue EPI, bool NORM>
__global__ void __launch_bounds__(kMaxWarps * 32) gemv_kernel(const GemvArgs a) {
  constexpr int MT = EPI == Epilogue::kGateUp ? 2 : 1;  // weight tiles per warp (gate and up)
  constexpr int UNROLL = 2 / MT;                        // steps per load group: 32 weight regs/lane

  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int ldx = a.k_chunk + kSmemPadElems;
  T* x_s = reinterpret_cast<T*>(smem_raw);                                          // [R][ldx]
  float* red_s = reinterpret_cast<float*>(smem_raw + sizeof(T) * a.rows * ldx);     // split-K partials
  const int red_floats = (a.ksplit - 1) * a.row_tiles * MT * NT * 4 * 32;
  float* rstd_s = red_s + red_floats;                                                // [kMaxRows]
  unsigned long long* key_s = reinterpret_cast<unsigned long long*>(rstd_s + kMaxRows);  // [kMaxRows]

  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, t = lane & 3;
  const int rt = warp % a.row_tiles, ks = warp / a.row_tiles;
  const int n0 = (blockIdx.x * a.row_tiles + rt) * 16;
  const int R = a.rows, N = a.n, K = a.k;

  const T* x = static_cast<const T*>(a.x);
  const T* w = static_cast<const T*>(a.w);
  // Rows past N (the last tile) are clamped to row N-1: they load real memory and are never stored.
  const T* wrow[MT][2];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      wrow[m][h] = w + (static_cast<int64_t>(m) * N + min(n0 + g + 8 * h, N - 1)) * static_cast<int64_t>(K);

  if (EPI == Epilogue::kArgmax && threadIdx.x < kMaxRows) key_s[threadIdx.x] = 0ull;

  if (NORM) {  // RMSNorm statistics of each x row (read from L2; x is tiny next to W)
    for (int r = warp; r < R; r += nwarps) {
      float ss = 0.0f;
      for (int kk = lane * kVecElems; kk < K; kk += 32 * kVecElems) {
        Vec8 v;
        v.u = load_vec(x + r * a.x_stride + kk);
#pragma unroll
        for (int e = 0; e < kVecElems; ++e) {
          const float f = vec_get<T>(v, e);
          ss += f * f;
        }
      }
      ss = warp_sum(ss);
      if (lane == 0) rstd_s[r] = rms_rstd(ss, K, a.eps);
    }
  }

  float acc[MT][NT][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int nt = 0; nt < NT; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][nt][i] = 0.0f;

  uint4 wa[UNROLL][MT][2][kVecPerStep], wb[UNROLL][MT][2][kVecPerStep];

  // Weight vectors of group j of the chunk starting at kc0: steps (j*ksplit + ks)*UNROLL + u.
  auto load_group = [&](uint4 (&dst)[UNROLL][MT][2][kVecPerStep], int kc0, int j) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u)
#pragma unroll
      for (int v = 0; v < kVecPerStep; ++v) {
        const int kk = kc0 + ((j * a.ksplit + ks) * UNROLL + u) * kStepK + v * (4 * kVecElems) + t * kVecElems;
        const bool ok = kk < K && kk < kc0 + a.k_chunk;
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int h = 0; h < 2; ++h) dst[u][m][h][v] = ok ? load_stream(wrow[m][h] + kk) : make_uint4(0, 0, 0, 0);
      }
  };

  auto compute_group = [&](const uint4 (&src)[UNROLL][MT][2][kVecPerStep], int steps, int j) {
#pragma unroll
    for (int u = 0; u < UNROLL; ++u) {
      const int s = (j * a.ksplit + ks) * UNROLL + u;
      if (s >= steps) break;  // warp-uniform
#pragma unroll
      for (int v = 0; v < kVecPerStep; ++v) {
        const int kl = s * kStepK + v * (4 * kVecElems) + t * kVecElems;
        uint4 xv[NT];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt) {
          const int r = nt * 8 + g;
          xv[nt] = r < R ? *reinterpret_cast<const uint4*>(x_s + r * ldx + kl) : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt) {
            const uint4 lo = src[u][m][0][v], hi = src[u][m][1][v];
            mma_16816<T>(acc[m][nt], lo.x, hi.x, lo.y, hi.y, xv[nt].x, xv[nt].y);
            mma_16816<T>(acc[m][nt], lo.z, hi.z, lo.w, hi.w, xv[nt].z, xv[nt].w);
          }
      }
    }
  };

  for (int kc0 = 0; kc0 < K; kc0 += a.k_chunk) {
    const int chunk = min(a.k_chunk, K - kc0);
    const int steps = (chunk + kStepK - 1) / kStepK;
    const int groups = (steps + a.ksplit * UNROLL - 1) / (a.ksplit * UNROLL);
    // The chunk's first weight loads go out before the barrier so they overlap the x staging.
    load_group(wa, kc0, 0);
    __syncthreads();  // the previous chunk's x is no longer read
    const int vecs_per_row = steps * kStepK / kVecElems;
    for (int i = threadIdx.x; i < R * vecs_per_row; i += blockDim.x) {
      const int r = i / vecs_per_row, kl = (i - r * vecs_per_row) * kVecElems, kk = kc0 + kl;
      Vec8 v;
      v.u = make_uint4(0, 0, 0, 0);  // k past K contributes zero
      if (kk < K) {
        v.u = load_vec(x + r * a.x_stride + kk);
        if (NORM) {
          Vec8 nw;
          nw.u = load_vec(static_cast<const T*>(a.norm_w) + kk);
          const float rstd = rstd_s[r];
#pragma unroll
          for (int e = 0; e < kVecElems; ++e) vec_set<T>(v, e, rms_apply<T>(vec_get<T>(v, e), rstd, vec_get<T>(nw, e)));
        }
      }
      store_vec(x_s + r * ldx + kl, v.u);
    }
    __syncthreads();
    for (int j = 0; j < groups; j += 2) {
      if (j + 1 < groups) load_group(wb, kc0, j + 1);
      compute_group(wa, steps, j);
      if (j + 1 < groups) {
        if (j + 2 < groups) load_group(wa, kc0, j + 2);
        compute_group(wb, steps, j + 1);
      }
    }
  }

  // Deterministic split-K: warps ks > 0 publish partials, warp ks == 0 adds them in ks order.
  if (a.ksplit > 1) {
    if (ks > 0) {
      float* dst = red_s + ((ks - 1) * a.row_tiles + rt) * (MT * NT * 4 * 32);
#pragma unroll
      for (int m = 0; m < MT; ++m)
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
          for (int i = 0; i < 4; ++i) dst[((m * NT + nt) * 4 + i) * 32 + lane] = acc[m][nt][i];
    }
    __syncthreads();
    if (ks == 0) {
      for (int q = 1; q < a.ksplit; ++q) {
        const float* src = red_s + ((q - 1) * a.row_tiles + rt) * (MT * NT * 4 * 32);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[m][nt][i] += src[((m * NT + nt) * 4 + i) * 32 + lane];
      }
    }
  }

  // Epilogue. Fragment element i of n-tile nt is (weight row n0 + g + 8*(i/2), x row nt*8 + 2t + i%2).
  if (EPI == Epilogue::kArgmax) {
    if (ks == 0) {
#pragma unroll
      for (int nt = 0; nt < NT; ++nt)
#pragma unroll
        for (int p = 0; p < 2; ++p) {
          unsigned long long best = 0ull;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int n = n0 + g + 8 * h;
            if (n < N) {  // compare the logit as the model dtype holds it
              const unsigned long long key = argmax_key(round_to<T>(acc[0][nt][2 * h + p]), n);
              best = key > best ? key : best;
            }
          }
#pragma unroll
          for (int o = 4; o < 32; o <<= 1) {
            const unsigned long long other = shfl_xor_u64(best, o);
            best = other > best ? other : best;
          }
          const int r = nt * 8 + 2 * t + p;
          if (g == 0 && r < R) atomicMax(&key_s[r], best);
        }
    }
    __syncthreads();
    // One global atomic per block and row: max is order-independent, so the result is
    // deterministic whichever block arrives first.
    if (threadIdx.x < R) atomicMax(&a.keys[threadIdx.x], key_s[threadIdx.x]);
    return;
  }

  if (ks != 0) return;
  T* out = static_cast<T*>(a.out);
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + g + 8 * (i >> 1), r = nt * 8 + 2 * t + (i & 1);
      if (n >= N || r >= R) continue;
      float y;
      if (EPI == Epilogue::kLinear) {
        // F.linear: bias added to the fp32 accumulator, one rounding; then `residual + y`
        // rounds again.
        float v = acc[0][nt][i];
        if (a.bias != nullptr) v += to_float(static_cast<const T*>(a.bias)[n]);
        y = round_to<T>(v);
        if (a.residual != nullptr) y = to_float(static_cast<const T*>(a.residual)[r * a.residual_stride + n]) + y;
      } else {
        // gate and up each rounded by F.linear; silu(gate) rounded; the product rounded.
        const float gate = round_to<T>(acc[0][nt][i]), up = round_to<T>(acc[1][nt][i]);
        y = round_to<T>(gate / (1.0f + expf(-gate))) * up;
      }
      out[r * a.out_stride + n] = from_float<T>(y);
    }
}

// Launch configuration for one shape. Deterministic in the shape and the device's SM count.
struct GemvConfig {
  int row_tiles, ksplit, k_chunk;
  size_t smem_bytes;
};

inline GemvConfig gemv_config(int rows, int n, int k, int mt, int elem_bytes, int sm_count) {
  GemvConfig c;
  const int tiles = (n + 15) / 16;
  // Share the staged x across up to 4 row tiles, but keep at least one block per SM.
  c.row_tiles = 4;
  while (c.row_tiles > 1 && (tiles + c.row_tiles - 1) / c.row_tiles < sm_count) c.row_tiles /= 2;
  // Split K inside the block until there are ~16 warps per SM (N = 3584 has only 224 tiles).
  const int group_k = kStepK * (2 / mt);
  c.ksplit = 1;
  while (c.row_tiles * c.ksplit * 2 <= kMaxWarps && tiles * c.ksplit < 16 * sm_count &&
         k >= group_k * c.ksplit * 2)
    c.ksplit *= 2;
  const int k_padded = (k + kStepK - 1) / kStepK * kStepK;
  int fit = (kXSmemBudget / (rows * elem_bytes) - kSmemPadElems) / kStepK * kStepK;
  if (fit < kStepK) fit = kStepK;
  c.k_chunk = k_padded < fit ? k_padded : fit;
  const int red_floats = (c.ksplit - 1) * c.row_tiles * mt * (rows > 8 ? 2 : 1) * 4 * 32;
  c.smem_bytes = static_cast<size_t>(rows) * (c.k_chunk + kSmemPadElems) * elem_bytes + red_floats * sizeof(float) +
                 kMaxRows * sizeof(float) + kMaxRows * sizeof(unsigned long long);
  return c;
}

template <typename T, int NT, Epilogue EPI, bool NORM>
cudaError_t launch_gemv_tile(GemvArgs a, cudaStream_t stream) {
  constexpr int MT = EPI == Epilogue::kGateUp ? 2 : 1;
  const GemvConfig c = gemv_config(a.rows, a.n, a.k, MT, sizeof(T), device_sm_count());
  a.k_chunk = c.k_chunk;
  a.row_tiles = c.row_tiles;
  a.ksplit = c.ksplit;
  auto kernel = gemv_kernel<T, NT, EPI, NORM>;
  if (c.smem_bytes > 48 * 1024) {
    // Opting in above 48 KB is a per-function attribute, not a stream operation: allowed while
    // a CUDA graph is being captured.
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(c.smem_bytes));
    if (err != cudaSuccess) return err;
  }
  const int tiles = (a.n + 15) / 16;
  const dim3 grid((tiles + c.row_tiles - 1) / c.row_tiles);
  const dim3 block(32 * c.row_tiles * c.ksplit);
  kernel<<<grid, block, c.smem_bytes, stream>>>(a);
  return cudaGetLastError();
}

// Runs the GEMV for any number of rows, 16 at a time (prefill reads the weights once per 16
// rows; decode and the MCTP steps use R <= 16, one pass).
template <typename T, Epilogue EPI, bool NORM>
cudaError_t launch_gemv(const GemvArgs& args, cudaStream_t stream) {
  if (args.rows <= 0 || args.n <= 0 || args.k <= 0 || args.k % kVecElems != 0) return cudaErrorInvalidValue;
  for (int r0 = 0; r0 < args.rows; r0 += kMaxRows) {
    GemvArgs a = args;
    a.rows = args.rows - r0 < kMaxRows ? args.rows - r0 : kMaxRows;
    a.x = static_cast<const T*>(args.x) + r0 * args.x_stride;
    if (args.residual != nullptr) a.residual = static_cast<const T*>(args.residual) + r0 * args.residual_stride;
    if (args.out != nullptr) a.out = static_cast<T*>(args.out) + r0 * args.out_stride;
    if (args.keys != nullptr) a.keys = args.keys + r0;
    const cudaError_t err = a.rows > 8 ? launch_gemv_tile<T, 2, EPI, NORM>(a, stream)
                                       : launch_gemv_tile<T, 1, EPI, NORM>(a, stream);
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace vk
