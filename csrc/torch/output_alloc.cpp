// See output_alloc.h.
#include "output_alloc.h"

#include <ATen/EmptyTensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/core/Allocator.h>
#include <c10/core/CPUAllocator.h>
#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

// Only where the kernel takes the advice (Linux, MADV_HUGEPAGE); elsewhere empty_output is
// at::empty.
#if defined(__linux__)
#include <sys/mman.h>
#endif
#if defined(__linux__) && defined(MADV_HUGEPAGE)
#define LLMCORE_HUGE_OUTPUTS 1
#else
#define LLMCORE_HUGE_OUTPUTS 0
#endif

namespace llmcore {
namespace ops {
namespace {

#if LLMCORE_HUGE_OUTPUTS
constexpr size_t kHugePage = size_t(2) << 20;
// glibc's DEFAULT_MMAP_THRESHOLD_MAX on 64-bit: every block this large is a fresh mmap.
constexpr size_t kFreshBytes = size_t(32) << 20;
constexpr size_t kAlignment = 64;  // c10's CPU alignment, for the blocks a resize makes smaller

// A c10 allocator (so resize_ and the profiler's CPU memory events work as for at::empty's
// tensors): blocks of kFreshBytes or more 2 MiB-aligned and advised for huge pages, smaller
// ones (only a resize asks for those) as c10 allocates them. All are released by free().
class HugePageAllocator final : public c10::Allocator {
 public:
  c10::DataPtr allocate(size_t n) override {
    const bool huge = n >= kFreshBytes;
    void* p = nullptr;
    if (n > 0 && posix_memalign(&p, huge ? kHugePage : kAlignment, n) != 0) p = nullptr;
    if (n > 0 && p == nullptr) {
      c10::profiledCPUMemoryReporter().OutOfMemory(n);
      TORCH_CHECK(false, "llmcore: out of CPU memory allocating ", n, " bytes");
    }
    // advice, not a requirement: where the kernel has THP off, the pages are 4 KiB as before
    if (huge) (void)madvise(p, n / kHugePage * kHugePage, MADV_HUGEPAGE);
    if (p != nullptr) c10::profiledCPUMemoryReporter().New(p, n);
    return {p, p, &release, c10::Device(c10::DeviceType::CPU)};
  }
  c10::DeleterFnPtr raw_deleter() const override { return &release; }
  void copy_data(void* dest, const void* src, size_t count) const override {
    default_copy_data(dest, src, count);
  }

 private:
  static void release(void* p) {
    if (p == nullptr) return;
    c10::profiledCPUMemoryReporter().Delete(p);
    std::free(p);
  }
};

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("LLMCORE_CPU_HUGEPAGES");
    return v == nullptr || std::strcmp(v, "0") != 0;
  }();
  return on;
}

bool on_huge_pages(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  if (opts.device().type() != c10::DeviceType::CPU || !enabled()) return false;
  if (opts.has_pinned_memory() && opts.pinned_memory()) return false;
  size_t n = opts.dtype().itemsize();
  for (const int64_t s : sizes) n *= size_t(s);
  return n >= kFreshBytes;
}

at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  static HugePageAllocator allocator;
  return at::detail::empty_generic(sizes, &allocator, c10::DispatchKeySet(c10::DispatchKey::CPU),
                                   c10::typeMetaToScalarType(opts.dtype()), std::nullopt);
}
#else
bool on_huge_pages(at::IntArrayRef, const at::TensorOptions&) { return false; }
at::Tensor empty_huge(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return at::empty(sizes, opts);
}
#endif  // LLMCORE_HUGE_OUTPUTS

}  // namespace

at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return on_huge_pages(sizes, opts) ? empty_huge(sizes, opts) : at::empty(sizes, opts);
}

at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& opts) {
  return on_huge_pages(sizes, opts) ? empty_huge(sizes, opts).zero_() : at::zeros(sizes, opts);
}

}  // namespace ops
}  // namespace llmcore
