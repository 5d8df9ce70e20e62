// Parameter-update kernels over flat float buffers.
// Plain functions over float* and sizes (no Python, no torch): the bindings check the
// buffers with the GIL held and call these with it released.
#pragma once
#include <cstddef>

namespace hvdsgd {

// One SGD step with L2 weight decay and (optionally Nesterov) momentum, in place, the
// same arithmetic as torch.optim.SGD:
//   g = grad + weight_decay * param
//   buf = momentum * buf + g            (buf = g on the first step, when first_step is true)
//   d = nesterov ? g + momentum * buf : buf        (d = g when momentum == 0)
//   param -= lr * d
// param, grad: (n,); momentum_buf: (n,) or nullptr when momentum == 0.
void sgd_dense(float* param, const float* grad, float* momentum_buf, std::size_t n, float lr,
               float momentum, float weight_decay, bool nesterov, bool first_step);

}  // namespace hvdsgd
