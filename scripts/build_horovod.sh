#!/usr/bin/env bash
# Build Horovod 0.28.1 from its PyPI sdist against the torch in $PYTHON's environment,
# cache the wheel outside the repository, and install it.
#
#   scripts/build_horovod.sh [PYTHON]        (default: .venv/bin/python; make setup runs this)
#   python -m hvdsgd.build_horovod           (after pip install: this script, shipped in the
#                                             wheel as hvdsgd/build_horovod.sh, for that python)
#
# Why a script: 0.28.1 is Horovod's last release and asks CMake for C++14, while torch
# 2.1-2.13 need C++17 and torch >= 2.14 needs C++20 (upstream fixed C++17 on master in
# PR #3998, never released). gcc 13 needs two missing includes (upstream #3957), Python
# 3.12 lacks the distutils that horovod/torch/CMakeLists.txt imports, and CMake 4 refuses
# Gloo's old cmake_minimum_required. This script patches all of that.
#
# Environment:
#   HVDSGD_CACHE          cache root (default: ${XDG_CACHE_HOME:-~/.cache}/hvdsgd)
#   HVDSGD_HOROVOD_GPU    1 = build NCCL GPU ops, 0 = CPU only (default: auto, needs nvcc + a driver).
#                         1 works without a GPU (nvcc, a CUDA torch and pip's NCCL suffice); the
#                         NCCL wheel also runs CPU training over Gloo, so one build serves both.
#   HOROVOD_BUILD_CUDA_CC_LIST  GPU architectures to compile (default: those the installed
#                         torch was built for that this nvcc supports, e.g. 75,80,86,90,100,120)
#   HVDSGD_HOROVOD_INSTALL  0 = build and cache the wheel, print its path, install nothing
#                         (the NCCL build on a CPU host, next to its CPU environment)
#   MAKEFLAGS / HVDSGD_BUILD_JOBS   parallel compile jobs (default: nproc)
set -euo pipefail

HOROVOD_VERSION=0.28.1
PATCH_LEVEL=8          # bump when the patches below change: it is part of the cache key
PYTHON=${1:-.venv/bin/python}
say() { printf '[build_horovod] %s\n' "$*"; }
die() { printf '[build_horovod] error: %s\n' "$*" >&2; exit 1; }

[ -x "$PYTHON" ] || die "no python at $PYTHON; create the environment first (make setup)"
read -r TORCH_VERSION PY_TAG CUDA_TORCH < <("$PYTHON" - <<'EOF'
import sys, torch
print(torch.__version__.split('+')[0], f"cp{sys.version_info[0]}{sys.version_info[1]}",
      torch.version.cuda or "none")
EOF
) || die "torch is not importable with $PYTHON; install the Python dependencies first"

# --- C++ standard the installed torch needs -----------------------------------------------
IFS=. read -r T_MAJOR T_MINOR _ <<<"$TORCH_VERSION"
if (( T_MAJOR > 2 || (T_MAJOR == 2 && T_MINOR >= 14) )); then CXX_STD=20
elif (( T_MAJOR == 2 && T_MINOR >= 1 )); then CXX_STD=17
else CXX_STD=14; fi

# --- GPU or CPU build -----------------------------------------------------------------------
have_driver() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; }
GPU=${HVDSGD_HOROVOD_GPU:-auto}
if [ "$GPU" = auto ]; then
  if command -v nvcc >/dev/null 2>&1 && have_driver && [ "$CUDA_TORCH" != none ]; then GPU=1; else GPU=0; fi
fi
VARIANT=$([ "$GPU" = 1 ] && echo "nccl-cu${CUDA_TORCH//./}" || echo cpu)
if [ "$GPU" = 1 ]; then
  command -v nvcc >/dev/null 2>&1 || die "HVDSGD_HOROVOD_GPU=1 needs nvcc on PATH (a CUDA toolkit, e.g. /usr/local/cuda/bin)"
  [ "$CUDA_TORCH" != none ] || die "HVDSGD_HOROVOD_GPU=1 needs a CUDA build of torch; this one is CPU-only"
fi
INSTALL=${HVDSGD_HOROVOD_INSTALL:-1}

CACHE=${HVDSGD_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/hvdsgd}
KEY="horovod-${HOROVOD_VERSION}-p${PATCH_LEVEL}-torch${TORCH_VERSION}-${PY_TAG}-${VARIANT}"
WHEEL_DIR="$CACHE/wheels/$KEY"

# The environment records which build it holds; horovod.torch must also still import.
MARKER="$("$PYTHON" -c 'import sys; print(sys.prefix)')/.hvdsgd-horovod"
if [ "$INSTALL" = 1 ] && [ "$(cat "$MARKER" 2>/dev/null)" = "$KEY" ] && "$PYTHON" -c 'import horovod.torch' 2>/dev/null; then
  say "Horovod $HOROVOD_VERSION already installed ($KEY)"
  exit 0
fi

wheel=$(ls "$WHEEL_DIR"/horovod-*.whl 2>/dev/null | head -n1 || true)
if [ -z "$wheel" ]; then
  JOBS=${HVDSGD_BUILD_JOBS:-$(nproc)}
  say "building Horovod $HOROVOD_VERSION for torch $TORCH_VERSION ($PY_TAG, C++$CXX_STD, $VARIANT)"
  say "this takes about $(( (10 + JOBS - 1) / JOBS )) min on $JOBS cores (5 min measured on 2); the wheel is cached in $WHEEL_DIR"
  work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
  sdist="$CACHE/sdist/horovod-$HOROVOD_VERSION.tar.gz"
  if [ ! -f "$sdist" ]; then
    mkdir -p "$CACHE/sdist"
    "$PYTHON" -m pip download -q --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$CACHE/sdist" \
      || die "could not download the horovod==$HOROVOD_VERSION sdist from PyPI"
  fi
  tar -xzf "$sdist" -C "$work"
  src="$work/horovod-$HOROVOD_VERSION"

  # C++ standard: root and torch CMakeLists (the torch one forces 14 after the root's).
  sed -i "s/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD $CXX_STD)/" \
    "$src/CMakeLists.txt" "$src/horovod/torch/CMakeLists.txt"
  # gcc 13: missing includes (upstream #3957).
  grep -q '<stdexcept>' "$src/horovod/common/common.h" \
    || sed -i 's/#include <functional>/#include <functional>\n#include <stdexcept>/' "$src/horovod/common/common.h"
  grep -q '<string>' "$src/horovod/common/group_table.h" \
    || sed -i 's/#include <mutex>/#include <mutex>\n#include <string>/' "$src/horovod/common/group_table.h"
  # Python 3.12: no distutils; sysconfig gives the same include path.
  sed -i 's/from distutils.sysconfig import get_python_inc; print(get_python_inc())/import sysconfig; print(sysconfig.get_paths()[\\"include\\"])/' \
    "$src/horovod/torch/CMakeLists.txt"

  # Source patches, each checked to apply exactly once (an sdist that changed fails loudly):
  # - horovodrun speaks for a job that goes wrong, in one line, with no launcher traceback:
  #   "horovodrun: rank 1 was lost (exit 137); stopping" for the first rank that died (by a
  #   signal; "exited with status S" for another failure, and nothing for status 2, a usage
  #   error the rank has reported itself); "horovodrun: interrupted" (exit 130) on Ctrl-C and
  #   "horovodrun: stopped by SIGTERM" (143). The ranks it then stops are told by SIGTERM; a
  #   rank's Gloo "Connection reset by peer" lines (Horovod's background loop logs them at
  #   ERROR the moment a peer dies) are held and dropped when the job was being stopped, and
  #   so is hvdsgd's "rank R lost contact with the other ranks": a rank that met the lost peer
  #   before its own SIGTERM (on a loaded host, more than its 3 s grace) says so itself. The
  #   shell execs each rank, so no shell is left to add "Killed" or "Terminated".
  # - HOROVOD_WAKE_ON_ENQUEUE=1 (opt-in, set by hvdsgd on CPU): the background loop sleeps
  #   until its cycle ends *or* a tensor is enqueued, and does not sleep while tensors of its
  #   own wait for the other ranks. A long cycle then costs no latency, and an idle loop stops
  #   waking every millisecond to coordinate (on a CPU host those wake-ups steal the cores).
  # - HOROVOD_WAIT_SLEEP_US=N (opt-in, set by hvdsgd on CPU): a thread waiting for a collective
  #   spins for N microseconds, then sleeps N microseconds between polls. Stock Horovod spins
  #   on sched_yield, which on a host with a rank per core takes the core from the background
  #   thread doing the very allreduce being waited for.
  # - The rendezvous server clears a scope (global, local_HOST, cross_N: the ranks' Gloo ports)
  #   once all its ranks have finished it, and forgets only that scope's finished ranks. Stock
  #   Horovod forgot every scope's, so a scope whose last rank came after another scope completed
  #   was never cleared, and hvd.init() after hvd.shutdown() could read a peer's stale port:
  #   "Connection refused" or a Gloo connect timeout (the flake upstream PR #2839 saw in
  #   test_horovod_reinit). tests/test_rendezvous.py reproduces it.
  # - An unreachable host is one line from horovodrun, ending with ssh's reason and the ssh
  #   command that must work without a password (stock: ssh's text and a 13-line traceback).
  # - Under an elastic launch, a rank that outlived a reset exits 0; the Gloo "Connection reset
  #   by peer" lines it logged when the peer died are dropped with its held stderr.
  # - A process set's Gloo device uses the global context's interface (HOROVOD_GLOO_IFACE, set
  #   by horovodrun). Stock Horovod left it empty there, so Gloo looked up the host's own name,
  #   and on a host whose name does not resolve (a container missing from DNS) hvd.init()
  #   segfaulted in gloo::transport::tcp::lookupAddrForHostname (it checks rv != -1, not 0).
  # - The elastic driver runs the host discovery script every second. Stock Horovod ran it
  #   through safe_shell_exec, which spawns a fresh Python middleman each time: 64 ms of CPU a
  #   call (6% of a core, taken from the ranks on a host whose cores all train); a plain
  #   subprocess costs 2 ms.
  # - A rank whose host the discovery script dropped exits 0 without a word when it learns so
  #   at its re-initialisation (stock: "terminate called after throwing an instance of
  #   'std::runtime_error' ... has been removed from elastic job" and SIGABRT).
  # - The per-rank middleman's stopping threads are silent: when a job was stopped, its main
  #   thread could reap the rank and exit while the thread was still stopping it, and the
  #   launcher's stderr got half a traceback ("Exception in thread Thread-1 (fn): ...").
  "$PYTHON" - "$src/horovod" <<'PY'
import sys
root = sys.argv[1]
def patch(name, old, new):
    path = f"{root}/{name}"
    src = open(path).read()
    assert src.count(old) == 1, f"hvdsgd patch: {name} changed"
    open(path, "w").write(src.replace(old, new))

patch("runner/launch.py",
      "        logging.basicConfig(level=logging.getLevelName(args.log_level))\n\n    _run(args)\n",
      "        logging.basicConfig(level=logging.getLevelName(args.log_level))\n\n"
      "    try:\n        _run(args)\n"
      "    except JobStopped as e:  # hvdsgd: its one line is out already\n"
      "        sys.exit(e.status)\n"
      "    except KeyboardInterrupt:\n"
      "        print('horovodrun: interrupted', file=sys.stderr)\n"
      "        sys.exit(130)\n"
      "    except RuntimeError as e:\n"
      "        import re\n"
      "        m = re.search(r'Process name: (\\S+)\\nExit code: (-?\\d+)', str(e))\n"
      "        if not m:\n            raise\n"
      "        print(f'horovodrun: process {m[1]} exited with status {m[2]}; the job was stopped',\n"
      "              file=sys.stderr)\n"
      "        sys.exit(int(m[2]) if 0 < int(m[2]) < 256 else 1)\n")
patch("runner/launch.py", "from horovod.runner.gloo_run import gloo_run, gloo_run_elastic\n",
      "from horovod.runner.gloo_run import JobStopped, gloo_run, gloo_run_elastic\n")
patch("runner/gloo_run.py", "import os\nimport signal\n", "import os\nimport re\nimport signal\n")
patch("runner/gloo_run.py", "            shell='env',\n",
      "            shell='exec env',  # hvdsgd: no shell left to print 'Killed' when a rank dies\n")
patch("runner/gloo_run.py", "def create_slot_env_vars(slot_info):\n", '''class JobStopped(RuntimeError):
    """hvdsgd: a job that ended early; horovodrun has printed its one line, exit with status."""

    def __init__(self, line, status):
        super().__init__(line)
        self.status = status


def _failure_line(rank, status):
    """hvdsgd: the one line for the first rank that failed, or None when it spoke itself
    (status 2: a usage error, reported by the rank as hvdsgd and argparse do)."""
    if status == 2:
        return None
    if status > 128:
        return f'horovodrun: rank {rank} was lost (exit {status}); stopping'
    return f'horovodrun: rank {rank} exited with status {status}; stopping'


class _HeldPeerLoss(object):
    """hvdsgd: a rank's stderr, less Horovod's, Gloo's and hvdsgd's reports of a lost connection.
    Those are held until the rank exits, then dropped if the job was being stopped (they only echo
    the loss horovodrun reports in its one line) and written out otherwise."""
    PATTERN = re.compile(r'background loop uncaught exception|gloo/transport|'
                         r'Connection (reset|closed) by peer|'
                         r'hvdsgd: error: rank \d+ lost contact with the other ranks')

    def __init__(self, stream):
        self._stream, self._held = stream, []

    def write(self, text):
        if self.PATTERN.search(text):
            self._held.append(text)
        else:
            self._stream.write(text)

    def flush(self):
        self._stream.flush()

    def release(self, drop):
        if not drop:
            for text in self._held:
                self._stream.write(text)
            self._stream.flush()
        self._held = []


def create_slot_env_vars(slot_info):
''')
patch("runner/gloo_run.py",
      "    terminate_all_event = None if settings.elastic else threading.Event()\n",
      "    terminate_all_event = None if settings.elastic else threading.Event()\n"
      "    first_failure = threading.Lock()  # hvdsgd: one line for the first rank that fails\n")
patch("runner/gloo_run.py", """        try:
            exit_code = safe_shell_exec.execute(command,
                                                index=index,
                                                stdout=stdout,
                                                stderr=stderr,
                                                events=all_events,
                                                prefix_output_with_timestamp=settings.prefix_output_with_timestamp)
            if exit_code != 0:
                print('Process {idx} exit with status code {ec}.'.format(idx=index, ec=exit_code))
        except Exception as e:
            print('Exception happened during safe_shell_exec, exception '
                  'message: {message}'.format(message=e))
            exit_code = 1
        finally:
            if stdout_file:
                stdout_file.close()
            if stderr_file:
                stderr_file.close()
        if exit_code != 0 and terminate_all_event:
            if not any(ev.is_set() for ev in all_events):
                print('Terminating remaining workers after failure of Process {idx}.'.format(idx=index))
            terminate_all_event.set()
        return exit_code, time.time()
""", """        stderr = _HeldPeerLoss(stderr or sys.stderr)
        try:
            exit_code = safe_shell_exec.execute(command,
                                                index=index,
                                                stdout=stdout,
                                                stderr=stderr,
                                                events=all_events,
                                                prefix_output_with_timestamp=settings.prefix_output_with_timestamp)
        except Exception as e:
            print('Exception happened during safe_shell_exec, exception '
                  'message: {message}'.format(message=e))
            exit_code = 1
        with first_failure:
            stopped = any(ev.is_set() for ev in all_events)
            if exit_code != 0 and terminate_all_event:
                line = None if stopped else _failure_line(index, exit_code)
                if line:
                    print(line, file=sys.stderr, flush=True)
                terminate_all_event.set()
            finished = time.time()  # the first failure is the one that printed its line
        # hvdsgd: a rank that outlived an elastic reset has nothing to say about the lost peer
        stderr.release(drop=stopped or (settings.elastic and exit_code == 0))
        if stdout_file:
            stdout_file.close()
        if stderr_file:
            stderr_file.close()
        return exit_code, finished
""")
patch("runner/gloo_run.py", """    def set_event_on_signal(signum, frame):
        event.set()
""", """    def set_event_on_signal(signum, frame):
        # hvdsgd: say so at once, in one line, then stop the ranks (they leave quietly)
        if not event.is_set():
            event.signum = signum
            what = 'interrupted' if signum == signal.SIGINT else \\
                f'stopped by {signal.Signals(signum).name}'
            print(f'horovodrun: {what}', file=sys.stderr, flush=True)
        event.set()
""")
patch("runner/gloo_run.py", """    for name, value in sorted(res.items(), key=lambda item: item[1][1]):
        exit_code, timestamp = value
        if exit_code != 0:
            raise RuntimeError('Horovod detected that one or more processes exited with non-zero '
                               'status, thus causing the job to be terminated. The first process '
                               'to do so was:\\nProcess name: {name}\\nExit code: {code}\\n'
                               .format(name=name, code=exit_code))


def _get_min_start_hosts""", """    if event.is_set():
        raise JobStopped('horovodrun was stopped', 128 + event.signum)
    for name, value in sorted(res.items(), key=lambda item: item[1][1]):
        exit_code, timestamp = value
        if exit_code != 0:
            raise JobStopped(f'rank {name} exited with status {exit_code}',
                             exit_code if 0 < exit_code < 256 else 1)


def _get_min_start_hosts""")
patch("runner/launch.py", """        if exit_code != 0:
            print('ssh not successful for host {host}:\\n{msg_output}'
                  .format(host=host_addresses[index],
                          msg_output=output_msg))
""", """        if exit_code != 0:
            # hvdsgd: one line per host, ending with ssh's own last word on why
            why = [l.strip() for l in output_msg.splitlines()
                   if l.strip() and not l.startswith('Warning: Permanently added')]
            why = why[-1] if why else f'ssh exited with status {exit_code}'
            check = ' '.join(['ssh'] + (['-p', str(ssh_port)] if ssh_port else []) +
                             (['-i', ssh_identity_file] if ssh_identity_file else []) +
                             [host_addresses[index], 'true'])
            print(f'horovodrun: cannot ssh to {host_addresses[index]} ({why}); this must work '
                  f'without a password: {check}', file=sys.stderr, flush=True)
""")
patch("runner/launch.py", "            raise RuntimeError('could not connect to some hosts via ssh')\n",
      "            raise JobStopped('could not connect to some hosts via ssh', 1)  # hvdsgd: said above\n")
patch("common/gloo/gloo_context.cc", """  attr device_attr;
  device_attr.iface = gloo_iface_;
  device_attr.ai_family = AF_UNSPEC;
  auto dev = CreateDevice(device_attr);

  global_ctx = global_context.ctx;
""", """  attr device_attr;
  gloo_iface_ = global_context.gloo_iface_;  // hvdsgd: the global context's interface
  device_attr.iface = gloo_iface_;
  device_attr.ai_family = AF_UNSPEC;
  auto dev = CreateDevice(device_attr);

  global_ctx = global_context.ctx;
""")
patch("runner/elastic/discovery.py", "import io\n", "import io\nimport subprocess\n")
patch("runner/elastic/discovery.py", """        stdout = io.StringIO()
        exit_code = safe_shell_exec.execute(
            self._discovery_script, stdout=stdout)
        if exit_code != 0:
            raise RuntimeError(
                'Failed to execute discovery script: {}. Exit code: {}' .format(
                    self._discovery_script, exit_code))
        return stdout.getvalue()
""", """        # hvdsgd: a plain subprocess; safe_shell_exec spawned a Python middleman every call
        proc = subprocess.run(self._discovery_script, shell=True, stdout=subprocess.PIPE,
                              universal_newlines=True)
        if proc.returncode != 0:
            raise RuntimeError(
                'Failed to execute discovery script: {}. Exit code: {}' .format(
                    self._discovery_script, proc.returncode))
        return proc.stdout
""")
patch("common/gloo/gloo_context.cc", """      out << hostname_ << "[" << local_rank << "] has been removed from elastic job";
      throw std::runtime_error(out.str());
""", """      out << hostname_ << "[" << local_rank << "] has been removed from elastic job";
      // hvdsgd: leave quietly; thrown in the background thread, this was std::terminate
      // ("terminate called after throwing ...", SIGABRT), and the driver ignores the exit.
      LOG(INFO) << out.str();
      std::_Exit(0);
""")
patch("runner/common/util/safe_shell_exec.py",
      "    on_event(exit_event, terminate_executor_shell_and_children, args=(executor_shell.pid,), daemon=True)\n",
      "    # hvdsgd: silent: the main thread may reap the command and exit while this thread is still\n"
      "    # stopping it; an exception then (interpreter shutdown) printed half a traceback\n"
      "    on_event(exit_event, terminate_executor_shell_and_children, args=(executor_shell.pid,), daemon=True,\n"
      "             silent=True)\n")
patch("runner/common/util/safe_shell_exec.py", "    in_thread(kill_executor_children_if_parent_dies)\n",
      "    in_thread(kill_executor_children_if_parent_dies, silent=True)  # hvdsgd: as above\n")
patch("runner/http/http_server.py", """                        self.server.cache.get(scope, {}).clear()
                        self.server.finished_list.clear()
""", """                        self.server.cache.get(scope, {}).clear()
                        # hvdsgd: forget this scope's finished ranks only (clearing every
                        # scope's left the others uncleared: a re-init read stale ports)
                        del self.server.finished_list[scope]
""")
patch("runner/common/util/safe_shell_exec.py", """    except psutil.NoSuchProcess:
        return

    # Terminate children gracefully.
""", """    except psutil.NoSuchProcess:
        return
    try:
        if p.cmdline()[:2] != ['/bin/sh', '-c']:
            return _terminate_command(p)  # hvdsgd: the shell exec'd the command
    except psutil.NoSuchProcess:
        return

    # Terminate children gracefully.
""")
patch("runner/common/util/safe_shell_exec.py", "def prefix_connection(", '''def _terminate_command(p):
    """hvdsgd: p is the command itself (the shell exec'd it): TERM it, give it the grace time,
    then KILL it and whatever it started. Its parent reaps it: never wait() here."""
    try:
        p.terminate()
        deadline = time.time() + GRACEFUL_TERMINATION_TIME_S
        while p.status() != psutil.STATUS_ZOMBIE and time.time() < deadline:
            time.sleep(0.05)
        if p.status() == psutil.STATUS_ZOMBIE:
            return
        for proc in p.children(recursive=True) + [p]:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass


def prefix_connection(''')
patch("common/tensor_queue.h", "namespace horovod {\nnamespace common {\n", """#include <condition_variable>

namespace horovod {
namespace common {

// hvdsgd: wake the background loop when work is enqueued (HOROVOD_WAKE_ON_ENQUEUE=1).
inline std::mutex& WakeMutex() { static std::mutex m; return m; }
inline std::condition_variable& WakeCondition() { static std::condition_variable c; return c; }
inline bool& WakeFlag() { static bool f = false; return f; }
inline void WakeBackgroundLoop() {
  { std::lock_guard<std::mutex> lock(WakeMutex()); WakeFlag() = true; }
  WakeCondition().notify_all();
}
""")
patch("common/tensor_queue.h", "  void RemoveJoinTensor();\n",
      "  void RemoveJoinTensor();\n\n  bool Empty() const;\n")
patch("common/tensor_queue.cc", "  message_queue_.push(std::move(message));\n  return Status::OK();\n",
      "  message_queue_.push(std::move(message));\n  WakeBackgroundLoop();\n  return Status::OK();\n")
patch("common/tensor_queue.cc", "    message_queue_.push(std::move(messages[i]));\n  }\n  return Status::OK();\n",
      "    message_queue_.push(std::move(messages[i]));\n  }\n  WakeBackgroundLoop();\n  return Status::OK();\n")
patch("common/tensor_queue.cc", "} // namespace common\n} // namespace horovod",
      "bool TensorQueue::Empty() const {\n  std::lock_guard<std::mutex> guard(mutex_);\n"
      "  return tensor_table_.empty();\n}\n\n} // namespace common\n} // namespace horovod")
patch("common/operations.cc", """  if (sleep_duration > std::chrono::steady_clock::duration::zero()) {
    std::this_thread::sleep_for(sleep_duration);
  }
""", """  static const bool wake_on_enqueue = [] {
    const char* v = std::getenv("HOROVOD_WAKE_ON_ENQUEUE");
    return v != nullptr && std::string(v) == "1";
  }();
  if (wake_on_enqueue) {
    // Ask the queue first, holding only its own mutex: an enqueue holds the queue's mutex
    // while it takes WakeMutex to signal, so taking them in the other order here deadlocks
    // (a rank then hangs until its peers' Gloo timeout shuts Horovod down). A tensor enqueued
    // after this check sets WakeFlag under WakeMutex, so the wait below cannot miss it.
    const bool idle = sleep_duration > std::chrono::steady_clock::duration::zero() &&
                      state.process_set_table.Get(0).tensor_queue.Empty();
    std::unique_lock<std::mutex> lock(WakeMutex());
    if (idle) {
      WakeCondition().wait_for(lock, sleep_duration, [] { return WakeFlag(); });
    }
    WakeFlag() = false;
  } else if (sleep_duration > std::chrono::steady_clock::duration::zero()) {
    std::this_thread::sleep_for(sleep_duration);
  }
""")
wait_old = """void WaitAndClear(int handle) {
  while (true) {
    if (handle_manager.PollHandle(handle)) break;
    {
      py::gil_scoped_release release_python_gil;
      std::this_thread::yield();
    }
  }
"""
wait_new = """void WaitAndClear(int handle) {
  static const long sleep_us = [] {
    const char* v = std::getenv("HOROVOD_WAIT_SLEEP_US");
    return v != nullptr ? std::atol(v) : 0L;
  }();
  const auto start = std::chrono::steady_clock::now();
  while (true) {
    if (handle_manager.PollHandle(handle)) break;
    {
      py::gil_scoped_release release_python_gil;
      if (sleep_us > 0 && std::chrono::steady_clock::now() - start >
                              std::chrono::microseconds(sleep_us)) {
        std::this_thread::sleep_for(std::chrono::microseconds(sleep_us));
      } else {
        std::this_thread::yield();
      }
    }
  }
"""
patch("torch/mpi_ops_v2.cc", wait_old, wait_new)
PY

  export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1
  export HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
  export CMAKE_POLICY_VERSION_MINIMUM=3.5          # CMake 4 vs Gloo's cmake_minimum_required(2.8.12)
  export MAKEFLAGS="-j$JOBS" CMAKE_BUILD_PARALLEL_LEVEL="$JOBS"
  if [ -d /usr/local/cuda ]; then                  # a CUDA torch + nvcc make CMake look for a toolkit
    export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} CUDAToolkit_ROOT=${CUDAToolkit_ROOT:-/usr/local/cuda}
  fi
  if [ "$GPU" = 1 ]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    # CUDA 13 dropped every architecture before Turing (75), and nvcc fails on a list that
    # names one; Horovod's default is every sm_ nvcc lists (12 on 13.0). Build those torch
    # was built for (its kernels define what can run at all) that nvcc supports.
    if [ -z "${HOROVOD_BUILD_CUDA_CC_LIST:-}" ]; then
      supported=" $(nvcc --list-gpu-arch | sed -n 's/^compute_//p' | tr '\n' ' ')"
      cc=$("$PYTHON" -c 'import torch; print(" ".join(a[3:] for a in torch._C._cuda_getArchFlags().split() if a.startswith("sm_")))')
      list=""; for c in $cc; do case "$supported" in *" $c "*) list="$list${list:+,}$c";; esac; done
      [ -n "$list" ] || die "torch's GPU architectures ($cc) and nvcc's ($supported) have nothing in common; set HOROVOD_BUILD_CUDA_CC_LIST"
      export HOROVOD_BUILD_CUDA_CC_LIST="$list"
    fi
    case ",$HOROVOD_BUILD_CUDA_CC_LIST," in *,90,*) ;; *) say "warning: HOROVOD_BUILD_CUDA_CC_LIST=$HOROVOD_BUILD_CUDA_CC_LIST has no 90 (Hopper)";; esac
    # NCCL: the nvidia-nccl wheel that pip installed beside the CUDA torch (a namespace package:
    # no __file__), unless HOROVOD_NCCL_HOME/_INCLUDE/_LIB point elsewhere. It ships only
    # libnccl.so.2, so the linker gets a libnccl.so link in the build dir; at run time torch has
    # already loaded that libnccl.so.2 when Horovod's library loads.
    if [ -z "${HOROVOD_NCCL_HOME:-}${HOROVOD_NCCL_LIB:-}" ]; then
      nccl=$("$PYTHON" -c 'import nvidia.nccl; print(list(nvidia.nccl.__path__)[0])' 2>/dev/null || true)
      [ -n "$nccl" ] && [ -f "$nccl/include/nccl.h" ] && [ -f "$nccl/lib/libnccl.so.2" ] \
        || die "no NCCL found: pip install nvidia-nccl-cu${CUDA_TORCH%%.*}, or set HOROVOD_NCCL_HOME"
      mkdir -p "$work/nccl-lib" && ln -sf "$nccl/lib/libnccl.so.2" "$work/nccl-lib/libnccl.so"
      export HOROVOD_NCCL_INCLUDE="$nccl/include" HOROVOD_NCCL_LIB="$work/nccl-lib" HOROVOD_NCCL_LINK=SHARED
    fi
    say "NCCL ops for CUDA $CUDA_TORCH, architectures $HOROVOD_BUILD_CUDA_CC_LIST, NCCL from ${HOROVOD_NCCL_INCLUDE:-$HOROVOD_NCCL_HOME}"
  fi
  # horovod's setup.py needs cmake; use the system one if present, else PyPI's (with the policy flag).
  command -v cmake >/dev/null 2>&1 || "$PYTHON" -m pip install -q cmake
  start=$(date +%s)
  "$PYTHON" -m pip wheel -v --no-deps --no-build-isolation -w "$work/dist" "$src" >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; die "Horovod build failed (log above)"; }
  mkdir -p "$WHEEL_DIR"
  cp "$work"/dist/horovod-*.whl "$WHEEL_DIR/"
  wheel=$(ls "$WHEEL_DIR"/horovod-*.whl | head -n1)
  say "built $(basename "$wheel") in $(( $(date +%s) - start )) s"
else
  say "reusing cached $wheel"
fi

if [ "$INSTALL" != 1 ]; then
  say "not installed (HVDSGD_HOROVOD_INSTALL=$INSTALL); the wheel:"
  echo "$wheel"            # the last line, alone: callers take it with tail -n 1
  exit 0
fi
"$PYTHON" -m pip install -q --force-reinstall --no-deps "$wheel"
# Horovod's own requirements, those missing only (a GPU machine may have no registry).
missing=$("$PYTHON" -c 'import importlib.util as u; print(" ".join(p for m, p in (("cloudpickle", "cloudpickle"), ("psutil", "psutil"), ("yaml", "pyyaml"), ("packaging", "packaging")) if u.find_spec(m) is None))')
[ -z "$missing" ] || "$PYTHON" -m pip install -q $missing
echo "$KEY" >"$MARKER"
say "installed Horovod $HOROVOD_VERSION; check: horovodrun --check-build"
