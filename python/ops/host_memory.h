// Host memory for large op outputs, backed by transparent huge pages where Linux offers them.
//
// The streaming engine returns every large free to the OS (r2m_ext/engine/budget.py), so each
// output an op allocates is fresh memory that the kernel faults in, page by page, when the op
// first writes it: 4 KB pages cost one fault each (an `average` of 8 ViT-L/14 experts: 450k
// faults). Asking for huge pages on a 2 MB-aligned mapping faults them in 2 MB at a time;
// measured on that average in merge_files (2-core VM, 5 runs each, interleaved): 158k faults
// instead of 452k, median 3.18 s instead of 3.47 s. Same bytes, same layout; only the mapping
// differs, and it is unmapped when the last tensor viewing it is freed. Its storage wraps memory
// torch did not allocate, so it cannot be resized in place.
//
// Only then: without the engine's setting (an in-memory merge), glibc serves a large output from
// memory it already holds and has faulted in, which a fresh mapping of any page size cannot beat
// (one output of 8 x 3072 x 768 experts, 9.4 MB: 2.8 ms into resident memory, 11.5 ms into a
// fresh huge-page mapping; the in-memory R²M merge of 12 ViT-B/16 blocks 0.28 s faster).
#pragma once

#include <ATen/ATen.h>

#include <atomic>
#include <cstdint>

#if defined(__linux__)
#include <sys/mman.h>
#endif

namespace r2m {

// Below this, an output fits in a few pages and the default allocator serves it as well.
constexpr int64_t kHugePageOutputBytes = int64_t{4} << 20;

// Whether glibc maps every large allocation on its own, so that the default allocator's large
// outputs are fresh memory anyway: set, through r2m_ext._C.set_large_allocations_fresh, where the
// engine lowers glibc's mmap threshold. One flag for the process, as that threshold is.
inline std::atomic<bool>& large_allocations_fresh() {
  static std::atomic<bool> fresh{false};
  return fresh;
}

inline at::Tensor empty_host_output(at::IntArrayRef shape, at::ScalarType dtype) {
  const at::TensorOptions options = at::TensorOptions().dtype(dtype).device(at::kCPU);
  int64_t numel = 1;
  for (const int64_t size : shape) numel *= size;
  const int64_t nbytes = numel * static_cast<int64_t>(c10::elementSize(dtype));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  if (nbytes >= kHugePageOutputBytes && large_allocations_fresh().load()) {
    constexpr size_t huge = size_t{2} << 20;
    const size_t length = (static_cast<size_t>(nbytes) + huge - 1) / huge * huge;
    // Map one huge page more than needed, then cut the mapping down to a 2 MB-aligned range of
    // exactly `length` bytes: the deleter then needs only the pointer and that length.
    void* raw =
        mmap(nullptr, length + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw != MAP_FAILED) {
      const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
      const uintptr_t aligned = (start + huge - 1) / huge * huge;
      if (aligned > start) munmap(raw, aligned - start);
      const uintptr_t tail = start + huge - aligned;  // what lies past aligned + length
      if (tail > 0) munmap(reinterpret_cast<void*>(aligned + length), tail);
      void* data = reinterpret_cast<void*>(aligned);
      // Advice only: where THP is off, the mapping simply keeps 4 KB pages.
      madvise(data, length, MADV_HUGEPAGE);
      return at::from_blob(
          data, shape, [length](void* pointer) { munmap(pointer, length); }, options);
    }
    // Out of address space or mappings: the default allocator reports it as usual.
  }
#endif
  return at::empty(shape, options);
}

}  // namespace r2m
