// Scratch buffers of the CPU sweep that span many pages, backed by transparent huge pages where the OS offers them
// (Linux, THP "madvise" or "always"). The sweep's GEMMs stream the (rows, cols) scratch and the lazy-update buffer
// whole, and with 4 KiB pages those walks keep missing the TLB: 11008x4096 on 2 cores, interleaved runs, the lazy
// GEMMs took 0.65-0.70 s on 2 MiB pages against 0.68-0.82 s without. Where THP is off this is plain memory.
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

template <typename T>
class BigBuffer {
 public:
  // n elements, zero-filled when `zero` (otherwise left as the allocator gives them)
  explicit BigBuffer(size_t n, bool zero = false) : size_(n) {
    if (n == 0) return;
    const size_t bytes = n * sizeof(T);
    if (bytes >= kHugePage) {
      const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
      void* p = nullptr;
      if (posix_memalign(&p, kHugePage, rounded) != 0) throw std::bad_alloc();
#if defined(__linux__) && defined(MADV_HUGEPAGE)
      madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB and nothing else changes
#endif
      data_ = static_cast<T*>(p);
    } else {
      data_ = static_cast<T*>(std::malloc(bytes));
      if (data_ == nullptr) throw std::bad_alloc();
    }
    if (zero) std::memset(static_cast<void*>(data_), 0, bytes);
  }
  ~BigBuffer() { std::free(data_); }
  BigBuffer(const BigBuffer&) = delete;
  BigBuffer& operator=(const BigBuffer&) = delete;

  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }

 private:
  static constexpr size_t kHugePage = size_t{2} << 20;
  T* data_ = nullptr;
  size_t size_ = 0;
};

}  // namespace sgk
