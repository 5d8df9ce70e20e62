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

HVDSGD_CLONES void sgd_dense(float* __restrict param, const float* __restrict grad,
               float* __restrict momentum_buf, std::size_t n, float lr, float momentum,
               float weight_decay, bool nesterov, bool first_step) {
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
    if (first_step) {
        for (std::size_t i = 0; i < n; ++i) {
            const float g = grad[i] + weight_decay * param[i];
            momentum_buf[i] = g;
            param[i] -= lr * (nesterov ? g + momentum * g : g);
        }
        return;
    }
    // 20 bytes per parameter: read param, grad, buf; write param, buf.
    for (std::size_t i = 0; i < n; ++i) {
        const float g = grad[i] + weight_decay * param[i];
        const float b = momentum * momentum_buf[i] + g;
        momentum_buf[i] = b;
        param[i] -= lr * (nesterov ? g + momentum * b : b);
    }
}

void sgd_dense_atomic(float* param, const float* __restrict grad,
                      float* __restrict momentum_buf, std::size_t n, float lr, float momentum,
                      float weight_decay, bool nesterov, bool first_step) {
    const bool use_momentum = momentum != 0.0f && momentum_buf != nullptr;
    for (std::size_t i = 0; i < n; ++i) {
        const float g = grad[i] + weight_decay * atomic_read(param + i);
        float d = g;
        if (use_momentum) {
            const float b = first_step ? g : momentum * momentum_buf[i] + g;
            momentum_buf[i] = b;
            d = nesterov ? g + momentum * b : b;
        }
        // param -= lr * d, exactly: a - b == a + (-b) in IEEE arithmetic.
        atomic_add(param + i, -(lr * d));
    }
}

HVDSGD_CLONES void sgd_sparse(float* param, std::size_t rows, std::size_t dim, const std::int64_t* idx,
                const float* __restrict values, std::size_t k, float lr, float weight_decay) {
    (void)rows;  // the caller checked every idx[j] < rows
    for (std::size_t j = 0; j < k; ++j) {
        float* __restrict row = param + static_cast<std::size_t>(idx[j]) * dim;
        const float* __restrict v = values + j * dim;
        for (std::size_t c = 0; c < dim; ++c) {
            row[c] -= lr * (v[c] + weight_decay * row[c]);
        }
    }
}

void sgd_sparse_atomic(float* param, std::size_t rows, std::size_t dim,
                       const std::int64_t* idx, const float* __restrict values, std::size_t k,
                       float lr, float weight_decay) {
    (void)rows;
    for (std::size_t j = 0; j < k; ++j) {
        float* row = param + static_cast<std::size_t>(idx[j]) * dim;
        const float* v = values + j * dim;
        for (std::size_t c = 0; c < dim; ++c) {
            const float g = v[c] + weight_decay * atomic_read(row + c);
            atomic_add(row + c, -(lr * g));
        }
    }
}

}  // namespace hvdsgd
