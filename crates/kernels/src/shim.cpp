// libtorch kernels that tch does not bind. Every entry point is
// `extern "C"` and catches every C++ exception: one must never unwind into
// Rust. A failure returns -1 and leaves its message for
// dalle_kernels_last_error().
//
// A tch `Tensor` holds a pointer to an `at::Tensor` (torch-sys's
// `typedef torch::Tensor *tensor`): that is what crosses as `void*`.

#include <ATen/ATen.h>
#include <ATen/ops/_fused_adamw.h>

#include <cstddef>
#include <vector>

#include "dalle_shim.h"

namespace {

std::vector<at::Tensor> tensors_of(void* const* tensors, size_t count) {
  std::vector<at::Tensor> list;
  list.reserve(count);
  for (size_t i = 0; i < count; ++i) list.push_back(*static_cast<at::Tensor*>(tensors[i]));
  return list;
}

}  // namespace

extern "C" {

const char* dalle_kernels_last_error() { return last_error.c_str(); }

// One AdamW update of `count` parameter tensors in place (and their two
// moments), by libtorch's fused kernel: one pass over each tensor, on the
// CPU as on CUDA. `steps` holds each tensor's step count, already
// incremented for this update (the kernel reads it for the bias
// corrections and leaves it as it is).
int dalle_kernels_fused_adamw(void* const* params, void* const* grads, void* const* exp_avgs,
                              void* const* exp_avg_sqs, void* const* steps, size_t count,
                              double lr, double beta1, double beta2, double weight_decay,
                              double eps) {
  return guarded([&] {
    auto p = tensors_of(params, count);
    auto g = tensors_of(grads, count);
    auto m = tensors_of(exp_avgs, count);
    auto v = tensors_of(exp_avg_sqs, count);
    auto s = tensors_of(steps, count);
    at::_fused_adamw_(p, g, m, v, {}, s, lr, beta1, beta2, weight_decay, eps,
                      /*amsgrad=*/false, /*maximize=*/false);
  });
}

}  // extern "C"
