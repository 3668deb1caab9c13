// Output tensors of the native ops. On the CPU a large output lives on transparent huge pages.
//
// glibc serves every allocation of 32 MiB or more (its largest mmap threshold) with fresh pages
// from the kernel, and the first write to each 4 KiB page takes a page fault: ~1.6 us a page
// here, 14 ms for a 32 MiB tensor that a kernel then fills in 2-3 ms. Smaller blocks come back
// from glibc's heap already touched, so only the large ones are worth it. Such outputs are
// allocated 2 MiB-aligned and their whole 2 MiB pages advised MADV_HUGEPAGE (what PyTorch's
// THP_MEM_ALLOC_ENABLE=1 does for every CPU tensor of 2 MiB or more): 16 faults instead of
// 8192. The tail past the last whole 2 MiB page keeps 4 KiB pages, so no memory is added.
// LLMCORE_CPU_HUGEPAGES=0 turns this off (plain at::empty).
#pragma once

#include <ATen/core/Tensor.h>

namespace llmcore {
namespace ops {

// at::empty(sizes, opts), contiguous; on huge pages when it is a large CPU tensor.
at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

// at::zeros(sizes, opts) on the same memory as empty_output.
at::Tensor zeros_output(at::IntArrayRef sizes, const at::TensorOptions& opts);

// empty_output in t's shape and options (t's layout is not kept: the result is contiguous).
inline at::Tensor empty_output_like(const at::Tensor& t) {
  return empty_output(t.sizes(), t.options());
}

}  // namespace ops
}  // namespace llmcore
