// What every C++ shim over libtorch shares: entry points are `extern "C"`
// and must never unwind into Rust, so each runs its body through
// guarded(), which turns any C++ exception into -1 and keeps its message
// in this shim's thread-local last_error for the Rust side to read.

#pragma once

#include <exception>
#include <string>

namespace {

thread_local std::string last_error;

template <typename F>
int guarded(F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    last_error = e.what();
  } catch (...) {
    last_error = "unknown C++ exception";
  }
  return -1;
}

}  // namespace
