#include "sgd.h"

// One build runs at full vector width on any x86-64 CPU: GCC and Clang emit an AVX-512, an
// AVX2 and a baseline copy of each plain kernel and pick one when the module loads (ifunc),
// so the wheel needs no -march=native to match NumPy's runtime-dispatched loops.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define HVDSGD_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define HVDSGD_CLONES
#endif

namespace hvdsgd {

namespace {

// *p += delta as one atomic read-modify-write: a compare-and-swap loop on the float's bits
// (GCC/Clang's generic __atomic builtins compare bytes, so no type punning is needed).
inline void atomic_add(float* p, float delta) {
    float old;
    __atomic_load(p, &old, __ATOMIC_RELAXED);
    float next = old + delta;
    // On failure `old` is reloaded with the value now in memory.
    while (!__atomic_compare_exchange(p, &old, &next, /*weak=*/true, __ATOMIC_RELAXED,
                                      __ATOMIC_RELAXED)) {
        next = old + delta;
    }
}

inline float atomic_read(const float* p) {
    float v;
    __atomic_load(p, &v, __ATOMIC_RELAXED);
    return v;
}

}  // namespace

// param, grad: (n,); momentum_buf: (n,) or nullptr.
HVDSGD_CLONES void sgd_dense(float* __restrict param, const float* __restrict grad,
                             float* __restrict momentum_buf, std::size_t n,
                             const SgdOptions& opt) {
    // Locals, not opt's fields: a store through param could alias them and would force a
    // reload per element (no vectorisation).
    const float lr = opt.lr, momentum = opt.momentum, weight_decay = opt.weight_decay;
    if (momentum == 0.0f || momentum_buf == nullptr) {
        // 12 bytes per parameter: read param and grad, write param.
        if (weight_decay == 0.0f) {
            for (std::size_t i = 0; i < n; ++i) param[i] -= lr * grad[i];
            return;
        }
        for (std::size_t i = 0; i < n; ++i) {
            param[i] -= lr * (grad[i] + weight_decay * param[i]);
        }
        return;
    }
    if (opt.first_step) {
        for (std::size_t i = 0; i < n; ++i) {
            const float g = grad[i] + weight_decay * param[i];
            momentum_buf[i] = g;
            param[i] -= lr * g;
        }
        return;
    }
    // 20 bytes per parameter: read param, grad, buf; write param, buf.
    for (std::size_t i = 0; i < n; ++i) {
        const float g = grad[i] + weight_decay * param[i];
        const float b = momentum * momentum_buf[i] + g;
        momentum_buf[i] = b;
        param[i] -= lr * b;
    }
}

// param, grad: (n,); momentum_buf: (n,) or nullptr.
void sgd_dense_atomic(float* param, const float* __restrict grad,
                      float* __restrict momentum_buf, std::size_t n, const SgdOptions& opt) {
    const float lr = opt.lr, momentum = opt.momentum, weight_decay = opt.weight_decay;
    const bool use_momentum = momentum != 0.0f && momentum_buf != nullptr;
    const bool first_step = opt.first_step;
    for (std::size_t i = 0; i < n; ++i) {
        const float g = grad[i] + weight_decay * atomic_read(param + i);
        float d = g;
        if (use_momentum) {
            d = first_step ? g : momentum * momentum_buf[i] + g;
            momentum_buf[i] = d;
        }
        // param -= lr * d, exactly: a - b == a + (-b) in IEEE arithmetic.
        atomic_add(param + i, -(lr * d));
    }
}

}  // namespace hvdsgd
