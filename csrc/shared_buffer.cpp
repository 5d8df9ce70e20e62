#include "shared_buffer.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cinttypes>
#include <cstdio>
#include <cstring>
#include <new>
#include <random>
#include <vector>

#include "sgd.h"

namespace hvdsgd {

namespace {

constexpr std::size_t round_up(std::size_t x, std::size_t to) { return (x + to - 1) / to * to; }

// Byte offsets of each part of a segment (see shared_buffer.h).
struct Layout {
    std::size_t locks = 0;
    std::size_t stats = 0;
    std::size_t params = 0;
    std::size_t slot_stride = 0;  // bytes
    std::size_t total = 0;
};

// The layout for these sizes; false with *why set when they are invalid or overflow.
bool compute_layout(std::uint64_t n, std::uint64_t n_slots, std::uint64_t workers,
                    std::uint64_t shards, Layout* out, std::string* why) {
    if (n == 0) return *why = "n = 0", false;
    if (workers == 0) return *why = "workers = 0", false;
    if (shards == 0 || shards > n) return *why = "shards = " + std::to_string(shards) +
                                                 " (needs 1 <= shards <= n = " +
                                                 std::to_string(n) + ")",
                                          false;
    // Bounds well inside size_t and off_t, so the arithmetic below cannot overflow.
    constexpr std::uint64_t kMaxBytes = std::uint64_t{1} << 50;
    if (n > kMaxBytes / 4 || workers > (1u << 20) || shards > (1u << 24) ||
        n_slots > (1u << 20)) {
        return *why = "sizes out of range (n = " + std::to_string(n) + ", slots = " +
                      std::to_string(n_slots) + ", workers = " + std::to_string(workers) +
                      ", shards = " + std::to_string(shards) + ")",
               false;
    }
    Layout l;
    l.locks = sizeof(ShmHeader);
    l.stats = l.locks + (shards + 1) * sizeof(ShmLock);
    l.params = round_up(l.stats + workers * sizeof(WorkerStats), kCacheLine);
    l.slot_stride = round_up(n * sizeof(float), kCacheLine);
    const unsigned __int128 total =
        static_cast<unsigned __int128>(l.params) + (n_slots + 1) * (unsigned __int128)l.slot_stride;
    if (total > kMaxBytes) return *why = "segment larger than 2^50 bytes", false;
    l.total = static_cast<std::size_t>(total);
    *out = l;
    return true;
}

std::string errno_text(int err) { return std::strerror(err); }

// "/name": POSIX shared-memory names are one path component after the leading slash.
std::string normalize_name(const std::string& name) {
    std::string n = (!name.empty() && name[0] == '/') ? name : "/" + name;
    if (n.size() < 2 || n.size() > 255 || n.find('/', 1) != std::string::npos ||
        n.find('\0') != std::string::npos)
        throw std::invalid_argument("invalid shared-memory name '" + name +
                                    "': one component of 1..254 characters, no '/' "
                                    "except a leading one");
    return n;
}

std::string random_hex16() {
    std::uint64_t r = 0;
    if (getrandom(&r, sizeof r, 0) != static_cast<ssize_t>(sizeof r)) {
        std::random_device rd;
        r = (static_cast<std::uint64_t>(rd()) << 32) ^ rd();
    }
    char hex[17];
    std::snprintf(hex, sizeof hex, "%016" PRIx64, r);
    return hex;
}

void lock_robust(pthread_mutex_t* m, ShmHeader* h) {
    const int rc = pthread_mutex_lock(m);
    if (rc == 0) return;
    if (rc == EOWNERDEAD) {
        // The holder died (SIGKILL, crash) inside its critical section: its update may be
        // half applied, which SGD tolerates. Take the lock over instead of deadlocking.
        pthread_mutex_consistent(m);
        h->lock_recoveries.fetch_add(1, std::memory_order_relaxed);
        return;
    }
    if (rc == EDEADLK) throw OsError(rc, "this thread already holds the shared buffer's lock");
    throw OsError(rc, "locking the shared buffer failed: " + errno_text(rc));
}

class Guard {
public:
    Guard(pthread_mutex_t* m, ShmHeader* h) : m_(m) { lock_robust(m, h); }
    ~Guard() { pthread_mutex_unlock(m_); }
    Guard(const Guard&) = delete;
    Guard& operator=(const Guard&) = delete;

private:
    pthread_mutex_t* m_;
};

inline void copy_floats(float* dst, const float* src, std::size_t count) {
    if (dst != src && count) std::memcpy(dst, src, count * sizeof(float));
}

}  // namespace

std::unique_ptr<SharedBuffer> SharedBuffer::create(std::size_t n, std::uint32_t workers,
                                                   std::uint32_t shards, std::size_t n_slots,
                                                   const std::string& name) {
    Layout l;
    std::string why;
    if (!compute_layout(n, n_slots, workers, shards, &l, &why))
        throw std::invalid_argument("invalid shared buffer: " + why);

    std::string nm;
    int fd = -1;
    if (name.empty()) {
        // O_EXCL: never open a segment someone else made; retry on the (2^-64) collision.
        for (int attempt = 0; attempt < 8 && fd < 0; ++attempt) {
            nm = "/hvdsgd-" + std::to_string(getpid()) + "-" + random_hex16();
            fd = shm_open(nm.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
            if (fd < 0 && errno != EEXIST) break;
        }
    } else {
        nm = normalize_name(name);
        fd = shm_open(nm.c_str(), O_RDWR | O_CREAT | O_EXCL, 0600);
    }
    if (fd < 0) {
        const int err = errno;
        if (err == EEXIST)
            throw OsError(err, "a shared-memory segment named " + nm + " already exists");
        throw OsError(err, "shm_open(" + nm + ") failed: " + errno_text(err));
    }

    void* base = MAP_FAILED;
    try {
        if (ftruncate(fd, static_cast<off_t>(l.total)) != 0) {
            const int err = errno;
            throw OsError(err, "sizing " + nm + " to " + std::to_string(l.total) +
                                   " bytes failed: " + errno_text(err));
        }
        // Reserve the pages now: a full /dev/shm (a container's is often 64 MB) is an
        // error here instead of a SIGBUS at the first touch of an unbacked page.
        const int rc = posix_fallocate(fd, 0, static_cast<off_t>(l.total));
        if (rc != 0 && rc != EOPNOTSUPP && rc != EINVAL)
            throw OsError(rc, "reserving " + std::to_string(l.total) + " bytes for " + nm +
                                  " in /dev/shm failed: " + errno_text(rc) +
                                  (rc == ENOSPC ? " (a container needs a larger --shm-size)"
                                                : ""));
        base = mmap(nullptr, l.total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (base == MAP_FAILED) {
            const int err = errno;
            throw OsError(err, "mmap of " + nm + " failed: " + errno_text(err));
        }
        close(fd);  // the mapping keeps the segment; no descriptor needed from here
        fd = -1;

        std::unique_ptr<SharedBuffer> b(new SharedBuffer());
        b->name_ = nm;
        b->base_ = base;
        b->bytes_ = l.total;
        base = MAP_FAILED;  // owned by b now

        // The pages are zero (fresh segment): construct the shared objects in place.
        auto* h = new (b->base_) ShmHeader();
        char* bytes = static_cast<char*>(b->base_);
        for (std::uint32_t i = 0; i <= shards; ++i) new (bytes + l.locks + i * sizeof(ShmLock)) ShmLock();
        for (std::uint32_t w = 0; w < workers; ++w)
            new (bytes + l.stats + w * sizeof(WorkerStats)) WorkerStats();
        h->version = kShmLayoutVersion;
        h->header_bytes = sizeof(ShmHeader);
        h->n = n;
        h->n_slots = n_slots;
        h->workers = workers;
        h->shards = shards;
        h->params_offset = l.params;
        h->total_bytes = l.total;
        b->header_ = h;
        b->bind();

        pthread_mutexattr_t attr;
        pthread_mutexattr_init(&attr);
        int arc = pthread_mutexattr_setpshared(&attr, PTHREAD_PROCESS_SHARED);
        if (arc == 0) arc = pthread_mutexattr_setrobust(&attr, PTHREAD_MUTEX_ROBUST);
        // Error-checking: relocking from the holding thread is EDEADLK, not a hang.
        if (arc == 0) arc = pthread_mutexattr_settype(&attr, PTHREAD_MUTEX_ERRORCHECK);
        for (std::uint32_t i = 0; arc == 0 && i <= shards; ++i)
            arc = pthread_mutex_init(&b->locks_[i].mutex, &attr);
        pthread_mutexattr_destroy(&attr);
        if (arc != 0)
            throw OsError(arc, "initialising the process-shared locks failed: " +
                                   errno_text(arc));

        // Last: an attach that sees the magic sees a complete header.
        __atomic_store_n(&h->magic, kShmMagic, __ATOMIC_RELEASE);
        return b;
    } catch (...) {
        if (base != MAP_FAILED) munmap(base, l.total);
        if (fd >= 0) close(fd);
        shm_unlink(nm.c_str());
        throw;
    }
}

std::unique_ptr<SharedBuffer> SharedBuffer::attach(const std::string& name,
                                                   std::int64_t expected_n) {
    const std::string nm = normalize_name(name);
    const int fd = shm_open(nm.c_str(), O_RDWR, 0);
    if (fd < 0) {
        const int err = errno;
        if (err == ENOENT)
            throw OsError(err, "no hvdsgd shared buffer named " + nm +
                                   ": the run that created it has ended or the name is wrong");
        if (err == EACCES)
            throw OsError(err, "no permission to open the shared buffer " + nm +
                                   " (mode 0600: another user's run?)");
        throw OsError(err, "shm_open(" + nm + ") failed: " + errno_text(err));
    }
    struct stat st;
    if (fstat(fd, &st) != 0) {
        const int err = errno;
        close(fd);
        throw OsError(err, "fstat of " + nm + " failed: " + errno_text(err));
    }
    const auto size = static_cast<std::size_t>(st.st_size);
    if (st.st_size < static_cast<off_t>(sizeof(ShmHeader))) {
        close(fd);
        throw FormatError(nm + " is not an hvdsgd shared buffer: " + std::to_string(size) +
                          " bytes, smaller than the " + std::to_string(sizeof(ShmHeader)) +
                          "-byte header");
    }
    void* base = mmap(nullptr, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    const int map_err = errno;
    close(fd);
    if (base == MAP_FAILED)
        throw OsError(map_err, "mmap of " + nm + " failed: " + errno_text(map_err));

    std::unique_ptr<SharedBuffer> b(new SharedBuffer());  // munmaps on every throw below
    b->name_ = nm;
    b->base_ = base;
    b->bytes_ = size;
    auto* h = static_cast<ShmHeader*>(base);
    const std::uint64_t magic = __atomic_load_n(&h->magic, __ATOMIC_ACQUIRE);
    if (magic != kShmMagic) {
        char hex[19];
        std::snprintf(hex, sizeof hex, "0x%016" PRIx64, magic);
        throw FormatError(nm + " is not an hvdsgd shared buffer (bad magic " + hex + ")");
    }
    if (h->version != kShmLayoutVersion)
        throw FormatError(nm + " has layout version " + std::to_string(h->version) +
                          "; this build of hvdsgd reads version " +
                          std::to_string(kShmLayoutVersion));
    if (h->header_bytes != sizeof(ShmHeader))
        throw FormatError(nm + " has a corrupted header: header_bytes = " +
                          std::to_string(h->header_bytes) + ", expected " +
                          std::to_string(sizeof(ShmHeader)));
    Layout l;
    std::string why;
    if (!compute_layout(h->n, h->n_slots, h->workers, h->shards, &l, &why))
        throw FormatError(nm + " has a corrupted header: " + why);
    if (h->params_offset != l.params || h->total_bytes != l.total || size != l.total)
        throw FormatError(nm + " is corrupted or truncated: the segment is " +
                          std::to_string(size) + " bytes, its header (n = " +
                          std::to_string(h->n) + ", slots = " + std::to_string(h->n_slots) +
                          ", workers = " + std::to_string(h->workers) + ", shards = " +
                          std::to_string(h->shards) + ") needs " + std::to_string(l.total));
    if (expected_n >= 0 && h->n != static_cast<std::uint64_t>(expected_n))
        throw FormatError(nm + " holds " + std::to_string(h->n) + " params, expected " +
                          std::to_string(expected_n));
    b->header_ = h;
    b->bind();
    h->attached.fetch_add(1, std::memory_order_acq_rel);
    return b;
}

SharedBuffer::~SharedBuffer() {
    if (base_ && !holds_forever_) munmap(base_, bytes_);
}

void SharedBuffer::bind() {
    Layout l;
    std::string why;
    compute_layout(header_->n, header_->n_slots, header_->workers, header_->shards, &l, &why);
    char* bytes = static_cast<char*>(base_);
    locks_ = reinterpret_cast<ShmLock*>(bytes + l.locks);
    stats_ = reinterpret_cast<WorkerStats*>(bytes + l.stats);
    params_ = reinterpret_cast<float*>(bytes + l.params);
    slot_stride_ = l.slot_stride / sizeof(float);
    n_ = header_->n;
    n_slots_ = header_->n_slots;
    workers_ = header_->workers;
    shards_ = header_->shards;
}

float* SharedBuffer::slot(std::size_t i) const {
    if (i >= n_slots_)
        throw std::out_of_range("slot " + std::to_string(i) + " out of range: the buffer has " +
                                std::to_string(n_slots_) + " slots");
    return params_ + (i + 1) * slot_stride_;
}

void SharedBuffer::shard_range(std::uint32_t s, std::size_t* begin, std::size_t* end) const {
    const std::size_t chunk = round_up((n_ + shards_ - 1) / shards_, kShardAlign);
    *begin = std::min(n_, static_cast<std::size_t>(s) * chunk);
    *end = std::min(n_, *begin + chunk);
}

pthread_mutex_t* SharedBuffer::lock_at(std::uint32_t index) const {
    return &locks_[index].mutex;
}

// Counts an update that has landed and returns its staleness: exact, not approximate.
// `updates` counts updates whose writes are complete. This increment follows the update's
// last store and is a release; updates() and read() load the counter with acquire (read()
// copies after it), so whoever gets version v sees every write of the first v updates
// (every increment is an RMW, so the release sequences chain), and maybe parts of updates
// in flight. Staleness = the updates that landed between the worker's read at read_version
// and this one: those its gradient did not see. Counting at the start instead (hvdsgd
// before) gave readers v while the v-th update was still being written. No acquire is
// needed here: the value only feeds the count. A holder killed mid-update is never counted.
std::uint64_t SharedBuffer::land_update(std::int64_t read_version) {
    const std::uint64_t v = header_->updates.fetch_add(1, std::memory_order_release);
    if (read_version < 0) return 0;
    const auto r = static_cast<std::uint64_t>(read_version);
    return v > r ? v - r : 0;
}

void SharedBuffer::record(std::uint32_t worker, std::uint64_t staleness) {
    // Each worker writes its own stats (own cache lines); atomics keep the counts exact
    // even if two processes were given the same worker index.
    WorkerStats& s = stats_[worker];
    constexpr auto relaxed = std::memory_order_relaxed;
    s.updates.fetch_add(1, relaxed);
    s.staleness_sum.fetch_add(staleness, relaxed);
    std::uint64_t m = s.staleness_max.load(relaxed);
    while (staleness > m && !s.staleness_max.compare_exchange_weak(m, staleness, relaxed)) {
    }
    s.histogram[std::min<std::uint64_t>(staleness, kStalenessBuckets - 1)].fetch_add(1, relaxed);
}

std::uint64_t SharedBuffer::apply(std::uint32_t worker, Policy policy, const float* grad,
                                  float* momentum_buf, const SgdOptions& opt,
                                  std::int64_t read_version, float* read_into) {
    if (worker >= workers_)
        throw std::out_of_range("worker " + std::to_string(worker) + " out of range: the buffer has " +
                                std::to_string(workers_) + " workers");
    std::uint64_t staleness = 0;
    switch (policy) {
        case Policy::Hogwild:
        case Policy::Atomic:
            (policy == Policy::Atomic ? sgd_dense_atomic : sgd_dense)(params_, grad,
                                                                      momentum_buf, n_, opt);
            staleness = land_update(read_version);
            if (read_into) copy_floats(read_into, params_, n_);
            break;
        case Policy::Locked: {
            // One critical section: apply, count, read back (a parameter server's reply).
            Guard g(lock_at(0), header_);
            sgd_dense(params_, grad, momentum_buf, n_, opt);
            staleness = land_update(read_version);
            if (read_into) copy_floats(read_into, params_, n_);
            break;
        }
        case Policy::Sharded:
            // Start at a different shard per worker so workers spread over the locks; one
            // lock held at a time, so no lock-order deadlock is possible.
            for (std::uint32_t t = 0; t < shards_; ++t) {
                const std::uint32_t s = (worker + t) % shards_;
                std::size_t b, e;
                shard_range(s, &b, &e);
                if (b == e) continue;
                Guard g(lock_at(1 + s), header_);
                sgd_dense(params_ + b, grad + b, momentum_buf ? momentum_buf + b : nullptr,
                          e - b, opt);
                if (read_into) copy_floats(read_into + b, params_ + b, e - b);
            }
            staleness = land_update(read_version);  // every shard written
            break;
    }
    record(worker, staleness);
    return staleness;
}

std::uint64_t SharedBuffer::read(float* out, bool locked) {
    if (locked) {
        Guard g(lock_at(0), header_);
        const std::uint64_t v = header_->updates.load(std::memory_order_acquire);
        copy_floats(out, params_, n_);
        return v;
    }
    const std::uint64_t v = header_->updates.load(std::memory_order_acquire);
    copy_floats(out, params_, n_);
    return v;
}

StalenessStats SharedBuffer::stats(std::int64_t worker) const {
    if (worker >= static_cast<std::int64_t>(workers_))
        throw std::out_of_range("worker " + std::to_string(worker) + " out of range: the buffer has " +
                                std::to_string(workers_) + " workers");
    const std::uint32_t lo = worker < 0 ? 0 : static_cast<std::uint32_t>(worker);
    const std::uint32_t hi = worker < 0 ? workers_ : lo + 1;
    constexpr auto relaxed = std::memory_order_relaxed;
    StalenessStats out;
    std::uint64_t sum = 0;
    std::vector<std::uint64_t> hist(kStalenessBuckets, 0);
    for (std::uint32_t w = lo; w < hi; ++w) {
        const WorkerStats& s = stats_[w];
        out.updates += s.updates.load(relaxed);
        sum += s.staleness_sum.load(relaxed);
        out.max = std::max(out.max, s.staleness_max.load(relaxed));
        for (std::size_t i = 0; i < kStalenessBuckets; ++i) hist[i] += s.histogram[i].load(relaxed);
    }
    std::uint64_t count = 0;
    for (const auto c : hist) count += c;
    if (count == 0) return out;
    out.mean = static_cast<double>(sum) / static_cast<double>(out.updates ? out.updates : count);
    // Nearest rank: the smallest staleness with at least ceil(0.95 * count) at or below it.
    const std::uint64_t rank = (95 * count + 99) / 100;
    std::uint64_t cum = 0;
    for (std::size_t i = 0; i < kStalenessBuckets; ++i) {
        cum += hist[i];
        if (cum >= rank) {
            out.p95 = i;
            break;
        }
    }
    return out;
}

void SharedBuffer::unlink() {
    if (unlinked_) return;  // never remove a later segment that reused the name
    if (shm_unlink(name_.c_str()) != 0 && errno != ENOENT) {
        const int err = errno;
        throw OsError(err, "shm_unlink(" + name_ + ") failed: " + errno_text(err));
    }
    unlinked_ = true;
}

void SharedBuffer::lock_forever(std::uint32_t index) {
    if (index > shards_)
        throw std::out_of_range("lock " + std::to_string(index) + " out of range: the buffer has " +
                                std::to_string(shards_ + 1) + " locks");
    holds_forever_ = true;
    lock_robust(lock_at(index), header_);
}

}  // namespace hvdsgd
