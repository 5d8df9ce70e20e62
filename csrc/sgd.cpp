#include "sgd.h"

namespace hvdsgd {

void sgd_dense(float* __restrict param, const float* __restrict grad,
               float* __restrict momentum_buf, std::size_t n, float lr, float momentum,
               float weight_decay, bool nesterov, bool first_step) {
    if (momentum == 0.0f || momentum_buf == nullptr) {
        // 12 bytes per parameter: read param and grad, write param.
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

}  // namespace hvdsgd
