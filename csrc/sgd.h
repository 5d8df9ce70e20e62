// Parameter-update kernels over flat float buffers.
// Plain functions over float* and sizes (no Python, no torch): the bindings check the
// buffers with the GIL held and call these with it released.
#pragma once
#include <cstddef>

namespace hvdsgd {

// The step's parameters, torch.optim.SGD's without dampening and Nesterov (hvdsgd uses
// neither). Named fields, so that no call passes a row of bare floats and bools.
struct SgdOptions {
    float lr = 0.0f;
    float momentum = 0.0f;      // 0: plain SGD; momentum_buf is not read or written
    float weight_decay = 0.0f;  // L2: the gradient gets weight_decay * param added
    bool first_step = false;    // momentum: the buffer starts at the gradient (torch's step 1)
};

// One SGD step with L2 weight decay and momentum, in place, the arithmetic of
// torch.optim.SGD(lr, momentum, weight_decay):
//   g = grad + weight_decay * param
//   buf = first_step ? g : momentum * buf + g      (only when momentum != 0)
//   param -= lr * (momentum != 0 ? buf : g)
// param, grad: (n,); momentum_buf: (n,), or nullptr when momentum == 0.
// Plain loads and stores: when several threads or processes run this on the same param
// at once (HOGWILD!, as fastText and word2vec do) an update can overwrite another's.
void sgd_dense(float* param, const float* grad, float* momentum_buf, std::size_t n,
               const SgdOptions& opt);

// sgd_dense with the same arithmetic, except that the write `param -= lr * d` is a
// per-element atomic add (a compare-and-swap loop on the float's 32 bits), so concurrent
// writers lose no update. The weight-decay term reads param without a lock (it may see a
// value another writer is about to change). momentum_buf is the caller's own: plain.
// param, grad: (n,); momentum_buf: (n,), or nullptr when momentum == 0.
void sgd_dense_atomic(float* param, const float* grad, float* momentum_buf, std::size_t n,
                      const SgdOptions& opt);

}  // namespace hvdsgd
