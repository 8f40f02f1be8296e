// CUDA graphs through libtorch's own at::cuda::CUDAGraph, which tch does not
// bind: capture a sequence of libtorch ops once, then launch all of their
// kernels with one call. libtorch's class (not the raw CUDA graph API) is
// what makes capture safe: it tells libtorch's caching allocator to serve
// the capture from a pool of the graph's own, so no block the graph uses is
// handed to another tensor while the graph lives.
//
// Capture must run on a stream other than the legacy default one, where
// tch queues everything: dalle_graph_new moves this thread's current
// stream to one from libtorch's pool (after the work already queued),
// dalle_graph_leave_side_stream moves it back (after the side stream's
// work). Everything run in between, captured or not, runs on the side
// stream, so a warm-up call there initialises what its first call on a new
// stream would (cuBLAS workspaces), outside the capture.
//
// Built without DALLE_WITH_CUDA (a libtorch without CUDA, or no CUDA
// headers at build time), every entry point fails with a message saying so.

#include <cstdint>
#include <memory>
#include <string>
#include <stdexcept>

#include "dalle_shim.h"

#ifdef DALLE_WITH_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAStream.h>
#include <dlfcn.h>

// Only functions libtorch exports are called here, never the CUDA runtime
// through libtorch's inline helpers: those would make every binary NEED
// libcudart, which the wheel keeps outside libtorch's directory. The one
// runtime call needed is looked up in the runtime libtorch itself loaded.
namespace {

void synchronize(const c10::cuda::CUDAStream& stream) {
  using StreamSynchronize = int (*)(cudaStream_t);
  static auto sync =
      reinterpret_cast<StreamSynchronize>(dlsym(RTLD_DEFAULT, "cudaStreamSynchronize"));
  if (sync == nullptr) {
    throw std::runtime_error("the CUDA runtime (cudaStreamSynchronize) is not loaded");
  }
  int status = sync(stream.stream());
  if (status != 0) {
    throw std::runtime_error("cudaStreamSynchronize failed with CUDA error " +
                             std::to_string(status));
  }
}

}  // namespace

struct DalleGraph {
  at::cuda::CUDAGraph graph;
  c10::cuda::CUDAStream ambient;
  c10::cuda::CUDAStream side;
  // This thread's current device before the graph made its own current
  // (capture and replay run on the current device's current stream).
  c10::DeviceIndex previous_device;
  bool on_side = false;
  bool capturing = false;

  DalleGraph(c10::cuda::CUDAStream ambient, c10::cuda::CUDAStream side,
             c10::DeviceIndex previous_device)
      : ambient(ambient), side(side), previous_device(previous_device) {}
};
#else
struct DalleGraph {};
#endif

extern "C" {

const char* dalle_graph_last_error() { return last_error.c_str(); }

int dalle_graph_new(int32_t device, DalleGraph** out) {
  return guarded([&] {
#ifdef DALLE_WITH_CUDA
    auto index = static_cast<c10::DeviceIndex>(device);
    auto ambient = c10::cuda::getCurrentCUDAStream(index);
    // The side stream must see what is already queued (the prefill, the
    // first token): waiting for it once per graph costs one host sync.
    synchronize(ambient);
    auto side = c10::cuda::getStreamFromPool(false, index);
    auto previous = c10::cuda::ExchangeDevice(index);
    auto graph = std::make_unique<DalleGraph>(ambient, side, previous);
    c10::cuda::setCurrentCUDAStream(graph->side);
    graph->on_side = true;
    *out = graph.release();
#else
    (void)device;
    (void)out;
    throw std::runtime_error("this build of libtorch's shim has no CUDA (CUDA graphs unavailable)");
#endif
  });
}

int dalle_graph_capture_begin(DalleGraph* g) {
  return guarded([&] {
#ifdef DALLE_WITH_CUDA
    // Thread-local mode: only this thread's unsafe CUDA calls (a
    // cudaMalloc, a synchronisation) during the capture are errors.
    g->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
    g->capturing = true;
#else
    (void)g;
#endif
  });
}

int dalle_graph_capture_end(DalleGraph* g) {
  return guarded([&] {
#ifdef DALLE_WITH_CUDA
    g->capturing = false;
    g->graph.capture_end();
#else
    (void)g;
#endif
  });
}

int dalle_graph_leave_side_stream(DalleGraph* g) {
  return guarded([&] {
#ifdef DALLE_WITH_CUDA
    if (g->on_side) {
      // What ran on the side stream (the warm-up) comes before anything
      // queued on the ambient stream from now on.
      c10::cuda::setCurrentCUDAStream(g->ambient);
      g->on_side = false;
      synchronize(g->side);
    }
#else
    (void)g;
#endif
  });
}

int dalle_graph_replay(DalleGraph* g) {
  return guarded([&] {
#ifdef DALLE_WITH_CUDA
    // On this thread's current stream: in order with tch's work.
    g->graph.replay();
#else
    (void)g;
#endif
  });
}

void dalle_graph_free(DalleGraph* g) {
#ifdef DALLE_WITH_CUDA
  if (g == nullptr) return;
  guarded([&] {
    if (g->capturing) {
      // A capture left open by a failure: end it so the stream leaves
      // capture mode; the half-made graph is discarded.
      g->capturing = false;
      try {
        g->graph.capture_end();
      } catch (...) {
      }
    }
    if (g->on_side) {
      c10::cuda::setCurrentCUDAStream(g->ambient);
      g->on_side = false;
      synchronize(g->side);
    }
    // Replays may still be running: the graph and its memory pool go only
    // once they are done (one wait per graph, where its caller reads the
    // result anyway).
    synchronize(g->ambient);
  });
  auto previous = g->previous_device;
  // Destroyed on the graph's device, which is still current.
  delete g;
  guarded([&] { c10::cuda::ExchangeDevice(previous); });
#else
  (void)g;
#endif
}

}  // extern "C"
