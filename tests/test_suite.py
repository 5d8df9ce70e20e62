"""The suite's own machinery: how `make test` shares the test files between its 2 xdist workers."""

import types

import pytest
from conftest import LONGEST_FIRST, SPLIT_FILES, pytest_xdist_make_scheduler

pytestmark = pytest.mark.unit


class Worker:
    """What xdist's scheduler sees of a worker: the indices it is sent, and a shutdown call."""

    def __init__(self, name: str):
        self.gateway = types.SimpleNamespace(id=name)
        self.shutting_down = False
        self.sent: list[int] = []

    def send_runtest_some(self, indices):
        self.sent += indices

    def shutdown(self):
        self.shutting_down = True


def config(dist: str = "loadfile"):
    """The parts of a pytest Config that xdist's file scheduler reads (`-n 2 --dist DIST`)."""
    option = types.SimpleNamespace(loadscopereorder=True, dist=dist, tx=["2*popen"])
    return types.SimpleNamespace(
        option=option,
        getoption=lambda name: getattr(option, name),
        getvalue=lambda name: getattr(option, name),
    )


def first_files(collection: list[str]) -> list[list[str]]:
    """The tests each of 2 workers is sent first, as make test's scheduler hands them out."""
    sched = pytest_xdist_make_scheduler(config(), None)
    workers = [Worker("gw0"), Worker("gw1")]
    for w in workers:
        sched.add_node(w)
    for w in workers:
        sched.add_node_collection(w, collection)
    sched.schedule()
    return [[collection[i] for i in w.sent] for w in workers]


def test_the_long_files_go_first_and_bench_tests_go_to_both_workers():
    """Stock `--dist loadfile` orders files by their number of tests, which started the
    longest test file (one 5-minute test) last, with the other worker idle meanwhile."""
    assert LONGEST_FIRST[0] == "test_bench.py" and "test_bench.py" in SPLIT_FILES
    many = [f"tests/test_many.py::test_{i}" for i in range(50)]
    bench = [f"tests/test_bench.py::test_make[{s}]" for s in ("kfold", "elastic", "lottery")]
    dist = [f"tests/test_distributed.py::test_{i}" for i in range(3)]
    gw0, gw1 = first_files(bench + dist + many)  # the collection order conftest makes
    assert gw0[0] == bench[0] and gw1[0] == bench[1]  # one bench test on each worker first
    assert bench[2] in gw0 + gw1 and set(dist) <= set(gw0 + gw1)  # then the next longest
    assert not set(many) & set(gw0 + gw1)  # the 50 short tests wait for the long ones


def test_a_file_stays_on_one_worker_and_other_modes_are_stock():
    sched = pytest_xdist_make_scheduler(config(), None)
    assert sched._split_scope("tests/test_distributed.py::test_a[1]") == "tests/test_distributed.py"
    assert sched._split_scope("tests/test_bench.py::test_make[kfold]") == (
        "tests/test_bench.py::test_make[kfold]"
    )
    assert pytest_xdist_make_scheduler(config("load"), None) is None
