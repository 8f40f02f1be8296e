//! The precision training and sampling compute in: fp32, TF32 (fp32
//! storage, tensor-core matmuls) or bf16 autocast with fp32 master weights,
//! fp32 optimizer state and fp32 losses.
//!
//! Why libtorch's own autocast, reached through a small C++ shim, and not
//! casts written into the models: tch binds only the legacy autocast
//! switch, which casts to fp16 on CUDA; the dtype and the weight-cast cache
//! are not bound. Autocast already knows, op by op, what is safe in bf16
//! (matmuls, convolutions, attention) and what must stay fp32 (losses,
//! softmax and norms on CUDA), the same lists PyTorch users train with, so
//! the models stay written once in fp32 and the comparison with PyTorch
//! bf16 autocast is like for like. Hand-placed casts would have to be
//! repeated at every matmul and convolution of every model and kept in
//! step with them. The shim is a few `extern "C"` wrappers over
//! `at::autocast` and `at::globalContext()` (see `src/shim.cpp`), compiled
//! against the headers of the libtorch torch-sys links.
//!
//! Model code keeps its losses fp32 where autocast's CPU lists would not
//! (the CPU list leaves `log_softmax` and elementwise ops in bf16): logits
//! and decoder statistics are cast to fp32 before their losses.

mod autocast;
mod capability;
mod ffi;
mod setting;

pub use autocast::{Autocast, autocast_kind, full_precision, is_autocast_enabled};
pub use capability::{compute_capability, has_ampere_tensor_cores};
pub use setting::{Precision, PrecisionSetting};
