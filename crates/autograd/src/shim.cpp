// What tch does not bind of libtorch's autograd: a hook that runs right
// after a leaf tensor's gradient has been accumulated into its `.grad`
// (torch.Tensor.register_post_accumulate_grad_hook in Python), and
// dropping a `.grad`. Every entry point is `extern "C"` and catches every
// C++ exception: one must never unwind into Rust. A failure returns -1 and
// leaves its message for dalle_autograd_last_error().
//
// A tch `Tensor` holds a pointer to an `at::Tensor` (torch-sys's
// `typedef torch::Tensor *tensor`): that is what crosses as `void*`.

#include <torch/csrc/autograd/function_hook.h>
#include <torch/csrc/autograd/variable.h>

#include <memory>

#include "dalle_shim.h"

namespace {

using Callback = void (*)(void* context);
using Release = void (*)(void* context);

// Calls back into Rust after each accumulation; releases the Rust side's
// context when libtorch drops the hook (the tensor dies, or another hook
// replaces it). The callback itself never throws: it catches Rust panics.
struct AccumulatedHook : torch::autograd::PostAccumulateGradHook {
  AccumulatedHook(Callback callback, Release release, void* context)
      : callback(callback), release(release), context(context) {}
  ~AccumulatedHook() override { release(context); }
  void operator()(const torch::autograd::Variable&) override { callback(context); }

  Callback callback;
  Release release;
  void* context;
};

const at::Tensor& tensor_of(void* tensor) { return *static_cast<at::Tensor*>(tensor); }

}  // namespace

extern "C" {

const char* dalle_autograd_last_error() { return last_error.c_str(); }

// Sets `tensor`'s one post-accumulate hook (replacing any): the hook owns
// `context` from here on, even on failure.
int dalle_autograd_on_accumulated(void* tensor, Callback callback, Release release,
                                  void* context) {
  auto hook = std::make_unique<AccumulatedHook>(callback, release, context);
  return guarded([&] {
    const at::Tensor& t = tensor_of(tensor);
    TORCH_CHECK(t.is_leaf() && t.requires_grad(),
                "a post-accumulate hook needs a leaf that requires grad");
    torch::autograd::impl::set_post_acc_grad_hooks(t, std::move(hook));
  });
}

// Removes `tensor`'s post-accumulate hook, if any.
int dalle_autograd_clear_accumulated(void* tensor) {
  return guarded([&] {
    torch::autograd::impl::post_acc_grad_hooks(tensor_of(tensor)).reset();
  });
}

// Drops `tensor`'s `.grad` (the next backward allocates a new one).
int dalle_autograd_drop_grad(void* tensor) {
  return guarded([&] { tensor_of(tensor).mutable_grad().reset(); });
}

}  // extern "C"
