// Parameter-update kernels over flat float buffers.
// Plain functions over float* and sizes (no Python, no torch): the bindings check the
// buffers with the GIL held and call these with it released.
#pragma once
#include <cstddef>
#include <cstdint>

namespace hvdsgd {

// One SGD step with L2 weight decay and (optionally Nesterov) momentum, in place, the
// same arithmetic as torch.optim.SGD:
//   g = grad + weight_decay * param
//   buf = momentum * buf + g            (buf = g on the first step, when first_step is true)
//   d = nesterov ? g + momentum * buf : buf        (d = g when momentum == 0)
//   param -= lr * d
// param, grad: (n,); momentum_buf: (n,) or nullptr when momentum == 0.
// Plain loads and stores: when several threads or processes run this on the same param
// at once (HOGWILD!, as fastText and word2vec do) an update can overwrite another's.
void sgd_dense(float* param, const float* grad, float* momentum_buf, std::size_t n, float lr,
               float momentum, float weight_decay, bool nesterov, bool first_step);

// sgd_dense with the same arithmetic, except that the write `param -= lr * d` is a
// per-element atomic add (a compare-and-swap loop on the float's 32 bits), so concurrent
// writers lose no update. The weight-decay term reads param without a lock (it may see a
// value another writer is about to change). momentum_buf is the caller's own: plain.
// param, grad: (n,); momentum_buf: (n,) or nullptr when momentum == 0.
void sgd_dense_atomic(float* param, const float* grad, float* momentum_buf, std::size_t n,
                      float lr, float momentum, float weight_decay, bool nesterov,
                      bool first_step);

// Sparse SGD on the rows of a matrix (an embedding's gradient), in place:
//   for j in 0..k: param[idx[j], :] -= lr * (values[j, :] + weight_decay * param[idx[j], :])
// in order, so a row listed twice is updated twice. Indices are not checked here: every
// idx[j] must be in [0, rows).
// param: (rows, dim); idx: (k,); values: (k, dim).
void sgd_sparse(float* param, std::size_t rows, std::size_t dim, const std::int64_t* idx,
                const float* values, std::size_t k, float lr, float weight_decay);

// sgd_sparse with each element's write an atomic add, as in sgd_dense_atomic.
void sgd_sparse_atomic(float* param, std::size_t rows, std::size_t dim,
                       const std::int64_t* idx, const float* values, std::size_t k, float lr,
                       float weight_decay);

}  // namespace hvdsgd
