// A bounded cache of large CPU output buffers.
//
// Why: a fresh multi-megabyte buffer from malloc is fresh mmap'd memory, and the
// first write to each 4 KiB page traps into the kernel to map and zero it. For
// a 64 MiB gradient that costs ~17 ms on the 2-core development machine, several
// times the fused backward itself (measured: filling a new 4096x4096 fp32 tensor
// 19 ms, an existing one 2.3 ms). Training frees each step's loss gradient soon
// after the optimizer step and asks for one of the same size next step, so
// fusedloss keeps freed output buffers (up to FUSEDLOSS_CPU_CACHE_MB, default
// 1024; 0 disables) and hands them out again. fusedloss.empty_cpu_cache()
// returns them to the system. Tensors are ordinary (their storage frees into the
// cache); nothing else in the process is affected.

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/util/Exception.h>

#include <fusedloss/outputs.h>

#include <cstdlib>
#include <map>
#include <mutex>

namespace fusedloss {
namespace {

constexpr size_t kMinBytes = size_t(1) << 20;
constexpr size_t kGranule = size_t(1) << 16;
constexpr size_t kAlign = 64;

class BufferPool {
 public:
  BufferPool() {
    const char* env = std::getenv("FUSEDLOSS_CPU_CACHE_MB");
    limit_ = (env != nullptr ? std::strtoull(env, nullptr, 10) : 1024ull) << 20;
  }

  void* take(size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mu_);
      // The smallest cached block that fits without wasting over a quarter.
      auto it = free_.lower_bound(bytes);
      if (it != free_.end() && it->first <= bytes + bytes / 4) {
        void* p = it->second;
        cached_ -= it->first;
        sizes_[p] = it->first;
        free_.erase(it);
        return p;
      }
    }
    void* p = std::aligned_alloc(kAlign, bytes);
    if (p == nullptr) return nullptr;
    std::lock_guard<std::mutex> lock(mu_);
    sizes_[p] = bytes;
    return p;
  }

  void give(void* p) {
    std::unique_lock<std::mutex> lock(mu_);
    auto it = sizes_.find(p);
    TORCH_INTERNAL_ASSERT(it != sizes_.end());
    const size_t bytes = it->second;
    sizes_.erase(it);
    if (cached_ + bytes <= limit_) {
      free_.emplace(bytes, p);
      cached_ += bytes;
      return;
    }
    lock.unlock();
    std::free(p);
  }

  void clear() {
    std::multimap<size_t, void*> drop;
    {
      std::lock_guard<std::mutex> lock(mu_);
      drop.swap(free_);
      cached_ = 0;
    }
    for (auto& kv : drop) std::free(kv.second);
  }

  int64_t cached_bytes() {
    std::lock_guard<std::mutex> lock(mu_);
    return static_cast<int64_t>(cached_);
  }

 private:
  std::mutex mu_;
  std::multimap<size_t, void*> free_;  // size -> block
  std::map<void*, size_t> sizes_;      // blocks handed out
  size_t cached_ = 0;
  size_t limit_ = 0;
};

// Never destroyed: tensors may outlive static destruction at exit.
BufferPool& pool() {
  static BufferPool* p = new BufferPool();
  return *p;
}

}  // namespace

void empty_cpu_cache() { pool().clear(); }
int64_t cpu_cache_bytes() { return pool().cached_bytes(); }

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  if (!options.device().is_cpu()) return at::empty(sizes, options);
  int64_t numel = 1;
  for (int64_t s : sizes) numel *= s;
  const size_t bytes = static_cast<size_t>(numel) * options.dtype().itemsize();
  if (bytes < kMinBytes) return at::empty(sizes, options);
  const size_t rounded = (bytes + kGranule - 1) / kGranule * kGranule;
  void* p = pool().take(rounded);
  if (p == nullptr) return at::empty(sizes, options);  // let torch report the OOM
  return at::from_blob(p, sizes, [](void* q) { pool().give(q); }, options);
}

}  // namespace fusedloss
