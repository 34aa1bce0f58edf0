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
#include <mutex>
#include <new>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace sgk {

constexpr size_t kHugePage = size_t{2} << 20;

// Idle big buffers kept for the next request of the same size, process-wide (what a caching allocator does):
// prune_layer asks for the same few sizes layer after layer (the working copy of W, the sweep's scratch, the factor),
// and fresh memory costs a page fault and the zeroing of every page on first touch, more in a virtual machine
// (there 0.02-0.3 s per 180 MB). At most SPARSEGPT_KERNELS_CPU_CACHE_MB (default 2048; 0: none; anything else is an
// error) megabytes are kept idle, the oldest freed first; release() frees them all.
class BigCache {
 public:
  static BigCache& instance() {
    static BigCache* cache = new BigCache();  // never destroyed: buffers may be freed during static destruction
    return *cache;
  }

  // An idle buffer of exactly `rounded` bytes, or nullptr.
  void* take(size_t rounded) {
    std::lock_guard<std::mutex> lock(mu_);
    for (size_t i = idle_.size(); i-- > 0;) {
      if (idle_[i].second == rounded) {
        void* p = idle_[i].first;
        idle_.erase(idle_.begin() + static_cast<std::ptrdiff_t>(i));
        idle_bytes_ -= rounded;
        live_[p] = rounded;
        return p;
      }
    }
    return nullptr;
  }

  void track(void* p, size_t rounded) {
    std::lock_guard<std::mutex> lock(mu_);
    live_[p] = rounded;
  }

  // Returns false when p did not come from take/track (then the caller frees it).
  bool give(void* p) {
    std::vector<void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      auto it = live_.find(p);
      if (it == live_.end()) return false;
      const size_t rounded = it->second;
      live_.erase(it);
      if (rounded > cap_) {
        drop.push_back(p);
      } else {
        idle_.emplace_back(p, rounded);
        idle_bytes_ += rounded;
        while (idle_bytes_ > cap_) {
          drop.push_back(idle_.front().first);
          idle_bytes_ -= idle_.front().second;
          idle_.erase(idle_.begin());
        }
      }
    }
    for (void* q : drop) std::free(q);
    return true;
  }

  // Frees every idle buffer; returns the bytes freed.
  size_t release() {
    std::vector<std::pair<void*, size_t>> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(idle_);
      idle_bytes_ = 0;
    }
    size_t bytes = 0;
    for (auto& b : drop) {
      std::free(b.first);
      bytes += b.second;
    }
    return bytes;
  }

  size_t idle_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return idle_bytes_;
  }

 private:
  BigCache() {
    const char* env = std::getenv("SPARSEGPT_KERNELS_CPU_CACHE_MB");
    long long mb = 2048;
    if (env != nullptr && *env != '\0') {
      char* end = nullptr;
      const long long v = std::strtoll(env, &end, 10);
      if (end == env || *end != '\0' || v < 0) {
        throw std::invalid_argument(std::string("SPARSEGPT_KERNELS_CPU_CACHE_MB=") + env +
                                    " is not a whole number of megabytes >= 0");
      }
      mb = v;
    }
    cap_ = static_cast<size_t>(mb) << 20;
  }

  std::mutex mu_;
  std::unordered_map<void*, size_t> live_;
  std::vector<std::pair<void*, size_t>> idle_;  // oldest first
  size_t idle_bytes_ = 0;
  size_t cap_ = 0;
};

// `bytes` of uninitialised memory (free it with free_big); from 2 MiB up aligned to 2 MiB, marked for transparent
// huge pages and taken from / given back to BigCache.
inline void* alloc_big(size_t bytes) {
  void* p = nullptr;
  if (bytes >= kHugePage) {
    const size_t rounded = (bytes + kHugePage - 1) / kHugePage * kHugePage;
    p = BigCache::instance().take(rounded);
    if (p != nullptr) return p;
    if (posix_memalign(&p, kHugePage, rounded) != 0) {
      BigCache::instance().release();  // idle buffers of other sizes first, then once more
      if (posix_memalign(&p, kHugePage, rounded) != 0) throw std::bad_alloc();
    }
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    madvise(p, rounded, MADV_HUGEPAGE);  // a hint: without THP the pages stay 4 KiB and nothing else changes
#endif
    BigCache::instance().track(p, rounded);
  } else {
    p = std::malloc(bytes == 0 ? 1 : bytes);
    if (p == nullptr) throw std::bad_alloc();
  }
  return p;
}

inline void free_big(void* p) {
  if (p != nullptr && !BigCache::instance().give(p)) std::free(p);
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
  ~BigBuffer() { free_big(data_); }
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
