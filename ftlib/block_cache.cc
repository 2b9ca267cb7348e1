// Keeps big freed blocks mapped for the next allocation of about their size: an
// LD_PRELOAD library that ftlib's CLIs restart with (ftlib/malloc_env.py).
//
// Why: XLA:CPU allocates a step's temporaries as one block (llama-small LoRA: 717 MB)
// at every execution and frees it at the end. glibc serves a block that big with a
// fresh mmap and unmaps it on free, so the kernel zero-fills every page of it again on
// first touch, every step: 0.3-0.45 s of system CPU time a step there
// (benchmarks/README.md). glibc's own settings cannot keep it: its thread arenas mmap
// any block over 64 MB whatever the threshold, and with one arena the freed block is
// split by small allocations and the heap grows by a block every few steps.
//
// What: malloc, posix_memalign, aligned_alloc and memalign of at least kMinBytes take
// a block of this cache: a cached one at most 1/4 larger than the request, else a new
// mmap (huge pages advised), after unmapping the cached blocks not in use, so cached
// memory never sits beside a new block. free keeps the block mapped for reuse and
// unmaps the one kept before it, if unused: one unused block at most (a run over
// batches of several shapes would keep one per shape); it unmaps the freed block
// itself when a block handed out after it is in use. realloc, reallocarray and
// malloc_usable_size know the blocks. Everything else, and every allocation when the
// table is full, is glibc's. Reused memory is not zeroed (malloc never promises it;
// calloc stays glibc's). A request whose block is still in use waits up to kWaitNs
// for it: XLA frees a step's block just after the step's results are ready, so the
// next step's request often comes first, and without the wait it would map a second
// block and keep both.

#include <dlfcn.h>
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>

#include <atomic>
#include <cstddef>
#include <cstdint>

extern "C" {
void* __libc_malloc(size_t);
void __libc_free(void*);
void* __libc_realloc(void*, size_t);
void* __libc_memalign(size_t, size_t);
}

namespace {

constexpr size_t kMinBytes = size_t{32} << 20;  // glibc maps every block this big itself
constexpr size_t kHugePage = size_t{2} << 20;
constexpr int kSlots = 16;
constexpr long kWaitNs = 2'000'000;

struct Block {
  char* base = nullptr;  // nullptr: a free slot
  size_t size = 0;
  bool in_use = false;
  uint64_t taken = 0;  // when it was last handed out, in `takes`
};

Block blocks[kSlots];
uint64_t takes = 0;  // blocks handed out so far
pthread_mutex_t lock = PTHREAD_MUTEX_INITIALIZER;
pthread_cond_t freed = PTHREAD_COND_INITIALIZER;
// Every block lies in [lowest, highest): free() of anything outside skips the lock.
std::atomic<uintptr_t> lowest{UINTPTR_MAX}, highest{0};

// fork() copies the table in a consistent state: the lock is held across it.
__attribute__((constructor)) void LockAcrossFork() {
  auto hold = [] { pthread_mutex_lock(&lock); };
  auto release = [] { pthread_mutex_unlock(&lock); };
  pthread_atfork(hold, release, release);
}

size_t RoundUp(size_t n, size_t to) { return (n + to - 1) / to * to; }

// A new mapping of `size` bytes (a multiple of kHugePage) aligned to kHugePage.
char* MapAligned(size_t size) {
  void* raw = mmap(nullptr, size + kHugePage, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const uintptr_t start = reinterpret_cast<uintptr_t>(raw);
  const uintptr_t aligned = RoundUp(start, kHugePage);
  if (aligned > start) munmap(raw, aligned - start);
  const uintptr_t tail = aligned + size, end = start + size + kHugePage;
  if (end > tail) munmap(reinterpret_cast<void*>(tail), end - tail);
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);
  return reinterpret_cast<char*>(aligned);
}

// The slot holding block p (the caller holds the lock), or nullptr.
Block* Find(const void* p) {
  for (Block& b : blocks)
    if (b.base == p) return &b;
  return nullptr;
}

// The slot of block p, or nullptr when p is not one (most calls: no lock).
Block* Lookup(const void* p) {
  const uintptr_t u = reinterpret_cast<uintptr_t>(p);
  if (u < lowest.load(std::memory_order_acquire) || u >= highest.load(std::memory_order_acquire))
    return nullptr;
  pthread_mutex_lock(&lock);
  Block* b = Find(p);
  pthread_mutex_unlock(&lock);
  return b;
}

bool Fits(const Block& b, size_t want) {
  return b.base && b.size >= want && b.size - want <= want / 4;
}

// The smallest unused block that fits (the caller holds the lock), or nullptr.
Block* BestFit(size_t want) {
  Block* best = nullptr;
  for (Block& b : blocks)
    if (!b.in_use && Fits(b, want) && (!best || b.size < best->size)) best = &b;
  return best;
}

bool FitsInUse(size_t want) {
  for (const Block& b : blocks)
    if (b.in_use && Fits(b, want)) return true;
  return false;
}

// Whether a block handed out after b is still in use (the caller holds the lock): the
// next step took its memory while b's step still ran, a block of another size. Kept,
// b would stay resident beside it until a step of b's size comes, memory that glibc
// gives back: `python train.py`, whose steps come in several shapes, peaked 12-16%
// higher than without the cache that way (benchmarks/README.md).
bool SucceededInUse(const Block& b) {
  for (const Block& other : blocks)
    if (other.in_use && other.taken > b.taken) return true;
  return false;
}

// Unmaps block b and frees its slot (the caller holds the lock).
void Unmap(Block& b) {
  munmap(b.base, b.size);
  b = Block();
}

// Unmaps every block not in use but `keep` (the caller holds the lock).
void UnmapUnused(const Block* keep) {
  for (Block& b : blocks)
    if (b.base && !b.in_use && &b != keep) Unmap(b);
}

// A block of at least `size` bytes, or nullptr to leave the request to glibc.
void* Take(size_t size) {
  const size_t want = RoundUp(size, kHugePage);
  pthread_mutex_lock(&lock);
  Block* best = BestFit(want);
  if (!best && FitsInUse(want)) {
    timespec deadline;
    clock_gettime(CLOCK_REALTIME, &deadline);
    deadline.tv_nsec += kWaitNs;
    if (deadline.tv_nsec >= 1'000'000'000) {
      deadline.tv_sec += 1;
      deadline.tv_nsec -= 1'000'000'000;
    }
    while (!(best = BestFit(want)) && FitsInUse(want))
      if (pthread_cond_timedwait(&freed, &lock, &deadline)) break;
    if (!best) best = BestFit(want);
  }
  if (!best) {
    UnmapUnused(nullptr);
    for (Block& b : blocks)
      if (!best && !b.base) best = &b;
    char* base = best ? MapAligned(want) : nullptr;
    if (!base) {
      pthread_mutex_unlock(&lock);
      return nullptr;
    }
    *best = Block{base, want, false};
    const uintptr_t lo = reinterpret_cast<uintptr_t>(base);
    if (lo < lowest.load()) lowest.store(lo, std::memory_order_release);
    if (lo + want > highest.load()) highest.store(lo + want, std::memory_order_release);
  }
  best->in_use = true;
  best->taken = ++takes;
  void* p = best->base;
  pthread_mutex_unlock(&lock);
  return p;
}

void* AlignedOrNull(size_t alignment, size_t size) {
  if (size >= kMinBytes && alignment <= kHugePage)
    if (void* p = Take(size)) return p;
  return __libc_memalign(alignment, size);
}

}  // namespace

extern "C" {

void* malloc(size_t size) {
  if (size >= kMinBytes)
    if (void* p = Take(size)) return p;
  return __libc_malloc(size);
}

void free(void* p) {
  if (Block* b = Lookup(p)) {
    pthread_mutex_lock(&lock);
    if (SucceededInUse(*b)) {
      Unmap(*b);
    } else {
      UnmapUnused(b);  // one unused block at most: the latest freed
      b->in_use = false;
    }
    pthread_cond_broadcast(&freed);
    pthread_mutex_unlock(&lock);
    return;
  }
  __libc_free(p);
}

void* realloc(void* p, size_t size) {
  Block* b = p ? Lookup(p) : nullptr;
  if (!b) return size >= kMinBytes && !p ? malloc(size) : __libc_realloc(p, size);
  if (size <= b->size) return p;
  void* q = malloc(size);
  if (!q) return nullptr;
  memcpy(q, p, b->size);
  free(p);
  return q;
}

void* reallocarray(void* p, size_t n, size_t size) {
  size_t bytes;
  if (__builtin_mul_overflow(n, size, &bytes)) {
    errno = ENOMEM;
    return nullptr;
  }
  return realloc(p, bytes);
}

int posix_memalign(void** out, size_t alignment, size_t size) {
  if (alignment % sizeof(void*) || (alignment & (alignment - 1))) return EINVAL;
  void* p = AlignedOrNull(alignment, size);
  if (!p && size) return ENOMEM;
  *out = p;
  return 0;
}

void* aligned_alloc(size_t alignment, size_t size) { return AlignedOrNull(alignment, size); }

void* memalign(size_t alignment, size_t size) { return AlignedOrNull(alignment, size); }

size_t malloc_usable_size(void* p) {
  if (Block* b = Lookup(p)) return b->size;
  static auto real = reinterpret_cast<size_t (*)(void*)>(dlsym(RTLD_NEXT, "malloc_usable_size"));
  return real ? real(p) : 0;
}

}  // extern "C"
