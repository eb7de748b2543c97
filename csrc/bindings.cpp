// Registers the CUDA kernels as torch ops `torch.ops.vita_kernels.*` in the extension module
// vita_kernels._C. Every op is destination-passing (it writes caller-provided tensors and returns
// nothing), so a CUDA graph can capture it without any allocation; each has a Meta kernel that
// checks shapes and dtypes, so FakeTensor tracing (torch.compile) works too.
//
// Errors name the tensor and what was expected; shape and dtype problems raise ValueError
// (TORCH_CHECK_VALUE), a failed launch raises RuntimeError with the CUDA error string.
#include <Python.h>

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <climits>
#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include "vita_kernels.h"

namespace {

using at::Tensor;

std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << "[";
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << "]";
  return o.str();
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef expected) {
  TORCH_CHECK_VALUE(t.sizes() == expected, name, " has shape ", shape_str(t.sizes()), ", expected ",
                    shape_str(expected));
}

void check_dim(const Tensor& t, const char* name, int64_t dim, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == dim, name, " has shape ", shape_str(t.sizes()), ", expected ", layout);
}

int dtype_code(const Tensor& t, const char* name) {
  if (t.scalar_type() == at::kBFloat16) return VK_DTYPE_BF16;
  if (t.scalar_type() == at::kHalf) return VK_DTYPE_FP16;
  TORCH_CHECK_VALUE(false, name, " has dtype ", t.scalar_type(), ", expected bfloat16 or float16");
  return -1;
}

void check_same_dtype(const Tensor& t, const char* name, const Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.scalar_type() == ref.scalar_type(), name, " has dtype ", t.scalar_type(), ", expected ",
                    ref.scalar_type(), " (the dtype of ", ref_name, ")");
}

void check_int_range(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v > 0 && v < INT_MAX, what, " = ", v, " is outside the supported range [1, ", INT_MAX, ")");
}

void check_multiple_of_8(int64_t v, const char* what) {
  TORCH_CHECK_VALUE(v % 8 == 0, what, " = ", v, " must be a multiple of 8 (the kernels move 16-byte vectors)");
}

// Device-side requirements (CUDA impls only): same CUDA device as `ref`, 16-byte aligned rows.
void check_device(const Tensor& t, const char* name, const Tensor& ref) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " is on ", t.device(), ", expected a CUDA tensor");
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " is on ", t.device(), ", expected ", ref.device());
}

// A 2-D activation: last dimension contiguous, row stride a multiple of 8 elements, 16-byte aligned.
void check_rows_layout(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(0) <= 1 || (t.stride(1) == 1 && t.stride(0) % 8 == 0 && t.stride(0) >= t.size(1)),
                    name, " has strides ", shape_str(t.strides()),
                    ", expected a contiguous last dimension and a row stride that is a multiple of 8");
  TORCH_CHECK_VALUE(t.size(0) > 1 || t.size(1) <= 1 || t.stride(1) == 1, name, " has strides ",
                    shape_str(t.strides()), ", expected a contiguous last dimension");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " is not 16-byte aligned (storage offset ", t.storage_offset(), ")");
}

void check_contiguous(const Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.is_contiguous(), name, " must be contiguous (strides ", shape_str(t.strides()), ")");
  TORCH_CHECK_VALUE(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name,
                    " is not 16-byte aligned (storage offset ", t.storage_offset(), ")");
}

int64_t row_stride(const Tensor& t) { return t.size(0) <= 1 ? t.size(1) : t.stride(0); }

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "vita_kernels.", op, ": CUDA launch failed: ", cudaGetErrorString(err));
}

cudaStream_t stream_of(const Tensor& t) { return c10::cuda::getCurrentCUDAStream(t.get_device()).stream(); }

// ---------------------------------------------------------------- linear
void linear_meta(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& residual, const Tensor& out) {
  check_dim(x, "x", 2, "[R, K]");
  check_dim(weight, "weight", 2, "[N, K]");
  const int64_t rows = x.size(0), k = x.size(1), n = weight.size(0);
  dtype_code(x, "x");
  check_shape(weight, "weight", {n, k});
  check_same_dtype(weight, "weight", x, "x");
  if (bias) {
    check_shape(*bias, "bias", {n});
    check_same_dtype(*bias, "bias", x, "x");
  }
  if (residual) {
    check_shape(*residual, "residual", {rows, n});
    check_same_dtype(*residual, "residual", x, "x");
  }
  check_shape(out, "out", {rows, n});
  check_same_dtype(out, "out", x, "x");
  check_int_range(rows, "R (rows of x)");
  check_int_range(n, "N (rows of weight)");
  check_int_range(k, "K (columns of x)");
  check_multiple_of_8(k, "K (columns of x)");
}

void linear_cuda(const Tensor& x, const Tensor& weight, const std::optional<Tensor>& bias,
                 const std::optional<Tensor>& residual, const Tensor& out) {
  linear_meta(x, weight, bias, residual, out);
  check_device(x, "x", x);
  check_device(weight, "weight", x);
  check_device(out, "out", x);
  check_rows_layout(x, "x");
  check_contiguous(weight, "weight");
  check_rows_layout(out, "out");
  if (bias) {
    check_device(*bias, "bias", x);
    check_contiguous(*bias, "bias");
  }
  if (residual) {
    check_device(*residual, "residual", x);
    check_rows_layout(*residual, "residual");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(vk_linear(x.data_ptr(), row_stride(x), weight.data_ptr(), bias ? bias->data_ptr() : nullptr,
                         residual ? residual->data_ptr() : nullptr, residual ? row_stride(*residual) : 0,
                         out.data_ptr(), row_stride(out), static_cast<int>(x.size(0)),
                         static_cast<int>(weight.size(0)), static_cast<int>(x.size(1)), dtype_code(x, "x"),
                         stream_of(x)),
               "linear");
}

// ---------------------------------------------------------------- norm_gate_up
void norm_gate_up_meta(const Tensor& x, const Tensor& norm_weight, const Tensor& w_gate_up, double eps,
                       const Tensor& out) {
  check_dim(x, "x", 2, "[R, H]");
  check_dim(w_gate_up, "w_gate_up", 2, "[2I, H]");
  const int64_t rows = x.size(0), h = x.size(1), two_i = w_gate_up.size(0);
  dtype_code(x, "x");
  TORCH_CHECK_VALUE(two_i % 2 == 0, "w_gate_up has shape ", shape_str(w_gate_up.sizes()),
                    ", expected [2I, H] with an even first dimension (gate rows, then up rows)");
  check_shape(w_gate_up, "w_gate_up", {two_i, h});
  check_shape(norm_weight, "norm_weight", {h});
  check_shape(out, "out", {rows, two_i / 2});
  check_same_dtype(norm_weight, "norm_weight", x, "x");
  check_same_dtype(w_gate_up, "w_gate_up", x, "x");
  check_same_dtype(out, "out", x, "x");
  check_int_range(rows, "R (rows of x)");
  check_int_range(two_i, "2I (rows of w_gate_up)");
  check_int_range(h, "H (columns of x)");
  check_multiple_of_8(h, "H (columns of x)");
  (void)eps;
}

void norm_gate_up_cuda(const Tensor& x, const Tensor& norm_weight, const Tensor& w_gate_up, double eps,
                       const Tensor& out) {
  norm_gate_up_meta(x, norm_weight, w_gate_up, eps, out);
  check_device(x, "x", x);
  check_device(norm_weight, "norm_weight", x);
  check_device(w_gate_up, "w_gate_up", x);
  check_device(out, "out", x);
  check_rows_layout(x, "x");
  check_contiguous(norm_weight, "norm_weight");
  check_contiguous(w_gate_up, "w_gate_up");
  check_rows_layout(out, "out");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(vk_norm_gate_up(x.data_ptr(), row_stride(x), norm_weight.data_ptr(), w_gate_up.data_ptr(),
                               out.data_ptr(), row_stride(out), static_cast<int>(x.size(0)),
                               static_cast<int>(w_gate_up.size(0) / 2), static_cast<int>(x.size(1)),
                               static_cast<float>(eps), dtype_code(x, "x"), stream_of(x)),
               "norm_gate_up");
}

// ---------------------------------------------------------------- head_argmax
void head_argmax_meta(const Tensor& x, const Tensor& norm_weight, const Tensor& w_head, double eps,
                      const Tensor& out) {
  check_dim(x, "x", 2, "[R, H]");
  check_dim(w_head, "w_head", 2, "[V, H]");
  const int64_t rows = x.size(0), h = x.size(1), v = w_head.size(0);
  dtype_code(x, "x");
  check_shape(w_head, "w_head", {v, h});
  check_shape(norm_weight, "norm_weight", {h});
  check_shape(out, "out", {rows});
  check_same_dtype(norm_weight, "norm_weight", x, "x");
  check_same_dtype(w_head, "w_head", x, "x");
  TORCH_CHECK_VALUE(out.scalar_type() == at::kLong, "out has dtype ", out.scalar_type(), ", expected torch.int64");
  TORCH_CHECK_VALUE(rows <= 1024, "R (rows of x) = ", rows, " is above the supported 1024");
  check_int_range(rows, "R (rows of x)");
  check_int_range(v, "V (rows of w_head)");
  check_int_range(h, "H (columns of x)");
  check_multiple_of_8(h, "H (columns of x)");
  (void)eps;
}

void head_argmax_cuda(const Tensor& x, const Tensor& norm_weight, const Tensor& w_head, double eps,
                      const Tensor& out) {
  head_argmax_meta(x, norm_weight, w_head, eps, out);
  check_device(x, "x", x);
  check_device(norm_weight, "norm_weight", x);
  check_device(w_head, "w_head", x);
  check_device(out, "out", x);
  check_rows_layout(x, "x");
  check_contiguous(norm_weight, "norm_weight");
  check_contiguous(w_head, "w_head");
  TORCH_CHECK_VALUE(out.is_contiguous(), "out must be contiguous (strides ", shape_str(out.strides()), ")");
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(vk_head_argmax(x.data_ptr(), row_stride(x), norm_weight.data_ptr(), w_head.data_ptr(),
                              out.data_ptr<int64_t>(), static_cast<int>(x.size(0)), static_cast<int>(w_head.size(0)),
                              static_cast<int>(x.size(1)), static_cast<float>(eps), dtype_code(x, "x"),
                              stream_of(x)),
               "head_argmax");
}

// ---------------------------------------------------------------- add_rmsnorm / rmsnorm
void norm_meta(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight, const Tensor& y,
               const std::optional<Tensor>& s) {
  check_dim(x, "x", 2, "[R, H]");
  const int64_t rows = x.size(0), h = x.size(1);
  dtype_code(x, "x");
  check_shape(weight, "weight", {h});
  check_same_dtype(weight, "weight", x, "x");
  check_shape(y, "y", {rows, h});
  check_same_dtype(y, "y", x, "x");
  if (residual) {
    check_shape(*residual, "residual", {rows, h});
    check_same_dtype(*residual, "residual", x, "x");
    check_shape(*s, "s", {rows, h});
    check_same_dtype(*s, "s", x, "x");
  }
  check_int_range(rows, "R (rows of x)");
  check_int_range(h, "H (columns of x)");
  check_multiple_of_8(h, "H (columns of x)");
  TORCH_CHECK_VALUE(h <= VK_ADD_RMSNORM_MAX_HIDDEN, "H (columns of x) = ", h, " is above the supported ",
                    VK_ADD_RMSNORM_MAX_HIDDEN);
}

void norm_cuda(const Tensor& x, const std::optional<Tensor>& residual, const Tensor& weight, double eps,
               const Tensor& y, const std::optional<Tensor>& s) {
  norm_meta(x, residual, weight, y, s);
  check_device(x, "x", x);
  check_device(weight, "weight", x);
  check_device(y, "y", x);
  check_rows_layout(x, "x");
  check_contiguous(weight, "weight");
  check_rows_layout(y, "y");
  if (residual) {
    check_device(*residual, "residual", x);
    check_device(*s, "s", x);
    check_rows_layout(*residual, "residual");
    check_rows_layout(*s, "s");
  }
  const c10::cuda::CUDAGuard guard(x.device());
  check_launch(vk_add_rmsnorm(x.data_ptr(), row_stride(x), residual ? residual->data_ptr() : nullptr,
                              residual ? row_stride(*residual) : 0, weight.data_ptr(), y.data_ptr(), row_stride(y),
                              residual ? s->data_ptr() : nullptr, residual ? row_stride(*s) : 0,
                              static_cast<int>(x.size(0)), static_cast<int>(x.size(1)), static_cast<float>(eps),
                              dtype_code(x, "x"), stream_of(x)),
               "add_rmsnorm");
}

void add_rmsnorm_meta(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps, const Tensor& y,
                      const Tensor& s) {
  norm_meta(x, residual, weight, y, s);
  (void)eps;
}
void add_rmsnorm_cuda(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps, const Tensor& y,
                      const Tensor& s) {
  norm_cuda(x, residual, weight, eps, y, s);
}
void rmsnorm_meta(const Tensor& x, const Tensor& weight, double eps, const Tensor& y) {
  norm_meta(x, std::nullopt, weight, y, std::nullopt);
  (void)eps;
}
void rmsnorm_cuda(const Tensor& x, const Tensor& weight, double eps, const Tensor& y) {
  norm_cuda(x, std::nullopt, weight, eps, y, std::nullopt);
}

}  // namespace

TORCH_LIBRARY(vita_kernels, m) {
  m.def("linear(Tensor x, Tensor weight, Tensor? bias, Tensor? residual, Tensor(a!) out) -> ()");
  m.def("norm_gate_up(Tensor x, Tensor norm_weight, Tensor w_gate_up, float eps, Tensor(a!) out) -> ()");
  m.def("head_argmax(Tensor x, Tensor norm_weight, Tensor w_head, float eps, Tensor(a!) out) -> ()");
  m.def("add_rmsnorm(Tensor x, Tensor residual, Tensor weight, float eps, Tensor(a!) y, Tensor(b!) s) -> ()");
  m.def("rmsnorm(Tensor x, Tensor weight, float eps, Tensor(a!) y) -> ()");
}

TORCH_LIBRARY_IMPL(vita_kernels, CUDA, m) {
  m.impl("linear", &linear_cuda);
  m.impl("norm_gate_up", &norm_gate_up_cuda);
  m.impl("head_argmax", &head_argmax_cuda);
  m.impl("add_rmsnorm", &add_rmsnorm_cuda);
  m.impl("rmsnorm", &rmsnorm_cuda);
}

TORCH_LIBRARY_IMPL(vita_kernels, Meta, m) {
  m.impl("linear", &linear_meta);
  m.impl("norm_gate_up", &norm_gate_up_meta);
  m.impl("head_argmax", &head_argmax_meta);
  m.impl("add_rmsnorm", &add_rmsnorm_meta);
  m.impl("rmsnorm", &rmsnorm_meta);
}

// The module itself is empty: importing vita_kernels._C loads this library, whose static
// initialisers above register the ops.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", "vita_kernels CUDA ops (torch.ops.vita_kernels)",
                                   -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  return PyModule_Create(&module_def);
}
