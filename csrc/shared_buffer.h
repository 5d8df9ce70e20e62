// A parameter buffer in POSIX shared memory, updated in place by several worker processes
// (HOGWILD!-style asynchronous SGD, or an asynchronous parameter server), with a choice of
// how concurrent updates are made safe and a record of each update's staleness.
//
// No Python here: the bindings check buffers with the GIL held and call these with it
// released. Errors are C++ exceptions that the bindings turn into Python ones:
//   OsError (errno + message)  -> OSError of that errno (FileNotFoundError, FileExistsError...)
//   FormatError                -> ValueError (not an hvdsgd buffer, corrupted, wrong n)
//   std::invalid_argument      -> ValueError;  std::out_of_range -> IndexError
//
// Segment layout (every part starts on a 64-byte cache line):
//   Header                      magic, version, sizes; the update counter on its own line
//   Lock[1 + shards]            lock 0: the `locked` policy; lock 1 + s: shard s
//   WorkerStats[workers]        per-worker update count and staleness histogram
//   params[n]                   float32
//   slot[i][n], i < n_slots     float32, each slot 64-byte aligned (gradient mailboxes)
#pragma once
#include <pthread.h>

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "sgd.h"

namespace hvdsgd {

constexpr std::uint64_t kShmMagic = 0x4856445347445342ull;  // "HVDSGDSB"
constexpr std::uint32_t kShmLayoutVersion = 1;
constexpr std::size_t kCacheLine = 64;
constexpr std::size_t kStalenessBuckets = 256;  // staleness 0..254 exactly; the last is >= 255
constexpr std::size_t kShardAlign = 16;         // floats: a shard boundary is a cache line

// An operating-system error with its errno and a message that says what was being done.
struct OsError : std::runtime_error {
    int err;
    OsError(int err_, const std::string& what) : std::runtime_error(what), err(err_) {}
};

// The segment exists but is not an hvdsgd buffer of this layout (or not the expected one).
struct FormatError : std::invalid_argument {
    using std::invalid_argument::invalid_argument;
};

// How concurrent updates to the shared params are made safe.
enum class Policy {
    Hogwild,  // plain loads and stores, no lock: updates can overwrite each other
    Atomic,   // per-element atomic add: nothing lost, no lock
    Locked,   // one lock around the whole update (and the read-back)
    Sharded,  // params in `shards` contiguous ranges, one lock each, one held at a time
};

struct alignas(kCacheLine) ShmHeader {
    std::uint64_t magic;           // kShmMagic, stored last (release) by the creator
    std::uint32_t version;         // kShmLayoutVersion
    std::uint32_t header_bytes;    // sizeof(ShmHeader)
    std::uint64_t n;               // params: n float32
    std::uint64_t n_slots;         // gradient slots of n float32 each
    std::uint32_t workers;         // WorkerStats entries
    std::uint32_t shards;          // locks 1..shards
    std::uint64_t params_offset;   // bytes from the segment's start to params
    std::uint64_t total_bytes;     // the segment's size
    alignas(kCacheLine) std::atomic<std::uint64_t> updates;  // updates landed (see apply)
    alignas(kCacheLine) std::atomic<std::uint32_t> attached;  // attach() calls so far
    std::atomic<std::uint64_t> lock_recoveries;  // locks taken over from a dead owner
};

struct alignas(kCacheLine) ShmLock {
    pthread_mutex_t mutex;  // process-shared, robust, error-checking
};

struct alignas(kCacheLine) WorkerStats {
    std::atomic<std::uint64_t> updates;
    std::atomic<std::uint64_t> staleness_sum;
    std::atomic<std::uint64_t> staleness_max;
    alignas(kCacheLine) std::atomic<std::uint64_t> histogram[kStalenessBuckets];
};

static_assert(sizeof(ShmLock) == kCacheLine, "a lock per cache line");
static_assert(std::atomic<std::uint64_t>::is_always_lock_free,
              "atomics in shared memory must be lock-free (address-free)");
static_assert(std::atomic<std::uint32_t>::is_always_lock_free,
              "atomics in shared memory must be lock-free (address-free)");

struct StalenessStats {
    std::uint64_t updates = 0;
    double mean = 0.0;
    std::uint64_t p95 = 0;  // nearest rank; 255 means >= 255
    std::uint64_t max = 0;
};

class SharedBuffer {
public:
    // A new segment: shm_open(O_CREAT | O_EXCL, 0600), sized and reserved (posix_fallocate,
    // so a full /dev/shm is an error here rather than a SIGBUS later), params and slots 0.
    // An empty name picks "/hvdsgd-<pid>-<16 random hex digits>".
    static std::unique_ptr<SharedBuffer> create(std::size_t n, std::uint32_t workers,
                                                std::uint32_t shards, std::size_t n_slots,
                                                const std::string& name);
    // Maps an existing segment after checking its header; expected_n < 0 accepts any n.
    // Increments `attached`.
    static std::unique_ptr<SharedBuffer> attach(const std::string& name,
                                                std::int64_t expected_n);
    ~SharedBuffer();  // munmap; the segment stays until unlink()
    SharedBuffer(const SharedBuffer&) = delete;
    SharedBuffer& operator=(const SharedBuffer&) = delete;

    const std::string& name() const { return name_; }
    std::size_t size() const { return n_; }
    std::uint32_t workers() const { return workers_; }
    std::uint32_t shards() const { return shards_; }
    std::size_t n_slots() const { return n_slots_; }
    // The updates landed so far (an acquire load: their writes are visible to this thread).
    std::uint64_t updates() const { return header_->updates.load(std::memory_order_acquire); }
    std::uint32_t attached() const {
        return header_->attached.load(std::memory_order_acquire);
    }
    std::uint64_t lock_recoveries() const {
        return header_->lock_recoveries.load(std::memory_order_acquire);
    }
    float* params() const { return params_; }
    float* slot(std::size_t i) const;  // std::out_of_range past n_slots

    // Shard s covers params [begin, end): ranges of ceil(n / shards) rounded up to 16
    // floats, so trailing shards of a small buffer can be empty.
    void shard_range(std::uint32_t s, std::size_t* begin, std::size_t* end) const;

    // One dense SGD step (sgd_dense, or sgd_dense_atomic for `atomic`) on params with
    // `policy`, then counted in `updates` once it has landed.
    // grad, momentum_buf, read_into: (n,); momentum_buf may be nullptr when
    // opt.momentum == 0, read_into may be nullptr. read_version: the `updates` value the
    // worker read its weights at (read() or updates()); < 0: none, staleness 0.
    // Returns the staleness: the updates that landed after read_version and before this
    // one (clamped at 0). read_into gets the params after the update: in the same critical
    // section for `locked`, shard by shard under each shard's lock for `sharded`.
    std::uint64_t apply(std::uint32_t worker, Policy policy, const float* grad,
                        float* momentum_buf, const SgdOptions& opt,
                        std::int64_t read_version, float* read_into);

    // Copies params into out (n,), under lock 0 when `locked`; returns `updates` loaded
    // (acquire) before the copy, so the copy holds every write of that many updates: the
    // read_version to pass to apply.
    std::uint64_t read(float* out, bool locked);

    // One worker's staleness record, or all workers' together when worker < 0.
    StalenessStats stats(std::int64_t worker) const;

    // shm_unlink: the name disappears, the mapping stays valid. ENOENT is not an error.
    void unlink();

    // Testing the robust locks: takes lock `index` (0: the `locked` lock, 1 + s: shard s)
    // and never releases it. The mapping is then never unmapped: glibc links the robust
    // mutexes a thread holds into a list through the mutexes themselves, so unmapping one
    // would leave that list pointing at unmapped memory (a crash at the next lock).
    void lock_forever(std::uint32_t index);

private:
    SharedBuffer() = default;
    // Points locks_, stats_, params_... into the mapping from the header's (checked) fields.
    void bind();
    pthread_mutex_t* lock_at(std::uint32_t index) const;
    std::uint64_t land_update(std::int64_t read_version);
    void record(std::uint32_t worker, std::uint64_t staleness);

    std::string name_;
    void* base_ = nullptr;
    std::size_t bytes_ = 0;
    ShmHeader* header_ = nullptr;
    ShmLock* locks_ = nullptr;
    WorkerStats* stats_ = nullptr;
    float* params_ = nullptr;
    std::size_t slot_stride_ = 0;  // floats between slots
    std::size_t n_ = 0;
    std::size_t n_slots_ = 0;
    std::uint32_t workers_ = 0;
    std::uint32_t shards_ = 0;
    bool unlinked_ = false;
    bool holds_forever_ = false;  // lock_forever was called: never munmap
};

}  // namespace hvdsgd
