// What tch does not bind of libtorch's precision controls: the autocast
// state (dtype, on/off, weight-cast cache, nesting) per device type, the
// TF32 switches of cuBLAS and cuDNN, and the compute capability of a CUDA
// device. Every entry point is `extern "C"` and catches every C++
// exception: one must never unwind into Rust. A failure returns -1 and
// leaves its message for dalle_precision_last_error().

#include <ATen/Context.h>
#include <ATen/autocast_mode.h>
#include <dlfcn.h>

#include <cstdint>
#include <string>

#include "dalle_shim.h"

namespace {

c10::DeviceType device_type(int32_t code) {
  return static_cast<c10::DeviceType>(code);
}

}  // namespace

extern "C" {

const char* dalle_precision_last_error() { return last_error.c_str(); }

int dalle_autocast_state(int32_t device, bool* enabled, int32_t* dtype) {
  return guarded([&] {
    *enabled = at::autocast::is_autocast_enabled(device_type(device));
    *dtype = static_cast<int32_t>(at::autocast::get_autocast_dtype(device_type(device)));
  });
}

int dalle_autocast_set(int32_t device, bool enabled, int32_t dtype) {
  return guarded([&] {
    at::autocast::set_autocast_dtype(device_type(device), static_cast<c10::ScalarType>(dtype));
    at::autocast::set_autocast_enabled(device_type(device), enabled);
  });
}

int dalle_autocast_increment_nesting(int32_t* depth) {
  return guarded([&] { *depth = at::autocast::increment_nesting(); });
}

int dalle_autocast_decrement_nesting(int32_t* depth) {
  return guarded([&] { *depth = at::autocast::decrement_nesting(); });
}

int dalle_autocast_clear_cache() {
  return guarded([] { at::autocast::clear_cache(); });
}

int dalle_tf32_state(bool* cublas, bool* cudnn) {
  return guarded([&] {
    *cublas = at::globalContext().allowTF32CuBLAS();
    *cudnn = at::globalContext().allowTF32CuDNN();
  });
}

int dalle_tf32_set(bool cublas, bool cudnn) {
  return guarded([&] {
    at::globalContext().setAllowTF32CuBLAS(cublas);
    at::globalContext().setAllowTF32CuDNN(cudnn);
  });
}

// The compute capability of CUDA device `ordinal` through the CUDA runtime
// that libtorch itself loaded (libtorch_cpu needs libcudart): looked up at
// run time, because the wheel ships no CUDA headers to compile against and
// a CPU-only machine may have no CUDA at all.
int dalle_cuda_compute_capability(int32_t ordinal, int32_t* major, int32_t* minor) {
  using GetAttribute = int (*)(int*, int, int);
  auto get = reinterpret_cast<GetAttribute>(dlsym(RTLD_DEFAULT, "cudaDeviceGetAttribute"));
  if (get == nullptr) {
    last_error = "the CUDA runtime (cudaDeviceGetAttribute) is not loaded";
    return -1;
  }
  // cudaDevAttrComputeCapabilityMajor and ...Minor.
  const int kMajor = 75, kMinor = 76;
  int value_major = 0, value_minor = 0;
  int status = get(&value_major, kMajor, ordinal);
  if (status == 0) status = get(&value_minor, kMinor, ordinal);
  if (status != 0) {
    last_error = "cudaDeviceGetAttribute failed with CUDA error " + std::to_string(status);
    return -1;
  }
  *major = value_major;
  *minor = value_minor;
  return 0;
}

}  // extern "C"
