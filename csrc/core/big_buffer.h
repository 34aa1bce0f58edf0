// Buffers of the CPU sweep and factorisation that span many pages, backed by transparent huge pages where the OS
// offers them (Linux, THP "madvise" or "always"). Their GEMMs stream them whole with rows far apart, and with 4 KiB
// pages those walks keep missing the TLB: on 2 cores, interleaved runs, the sweep's lazy GEMMs at 11008x4096 took
// 0.65-0.70 s on 2 MiB pages against 0.68-0.82 s without, and the blocked Cholesky of an 11008² Hessian 2.08-2.23 s
// (best of 3) against 2.43-2.55 s. Where THP is off this is plain memory.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sgk {

// `bytes` of uninitialised memory (free it with std::free); from 2 MiB up aligned to 2 MiB and marked for
// transparent huge pages.
inline void* alloc_big(size_t bytes) {
  constexpr size_t kHugePage = size_t{2} << 20;
  void* p = nullptr;
  if (bytes >= kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    if (posix_memalign(&p, kHugePage, rounded) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB and nothing else changes
#endif
  } else {
    p = std::malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) throw std::bad_alloc();
  }
  return p;
}

template <typename T>
class BigBuffer {
 public:
  // n elements, zero-filled when `zero` (otherwise left as the allocator gives them)
  explicit BigBuffer(size_t n, bool zero = false) : size_(n) {
    if (n == 0) return;
    data_ = static_cast<T*>(alloc_big(n * sizeof(T)));
    if (zero) std::memset(static_cast<void*>(data_), 0, n * sizeof(T));
  }
  ~BigBuffer() { std::free(data_); }
  BigBuffer(const BigBuffer&) = delete;
  BigBuffer& operator=(const BigBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  T* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace sgk
