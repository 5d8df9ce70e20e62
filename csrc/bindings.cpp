// hvdsgd._C: the compiled core. Buffers are checked with the GIL held; the GIL is released
// only around the loops (and lock waits). In-place buffers are bound without conversion
// (noconvert), so a float64 or strided array is an error rather than a silent copy that
// loses the update.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <memory>
#include <stdexcept>
#include <string>

#include "sgd.h"
#include "shared_buffer.h"

namespace py = pybind11;
using FloatArray = py::array_t<float, py::array::c_style>;
using hvdsgd::Policy;
using hvdsgd::SgdOptions;
using hvdsgd::SharedBuffer;

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

// An optional in-place float32 buffer of n elements: nullptr for None. `keep` holds the
// array (and so the memory) for the caller.
float* optional_buffer(const py::object& obj, FloatArray& keep, py::ssize_t n,
                       const char* name) {
    if (obj.is_none()) return nullptr;
    // isinstance<FloatArray> checks the dtype and C-contiguity without converting.
    if (!py::isinstance<FloatArray>(obj))
        throw py::type_error(std::string(name) + " must be a C-contiguous float32 array");
    keep = py::reinterpret_borrow<FloatArray>(obj);
    check_size(keep, n, name);
    return writable(keep, name);
}

// The step's options from the keyword arguments, each by name.
SgdOptions sgd_options(float lr, float momentum, float weight_decay, bool first_step) {
    SgdOptions opt;
    opt.lr = lr;
    opt.momentum = momentum;
    opt.weight_decay = weight_decay;
    opt.first_step = first_step;
    return opt;
}

// The momentum buffer for a dense step: required when momentum != 0, ignored otherwise.
float* momentum_buffer(const py::object& momentum_buf, FloatArray& keep, py::ssize_t n,
                       float momentum) {
    if (momentum == 0.0f) return nullptr;
    if (momentum_buf.is_none())
        throw py::value_error("momentum != 0 needs a momentum_buf of params' size");
    return optional_buffer(momentum_buf, keep, n, "momentum_buf");
}

bool overlaps(const void* a, std::size_t a_bytes, const void* b, std::size_t b_bytes) {
    const auto pa = reinterpret_cast<std::uintptr_t>(a);
    const auto pb = reinterpret_cast<std::uintptr_t>(b);
    return a && b && pa < pb + b_bytes && pb < pa + a_bytes;
}

void check_disjoint(const SharedBuffer& b, const void* p, std::size_t count, const char* name) {
    if (overlaps(p, count * sizeof(float), b.params(), b.size() * sizeof(float)))
        throw py::value_error(std::string(name) + " overlaps the shared params");
}

Policy parse_policy(const std::string& s) {
    if (s == "hogwild") return Policy::Hogwild;
    if (s == "atomic") return Policy::Atomic;
    if (s == "locked") return Policy::Locked;
    if (s == "sharded") return Policy::Sharded;
    throw py::value_error("unknown policy '" + s +
                          "': expected one of 'hogwild', 'atomic', 'locked', 'sharded'");
}

std::uint32_t checked_worker(const SharedBuffer& b, std::int64_t worker) {
    if (worker < 0 || worker >= static_cast<std::int64_t>(b.workers()))
        throw py::index_error("worker " + std::to_string(worker) + " out of range: the buffer has " +
                              std::to_string(b.workers()) + " workers");
    return static_cast<std::uint32_t>(worker);
}

std::int64_t checked_read_version(std::int64_t v) {
    if (v < -1) throw py::value_error("read_version must be >= 0, or -1 for none");
    return v;
}

void sgd_step(FloatArray params, FloatArray grads, float lr, py::object momentum_buf,
              float momentum, float weight_decay, bool first_step) {
    float* p = writable(params, "params");
    check_size(grads, params.size(), "grads");
    FloatArray buf_arr;
    float* buf = momentum_buffer(momentum_buf, buf_arr, params.size(), momentum);
    const float* g = grads.data();
    const auto n = static_cast<std::size_t>(params.size());
    const SgdOptions opt = sgd_options(lr, momentum, weight_decay, first_step);
    py::gil_scoped_release release;
    hvdsgd::sgd_dense(p, g, buf, n, opt);
}

std::unique_ptr<SharedBuffer> create(std::int64_t n, std::int64_t workers, std::int64_t shards,
                                     std::int64_t slots, py::object name) {
    if (n <= 0) throw py::value_error("n must be > 0, got " + std::to_string(n));
    if (workers < 1) throw py::value_error("workers must be >= 1, got " + std::to_string(workers));
    if (shards < 1 || shards > n)
        throw py::value_error("shards must be in [1, n = " + std::to_string(n) + "], got " +
                              std::to_string(shards));
    if (slots < 0) throw py::value_error("slots must be >= 0, got " + std::to_string(slots));
    if (workers > UINT32_MAX || shards > UINT32_MAX)
        throw py::value_error("workers and shards must fit in 32 bits");
    const std::string nm = name.is_none() ? std::string() : name.cast<std::string>();
    if (!name.is_none() && nm.empty()) throw py::value_error("name must not be empty");
    py::gil_scoped_release release;  // sizing and reserving a large segment takes a while
    return SharedBuffer::create(static_cast<std::size_t>(n), static_cast<std::uint32_t>(workers),
                                static_cast<std::uint32_t>(shards),
                                static_cast<std::size_t>(slots), nm);
}

std::uint64_t apply(SharedBuffer& b, std::int64_t worker, FloatArray grad, float lr,
                    const std::string& policy, std::int64_t read_version,
                    py::object momentum_buf, float momentum, float weight_decay,
                    bool first_step, py::object read_into) {
    const std::uint32_t w = checked_worker(b, worker);
    const Policy pol = parse_policy(policy);
    const auto n = static_cast<py::ssize_t>(b.size());
    check_size(grad, n, "grad");
    FloatArray buf_arr, out_arr;
    float* buf = momentum_buffer(momentum_buf, buf_arr, n, momentum);
    float* out = optional_buffer(read_into, out_arr, n, "read_into");
    check_disjoint(b, grad.data(), b.size(), "grad");
    check_disjoint(b, buf, b.size(), "momentum_buf");
    check_disjoint(b, out, b.size(), "read_into");
    const std::int64_t rv = checked_read_version(read_version);
    const float* g = grad.data();
    const SgdOptions opt = sgd_options(lr, momentum, weight_decay, first_step);
    py::gil_scoped_release release;
    return b.apply(w, pol, g, buf, opt, rv, out);
}

std::uint64_t read_params(SharedBuffer& b, FloatArray out, bool locked) {
    check_size(out, static_cast<py::ssize_t>(b.size()), "out");
    float* o = writable(out, "out");
    check_disjoint(b, o, b.size(), "out");
    py::gil_scoped_release release;
    return b.read(o, locked);
}

py::dict stats(const SharedBuffer& b, std::int64_t worker) {
    if (worker != -1) checked_worker(b, worker);
    const hvdsgd::StalenessStats s = b.stats(worker);
    py::dict d;
    d["updates"] = s.updates;
    d["staleness_mean"] = s.mean;
    d["staleness_p95"] = static_cast<double>(s.p95);
    d["staleness_max"] = s.max;
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = R"pbdoc(hvdsgd's compiled core: parameter-update kernels over flat float32 buffers
and a parameter buffer in POSIX shared memory for asynchronous (HOGWILD!-style) SGD.)pbdoc";

    // hvdsgd::OsError -> OSError(errno, message), which Python turns into the matching
    // subclass: FileNotFoundError, FileExistsError, PermissionError...
    py::register_exception_translator([](std::exception_ptr p) {
        try {
            if (p) std::rethrow_exception(p);
        } catch (const hvdsgd::OsError& e) {
            PyObject* exc = PyObject_CallFunction(PyExc_OSError, "is", e.err, e.what());
            if (exc == nullptr) return;  // the call's own error is set
            PyErr_SetObject(reinterpret_cast<PyObject*>(Py_TYPE(exc)), exc);
            Py_DECREF(exc);
        }
    });

    m.def("sgd_step", &sgd_step, R"pbdoc(
        One in-place SGD step on flat float32 buffers, the arithmetic of
        torch.optim.SGD(lr, momentum, weight_decay) (no dampening, no Nesterov):
            g = grads + weight_decay * params
            momentum_buf = g if first_step else momentum * momentum_buf + g   (momentum != 0)
            params -= lr * (momentum_buf if momentum != 0 else g)

        params, grads, momentum_buf: (n,). params and momentum_buf are updated in place and
        must be C-contiguous, writable float32 arrays (a tensor's .numpy() is one): anything
        else raises instead of updating a temporary copy. momentum != 0 needs momentum_buf;
        first_step=True on the first step starts it at the gradient, as torch does.
        The GIL is released during the loop.
    )pbdoc",
          py::arg("params").noconvert(), py::arg("grads").noconvert(), py::arg("lr"),
          py::arg("momentum_buf") = py::none(), py::kw_only(), py::arg("momentum") = 0.0f,
          py::arg("weight_decay") = 0.0f, py::arg("first_step") = false);

    py::class_<SharedBuffer>(m, "SharedBuffer", R"pbdoc(
        A float32 parameter buffer in POSIX shared memory (/dev/shm), updated in place by
        worker processes that attach to it by name.

        Update policies (apply), all workers should use the same one:
          hogwild  plain loads and stores, no lock (HOGWILD!): concurrent updates can be lost
          atomic   per-element atomic add: nothing lost, no lock
          locked   one lock around the update (and read_into): a parameter server's apply
          sharded  `shards` contiguous ranges (multiples of 16 floats), a lock each, one
                   held at a time
        The locks are robust: a worker killed while holding one does not block the others.

        `updates` counts the updates that have landed (incremented after an update's last
        write, with release order); read() and `updates` load it with acquire, so whoever
        reads version v sees every write of those v updates. An update's staleness is the
        number of updates that landed between the worker's read at read_version and its own.
        The creator should unlink() the segment when the run ends; the mapping itself is
        released when the last reference (including params()/slot() views) goes.
    )pbdoc")
        .def_static("create", &create, R"pbdoc(
            Creates a new zeroed segment (mode 0600, O_EXCL) of n params plus `slots`
            gradient slots of n floats, with stats for `workers` workers and `shards` shard
            locks. name=None picks an unguessable "/hvdsgd-<pid>-<16 hex digits>".
        )pbdoc",
                    py::arg("n"), py::arg("workers") = 1, py::arg("shards") = 1,
                    py::arg("slots") = 0, py::arg("name") = py::none())
        .def_static(
            "attach",
            [](const std::string& name, std::int64_t n) {
                py::gil_scoped_release release;
                return SharedBuffer::attach(name, n);
            },
            R"pbdoc(
            Maps the segment `name` created by SharedBuffer.create (a leading "/" is
            optional). FileNotFoundError when it does not exist; ValueError when it is not an
            hvdsgd buffer, is corrupted, or (n >= 0) does not hold n params.
        )pbdoc",
            py::arg("name"), py::arg("n") = -1)
        .def_property_readonly("name", &SharedBuffer::name, "the shared-memory name (\"/...\")")
        .def_property_readonly("size", &SharedBuffer::size, "n: the number of float32 params")
        .def_property_readonly("workers", &SharedBuffer::workers, "the number of worker slots")
        .def_property_readonly("shards", &SharedBuffer::shards, "the number of shard locks")
        .def_property_readonly("n_slots", &SharedBuffer::n_slots, "the number of gradient slots")
        .def_property_readonly("attached", &SharedBuffer::attached,
                               "how many times the segment has been attached")
        .def_property_readonly("updates", &SharedBuffer::updates,
                               "the updates landed so far (an acquire load: the params read "
                               "after it hold every write of that many updates)")
        .def_property_readonly("lock_recoveries", &SharedBuffer::lock_recoveries,
                               "locks taken over from a process that died holding them")
        .def(
            "params",
            [](py::object self) {
                const auto& b = self.cast<const SharedBuffer&>();
                return FloatArray(static_cast<py::ssize_t>(b.size()), b.params(), self);
            },
            "The params as a writable float32 (n,) array over the shared memory (no copy); "
            "it keeps the buffer alive.")
        .def(
            "slot",
            [](py::object self, std::int64_t i) {
                const auto& b = self.cast<const SharedBuffer&>();
                if (i < 0 || i >= static_cast<std::int64_t>(b.n_slots()))
                    throw py::index_error("slot " + std::to_string(i) +
                                          " out of range: the buffer has " +
                                          std::to_string(b.n_slots()) + " slots");
                return FloatArray(static_cast<py::ssize_t>(b.size()),
                                  b.slot(static_cast<std::size_t>(i)), self);
            },
            "Gradient slot i as a writable float32 (n,) array over the shared memory.",
            py::arg("i"))
        .def("apply", &apply, R"pbdoc(
            One SGD step on the shared params (the arithmetic of sgd_step) by `worker`
            (0 <= worker < workers) with `policy`: 'hogwild', 'atomic', 'locked' or
            'sharded'. grad, momentum_buf (the worker's own), read_into: (n,) float32.
            read_version: the version (from read() or `updates`) of the weights grad was
            computed from (-1: none, staleness 0). read_into gets the params just after the
            update (under the same lock for 'locked', per shard for 'sharded').
            Returns the update's staleness: the updates that landed after read_version and
            before this one. The GIL is released during the update (and lock waits).
        )pbdoc",
             py::arg("worker"), py::arg("grad").noconvert(), py::arg("lr"), py::kw_only(),
             py::arg("policy") = "hogwild", py::arg("read_version") = -1,
             py::arg("momentum_buf") = py::none(), py::arg("momentum") = 0.0f,
             py::arg("weight_decay") = 0.0f, py::arg("first_step") = false,
             py::arg("read_into") = py::none())
        .def("read", &read_params, R"pbdoc(
            Copies the params into out (float32 (n,)), under the global lock when `locked`
            (consistent with 'locked' updates); returns `updates` loaded just before the copy
            (the copy holds every write of that many updates): the read_version to pass to
            apply.
        )pbdoc",
             py::arg("out").noconvert(), py::arg("locked") = false)
        .def("stats", &stats, R"pbdoc(
            Staleness record of one worker, or of all workers together (worker=-1):
            {"updates", "staleness_mean", "staleness_p95", "staleness_max"}.
            p95 is the nearest-rank percentile over a histogram whose last bucket is >= 255.
        )pbdoc",
             py::arg("worker") = -1)
        .def("unlink", &SharedBuffer::unlink, R"pbdoc(
            Removes the segment's name (shm_unlink); existing mappings and views stay valid.
            Idempotent.
        )pbdoc")
        .def(
            "_lock_for_test",
            [](SharedBuffer& b, std::int64_t lock) {
                if (lock < 0 || lock > static_cast<std::int64_t>(b.shards()))
                    throw py::index_error("lock " + std::to_string(lock) +
                                          " out of range: the buffer has " +
                                          std::to_string(b.shards() + 1) + " locks");
                py::gil_scoped_release release;
                b.lock_forever(static_cast<std::uint32_t>(lock));
            },
            "Testing only: takes lock `lock` (0: the 'locked' lock, 1 + s: shard s) and never "
            "releases it (this object's mapping is then never unmapped).",
            py::arg("lock"))
        .def("__repr__", [](const SharedBuffer& b) {
            return "<hvdsgd._C.SharedBuffer " + b.name() + " n=" + std::to_string(b.size()) +
                   " workers=" + std::to_string(b.workers()) + " shards=" +
                   std::to_string(b.shards()) + " slots=" + std::to_string(b.n_slots()) + ">";
        });

    m.attr("__version__") = MACRO_STRINGIFY(VERSION_INFO);
}
