// A barrier for the few threads that split one recurrent step between them (recurrent_cpu.cpp,
// the LSTM's two-thread loops): a step of a small LSTM is a few microseconds, so the threads
// meet once per step and a sleeping wait (a futex round trip, tens of microseconds) would cost
// more than the step. Waiting threads spin, pausing between reads, and yield the core after a
// while so that a descheduled partner on a busy machine gets it back.

#pragma once

#include <atomic>
#include <thread>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace gradhealth {

class SpinBarrier {
 public:
  explicit SpinBarrier(int parties) : parties_(parties) {}

  // Returns once all `parties` threads have called it; what each wrote before is visible to
  // all after.
  void wait() {
    const int phase = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == parties_ - 1) {
      arrived_.store(0, std::memory_order_relaxed);  // before the release below: reset for the next
      phase_.fetch_add(1, std::memory_order_acq_rel);
      return;
    }
    for (int spins = 0; phase_.load(std::memory_order_acquire) == phase; ++spins) {
      if (spins < kSpinsBeforeYield) {
        pause();
      } else {
        std::this_thread::yield();
      }
    }
  }

 private:
  // ~10 µs of pausing (a pause is tens of cycles) before yielding: a few steps' time
  static constexpr int kSpinsBeforeYield = 1000;

  static void pause() {
#if defined(__x86_64__)
    _mm_pause();
#endif
  }

  const int parties_;
  std::atomic<int> arrived_{0};
  std::atomic<int> phase_{0};
};

}  // namespace gradhealth
