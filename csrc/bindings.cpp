// hvdsgd._C: the compiled core. Buffers are checked with the GIL held; the GIL is released
// only around the loops. In-place buffers are bound without conversion (noconvert), so a
// float64 or strided array is an error rather than a silent copy that loses the update.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "sgd.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style>;

#define STRINGIFY(x) #x
#define MACRO_STRINGIFY(x) STRINGIFY(x)

namespace {

float* writable(FloatArray& a, const char* name) {
    if (!a.writeable()) throw py::value_error(std::string(name) + " is read-only");
    return a.mutable_data();
}

void check_size(const FloatArray& a, py::ssize_t n, const char* name) {
    if (a.size() != n)
        throw py::value_error(std::string(name) + " has " + std::to_string(a.size()) +
                              " elements, params has " + std::to_string(n));
}

void sgd_step(FloatArray params, FloatArray grads, float lr, py::object momentum_buf,
              float momentum, float weight_decay, bool nesterov, bool first_step) {
    float* p = writable(params, "params");
    check_size(grads, params.size(), "grads");
    float* buf = nullptr;
    FloatArray buf_arr;
    if (momentum != 0.0f) {
        if (momentum_buf.is_none())
            throw py::value_error("momentum != 0 needs a momentum_buf of params' size");
        if (!py::isinstance<FloatArray>(momentum_buf) ||
            !(py::cast<py::array>(momentum_buf).flags() & py::array::c_style))
            throw py::type_error("momentum_buf must be a C-contiguous float32 array");
        buf_arr = py::cast<FloatArray>(momentum_buf);
        check_size(buf_arr, params.size(), "momentum_buf");
        buf = writable(buf_arr, "momentum_buf");
    }
    if (nesterov && momentum == 0.0f) throw py::value_error("nesterov needs momentum > 0");
    const float* g = grads.data();
    const auto n = static_cast<std::size_t>(params.size());
    py::gil_scoped_release release;
    hvdsgd::sgd_dense(p, g, buf, n, lr, momentum, weight_decay, nesterov, first_step);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = R"pbdoc(hvdsgd's compiled core: parameter-update kernels over flat float32 buffers.)pbdoc";

    m.def("sgd_step", &sgd_step, R"pbdoc(
        In-place SGD step on flat float32 buffers, the arithmetic of torch.optim.SGD:
        weight decay, momentum (first_step starts the buffer at the gradient) and Nesterov.

        params and momentum_buf are updated in place and must be C-contiguous, writable
        float32 arrays: anything else raises instead of updating a temporary copy.
    )pbdoc",
          py::arg("params").noconvert(), py::arg("grads").noconvert(), py::arg("lr"),
          py::arg("momentum_buf") = py::none(), py::arg("momentum") = 0.0f,
          py::arg("weight_decay") = 0.0f, py::arg("nesterov") = false,
          py::arg("first_step") = false);

    m.attr("__version__") = MACRO_STRINGIFY(VERSION_INFO);
}
