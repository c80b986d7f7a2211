"""Runs untrusted, model-written Python against unit tests in a separate, locked-down process.

Process-level isolation (kernel namespaces, cgroup, seccomp, resource limits), good enough to score
RL rollouts that may (accidentally or by reward hacking) write infinite loops, memory/fork bombs,
gigabytes of output, code that pokes at the host, or code that games the tests. NOT a VM, nor a
boundary against a kernel exploit or side channels: run it on machines you can afford to lose if you
face adversarial code.

Comparisons outside the sandbox. The solution runs in a child; each test is parsed here
(``_sandbox_split``) and, when it only calls into the solution (``assert f(3) == 9``,
``check(candidate)``), runs here: each call goes to the child as a request under a call index we
assign, and its result comes back through an exact-type codec (``_sandbox_codec``: int, float, str,
bool, None, bytes and lists/tuples/sets/dicts of those; subclasses and any other object fail the
test). ``==``, ``len``, ``sorted``, ``isinstance``, ``abs``... then see only plain values, with the
parent's builtins; the test text and its expected values never enter the sandbox, and pass/fail is
decided here. So always-equal objects, rigged subclasses, protocol objects (``__len__``,
``__index__``, ``__bool__``...), frame/``gc`` introspection, patched builtins or ``json``,
``settrace`` hooks and forged result records can at most choose the values a call returns. Tests
that cannot be split (they use ``open``/``exec``, touch solution attributes, ...) run inside the
child as before; ``CodeResult.unsplit`` flags them: those remain forgeable from inside (nonce
introspection, always-equal objects).

Each ``run_code_tests`` call starts ``python -I -S -B -c <_sandbox_child.py>`` (isolated mode: no
site-packages, so the code sees only the stdlib; no user site; PYTHON* env vars ignored) with an
empty environment except ``PATH``/``LC_ALL``, in a new session. Requests go on its stdin (never
argv/env/files), replies come back as ``<nonce> <json>`` lines on an inherited pipe fd separate from
stdout/stderr, each exactly once and in order: lines without the nonce are output, a record for a
call not yet asked or a malformed one makes the run "crashed", and so does an early exit.

As root (the usual RL box / container), enforced by the kernel:
  * cgroup: the whole run (every process, its tmpfs) shares one memory budget, ``memory_mb +
    disk_mb + 16`` MiB, and ``max_procs + 2`` tasks (v1 ``memory.limit_in_bytes`` + ``pids.max``,
    else v2 ``memory.max``/``pids.max``; an OOM kill -> "memory"). Fallback where no cgroup is
    writable (layer "cgroup" absent): per-process ``RLIMIT_AS`` and ``RLIMIT_NPROC`` only, so forks
    can multiply memory up to ``max_procs * memory_mb``.
  * uid: a fresh uid from a private range (not 0, no groups, ``no_new_privs``), unique per
    concurrent call, so the code cannot signal, ptrace or read ``/proc/<pid>/environ`` of (or
    kill) its parent.
  * pid namespace: the code is pid 1 with its own ``/proc`` (host processes invisible); when it
    exits or is killed the kernel kills everything it forked, ``setsid`` or not. A root launcher
    outside relays its status; ``PR_SET_PDEATHSIG`` kills the namespace if the launcher dies.
  * ``RLIMIT_NPROC`` (default 32 tasks, counted per uid -- hence a uid per call; root ignores
    NPROC): fork bombs stall.
  * network namespace: only a down loopback; ``connect`` to anything, 127.0.0.1 and abstract Unix
    sockets included, fails. Also ipc and uts namespaces.
  * minimal root (``pivot_root``, layer "root"): a size-capped tmpfs (``disk_mb``) holding only the
    stdlib, system libraries and ``ld.so.cache`` read-only, ``/dev/{null,zero,random,urandom}``, its
    own ``/proc``, and the writable ``/sandbox`` (cwd, ``HOME``, ``TMPDIR``) and ``/tmp``; no host file
    or path-based Unix socket is visible. Fallback: the host tree, every mount re-mounted read-only
    in the private mount namespace, with the tmpfs at the sandbox directory.
  * seccomp (after ``no_new_privs``; x86_64/aarch64): ``unshare``/``setns``/``clone`` with any
    ``CLONE_NEW*`` flag, ``ptrace``, ``process_vm_*``, ``mount`` and the new mount API, ``pivot_root``,
    ``chroot``, ``bpf``, ``io_uring_*``, ``userfaultfd``, ``perf_event_open``, ``keyctl``/``add_key``/
    ``request_key``, ``open_by_handle_at``, module loading and ``kexec`` fail with EPERM (``clone3``:
    ENOSYS, so libc falls back to ``clone``); another ABI's syscalls kill. Applied without root too.
Always:
  * ``RLIMIT_AS`` = ``memory_mb`` (beyond it ``MemoryError`` -> "memory"), ``RLIMIT_CPU`` =
    ceil(``timeout_s``) + 1 s, ``RLIMIT_FSIZE`` (per file), ``RLIMIT_NOFILE``, no core files.
  * The parent enforces the wall-clock ``timeout_s`` (start-up included) by ``SIGKILL`` of the
    process group and of every process in the run's cgroup (without one: still owned by its uid).
  * The parent reads at most ``max_output_bytes`` of stdout+stderr and per result record, killing
    the child beyond it ("output_limit"); its own memory stays bounded.
Best effort (Python-level, bypassable with ``_socket``/``ctypes``/``_posixsubprocess``), where the
kernel layers are missing (not root, or ``unshare`` refused): ``socket.socket`` raises, and without
the pid namespace or uid drop ``os.fork``/``os.system``/``subprocess`` raise too. Without root,
``RLIMIT_NPROC`` counts all the user's processes, files have only ordinary permissions and the
network is not isolated: protection against accidents, not against an adversary.

NOT defended: a solution that reads the expected answer from its own inputs or is otherwise right
for the wrong reasons (tests that pass a reference answer as an argument, a helper in the prompt the
solution rewrites, ...); in-place mutation of arguments is not seen by split tests (they get a copy).
Tests themselves are trusted (they come with the data set): split ones run in this process with a
reduced set of builtins, which is no boundary against a malicious test, and with no time limit of
their own between calls.
"""
from __future__ import annotations

import builtins
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import importlib
import json
import logging
import marshal
import math
import os
import random
import re
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Sequence

import numpy as np

from rlhfjax.rewards import _sandbox_codec as _codec
from rlhfjax.rewards import _sandbox_split as _split


STATUSES = ("ok", "failed", "timeout", "memory", "crashed", "syntax_error", "output_limit")

_HERE = os.path.dirname(os.path.abspath(__file__))
_NOBODY = 65534
# Candidate private uid ranges (start, size); the first one inside this user namespace's uid_map
# is used. Falls back to nobody (shared NPROC accounting) if none fits.
_UID_RANGES = ((1_000_000_000, 1 << 20), (40_000, 20_000))
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()
_uids_issued: set[int] = set()  # every uid this process has handed out (for stray checks)


@dataclasses.dataclass(frozen=True)
class CodeResult:
  """Outcome of one sandboxed run: ``passed`` of ``total`` tests (0 unless the solution itself ran);
  ``status`` one of ``STATUSES`` ("ok" = all passed); the first bytes of the child's ``stdout`` and
  ``stderr`` (decoded, for debugging); ``error`` a short reason (first failing exception, setup
  error, ...); ``wall_s`` wall-clock seconds; ``layers`` the isolation layers that were active
  (e.g. ``("cgroup", "netns", "mountns", "pidns", "rofs", "root", "uid", "seccomp")``); ``unsplit`` the
  indices of tests that could not be split and ran inside the sandbox (forgeable from inside)."""

  passed: int
  total: int
  status: str
  stdout: str = ""
  stderr: str = ""
  error: str = ""
  wall_s: float = 0.0
  layers: tuple[str, ...] = ()
  unsplit: tuple[int, ...] = ()

  @property
  def fraction(self) -> float:
    """passed/total (0 for an empty test list)."""
    return self.passed / self.total if self.total else 0.0


@functools.lru_cache(maxsize=None)
def _read_child_source() -> str:
  with open(os.path.join(_HERE, "_sandbox_codec.py")) as codec, open(os.path.join(_HERE, "_sandbox_child.py")) as child:
    return codec.read() + "\n" + child.read()


def _uid_range() -> tuple[int, int] | None:
  try:
    with open("/proc/self/uid_map") as f:
      mapped = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
  except OSError:
    return None
  for start, size in _UID_RANGES:
    for inside, _, count in mapped:
      if inside <= start and start + size <= inside + count:
        return start, size
  return None


def _acquire_uid() -> int | None:
  if os.geteuid() != 0:
    return None
  rng = _uid_range()
  if rng is None:
    return _NOBODY
  start, size = rng
  with _uid_lock:
    while True:  # random so that separate processes on one host rarely collide
      uid = start + random.randrange(size)
      if uid not in _uids_in_use:
        _uids_in_use.add(uid)
        _uids_issued.add(uid)
        return uid


def _release_uid(uid: int | None) -> None:
  with _uid_lock:
    _uids_in_use.discard(uid)


def _processes():
  """``(pid, real uid, is_zombie)`` of every process whose ``/proc`` status is readable."""
  for entry in os.listdir("/proc"):
    if not entry.isdigit():
      continue
    try:
      with open(f"/proc/{entry}/status") as f:
        fields = dict(line.split(":", 1) for line in f if line.startswith(("State:", "Uid:")))
      proc = int(entry), int(fields["Uid"].split()[0]), fields["State"].strip().startswith("Z")
    except (OSError, ValueError, KeyError):
      continue
    yield proc


def _pids_of_uid(uid: int) -> list[int]:
  """Live (non-zombie) processes whose real uid is ``uid``."""
  return [pid for pid, owner, zombie in _processes() if owner == uid and not zombie]


def stray_sandbox_processes() -> list[int]:
  """Pids of processes (zombies included) owned by the sandbox uids this process has handed out:
  empty between its runs. Other processes' sandboxes (a second test worker, a second scorer on the
  host) are theirs to check."""
  with _uid_lock:
    issued = set(_uids_issued)
  return [pid for pid, owner, _ in _processes() if owner in issued]


def _kill_uid(uid: int | None) -> None:
  """SIGKILLs every process owned by ``uid`` (repeats: a fork bomb may race the sweep)."""
  if uid in (None, 0, _NOBODY):  # never sweep a shared uid
    return
  for _ in range(50):
    pids = _pids_of_uid(uid)
    if not pids:
      return
    for pid in pids:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.01)


def _kill_run(uid: int | None, cgroups: Sequence[str], spare: int | None = None) -> None:
  """SIGKILLs the run's processes (but ``spare``): those in its cgroup, else those of its uid."""
  if not cgroups:
    return _kill_uid(uid)
  for _ in range(50):
    pids = []
    with contextlib.suppress(OSError), open(f"{cgroups[-1]}/cgroup.procs") as f:
      pids = [int(x) for x in f.read().split() if int(x) != spare]
    if not pids:
      return
    for pid in pids:
      with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signal.SIGKILL)
    time.sleep(0.002)


def _own_cgroup(controller: str) -> str | None:
  """This process's cgroup path in the v1 hierarchy of ``controller`` ("" = the v2 tree)."""
  with contextlib.suppress(OSError), open("/proc/self/cgroup") as f:
    for line in f:
      _, names, path = line.rstrip("\n").split(":", 2)
      if (controller in names.split(",")) if controller else not names:
        return path.rstrip("/")
  return None


def _make_cgroups(memory_bytes: int, tasks: int) -> list[str]:
  """Creates this run's cgroup(s) below our own, holding the whole run to ``memory_bytes`` and
  ``tasks``: v1 ``memory`` + ``pids`` controllers, else v2; [] where neither is writable."""
  name = "rlhfjax-sbx-" + secrets.token_hex(8)
  mem, pids, unified = _own_cgroup("memory"), _own_cgroup("pids"), _own_cgroup("")
  options = []
  if mem is not None and pids is not None:
    options.append([(f"/sys/fs/cgroup/memory{mem}/{name}", (("memory.limit_in_bytes", memory_bytes),
                                                             ("memory.memsw.limit_in_bytes", memory_bytes))),
                    (f"/sys/fs/cgroup/pids{pids}/{name}", (("pids.max", tasks),))])
  if unified is not None:
    options.append([(f"/sys/fs/cgroup{unified}/{name}", (("memory.max", memory_bytes), ("memory.swap.max", 0),
                                                         ("pids.max", tasks)))])
  for dirs in options:
    made = []
    try:
      for d, limits in dirs:
        if not os.path.exists(f"{os.path.dirname(d)}/cgroup.procs"):
          raise FileNotFoundError(d)  # not a cgroup hierarchy
        os.mkdir(d)
        made.append(d)
        for key, value in limits:
          if key not in ("memory.memsw.limit_in_bytes", "memory.swap.max") or os.path.exists(f"{d}/{key}"):
            with open(f"{d}/{key}", "r+") as f:  # r+: never create a plain file
              f.write(str(value))
      return made
    except OSError:
      _remove_cgroups(made)
  return []


def _remove_cgroups(dirs: Sequence[str]) -> None:
  for d in dirs:
    for _ in range(100):  # EBUSY until the last task of the run is reaped
      try:
        os.rmdir(d)
        break
      except FileNotFoundError:
        break
      except OSError:
        time.sleep(0.01)


def _oom_killed(dirs: Sequence[str]) -> bool:
  for d in dirs:
    for name in ("memory.oom_control", "memory.events"):
      with contextlib.suppress(OSError), open(f"{d}/{name}") as f:
        if any(line.split()[:1] == ["oom_kill"] and int(line.split()[1]) > 0 for line in f):
          return True
  return False


def run_code_tests(
    code: str,
    tests: Sequence[str],
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 256,
    max_output_bytes: int = 1 << 20,
    max_procs: int = 32,
    disk_mb: int = 16,
    max_file_bytes: int = 8 << 20,
    max_open_files: int = 64,
) -> CodeResult:
  """Executes ``code`` in a sandbox, then each test (a Python snippet, usually one ``assert``).

  Tests that ``_sandbox_split.plan`` can split run in this process, their calls into the solution
  in the sandbox; the others run inside it, in the solution's namespace (``CodeResult.unsplit``).

  Args:
    code: the solution source (module level; its ``__name__`` is ``"solution"``, so an
      ``if __name__ == "__main__":`` block does not run).
    tests: snippets run in order; each passes if it raises nothing. Names they assign stay
      visible to later tests run on the same side.
    timeout_s: wall-clock limit for the whole run, interpreter start-up included.
    memory_mb: address-space limit (``RLIMIT_AS``) of each sandboxed process; as root the whole
      run (all its processes and its tmpfs) is also held to ``memory_mb + disk_mb`` (+16) MiB.
    max_output_bytes: stdout+stderr bytes read before the run is killed ("output_limit"); also the
      largest single result record.
    max_procs: ``RLIMIT_NPROC`` (tasks of the sandbox uid, threads included) and ``pids.max``.
    disk_mb: size of the writable tmpfs root (root only).
    max_file_bytes, max_open_files: ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``.

  Returns a ``CodeResult``; never raises for anything the code does.
  """
  tests = list(tests)
  total = len(tests)
  nonce = secrets.token_hex(16)
  uid = _acquire_uid()
  workdir = tempfile.mkdtemp(prefix="rlhfjax-sbx-")
  os.chmod(workdir, 0o755)
  cgroups = _make_cgroups((memory_mb + disk_mb + 16) << 20, max_procs + 2) if uid is not None else []
  if uid is not None:
    os.chown(workdir, uid, uid)  # used as-is only if the mount namespace is unavailable
  result_r, result_w = os.pipe()
  config = {
      "nonce": nonce, "code": code, "uid": uid, "workdir": workdir, "disk_mb": disk_mb, "result_fd": result_w,
      "limits": {"cpu_s": int(math.ceil(timeout_s)) + 1, "as_bytes": int(memory_mb) << 20,
                 "fsize_bytes": int(max_file_bytes), "nofile": int(max_open_files), "nproc": int(max_procs)},
      "cgroups": [f"{d}/cgroup.procs" for d in cgroups],
  }
  start = time.monotonic()
  proc = None
  try:
    try:
      proc = subprocess.Popen(
          [os.path.realpath(sys.executable), "-I", "-S", "-B", "-c", _read_child_source()],
          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
          pass_fds=(result_w,), cwd=workdir, env={"PATH": "/usr/bin:/bin", "LC_ALL": "C.UTF-8"},
          start_new_session=True, close_fds=True)
    finally:
      os.close(result_w)
    channel = _Channel(proc, result_r, nonce, start + timeout_s, max_output_bytes)
    channel.send(config)
    outcome = _drive(channel, tests)
    with contextlib.suppress(OSError):
      proc.stdin.close()  # the child exits at end of input
    # Kill the sandboxed processes first, so the launcher reaps its child and exits on its own
    # (killing the launcher first would leave the namespace's init for the host's pid 1 to reap).
    _kill_run(uid, cgroups, spare=proc.pid)
    try:
      returncode = proc.wait(timeout=1.0)
    except subprocess.TimeoutExpired:
      _kill_group(proc)
      returncode = proc.wait()
    _kill_run(uid, cgroups)
    return _result(channel, outcome, total, returncode, time.monotonic() - start, _oom_killed(cgroups))
  finally:
    if proc is not None:
      if proc.returncode is None:  # not reaped yet, so its pgid cannot have been reused
        _kill_group(proc)
      proc.wait()
      for f in (proc.stdin, proc.stdout, proc.stderr):  # all pipes, never None
        with contextlib.suppress(OSError):
          f.close()
    with contextlib.suppress(OSError):
      os.close(result_r)
    _kill_run(uid, cgroups)
    _release_uid(uid)
    _remove_cgroups(cgroups)
    shutil.rmtree(workdir, ignore_errors=True)


def _kill_group(proc: subprocess.Popen) -> None:
  # The session leader is never reaped before this (we only ever waitid(..., WNOWAIT)), so its
  # pid, which is also the process-group id, cannot have been reused.
  with contextlib.suppress(ProcessLookupError, PermissionError):
    os.killpg(proc.pid, signal.SIGKILL)


def _exited(proc: subprocess.Popen) -> bool:
  try:
    info = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
  except ChildProcessError:
    return True
  return info is not None


_STREAM_KEEP = 8 << 10  # bytes of stdout/stderr kept for the CodeResult


class _Abort(BaseException):
  """The run ended (timeout, output limit, exit, tampering): unwinds a test running here."""


class _Channel:
  """The parent's end of one run: JSON requests to the child's stdin, ``<nonce> <json>`` records
  from the result pipe (other lines count as output), stdout/stderr drained and capped, every wait
  bounded by the deadline. ``failure``: None, "timeout", "output_limit", "exited" or "tamper"."""

  def __init__(self, proc, result_r, nonce, deadline, max_output_bytes):
    self.proc, self.prefix, self.deadline, self.max_output = proc, nonce.encode() + b" ", deadline, max_output_bytes
    self.bufs = {"out": bytearray(), "err": bytearray(), "junk": bytearray()}
    self.res, self.outbox, self.events = bytearray(), bytearray(), collections.deque()
    self.output_bytes, self.k, self.memory, self.exit_seen_at = 0, 0, False, None
    self.failure, self.error, self.layers = None, "", ()
    self.sel = selectors.DefaultSelector()
    for fd, name in ((proc.stdout.fileno(), "out"), (proc.stderr.fileno(), "err"), (result_r, "res")):
      os.set_blocking(fd, False)
      self.sel.register(fd, selectors.EVENT_READ, name)
    os.set_blocking(proc.stdin.fileno(), False)

  def send(self, obj) -> None:
    data = marshal.dumps(obj)
    self.outbox += len(data).to_bytes(4, "little") + data

  def recv(self) -> dict | None:
    """The next record, or None once the run has ended."""
    while not self.events and self.failure is None:
      self._pump()
    return self.events.popleft() if self.events and self.failure in (None, "exited") else None

  def call(self, request: dict) -> dict:
    """Sends ``request`` under the next call index and a fresh token; the child's reply to exactly it."""
    if self.events:  # records before their request (e.g. forged for later calls)
      self.failure, self.error = "tamper", "result record before its request"
      raise _Abort
    k, self.k, token = self.k, self.k + 1, secrets.token_hex(8)  # token: no reply before its request
    self.send({**request, "k": k, "t": token})
    event = self.recv()
    if event is None:
      raise _Abort
    if event.get("event") != "reply" or event.get("k") != k or event.get("t") != token:
      self.failure, self.error = "tamper", "unexpected result record"
      raise _Abort
    self.memory |= bool(event.get("memory"))
    return event

  def _pump(self) -> None:
    now = time.monotonic()
    if now >= self.deadline:
      self.failure = "timeout"
      return
    if self.exit_seen_at is None and _exited(self.proc):
      self.exit_seen_at = now
    if len(self.sel.get_map()) < 3 or self.exit_seen_at is not None and now - self.exit_seen_at > 0.5:
      self.failure = "exited"  # result pipe closed, or leader gone and something holds the pipes
      return
    if self.outbox:
      try:
        del self.outbox[:os.write(self.proc.stdin.fileno(), self.outbox)]
      except BlockingIOError:
        pass
      except OSError:  # the child stopped reading: it is gone or going
        self.outbox.clear()
    wait = 0.002 if self.outbox else 0.05  # the pipe to the child was full: retry soon
    for key, _ in self.sel.select(timeout=min(wait, max(self.deadline - now, 0.0))):
      try:
        chunk = os.read(key.fd, 65536)
      except BlockingIOError:
        continue
      except OSError:
        chunk = b""
      if not chunk:
        self.sel.unregister(key.fd)
      elif key.data == "res":
        self.res += chunk
        *lines, rest = self.res.split(b"\n")
        self.res = bytearray(rest)
        for line in lines:
          if not line.startswith(self.prefix):
            self._output("junk", line + b"\n")
            continue
          try:
            self.events.append(dict(json.loads(line[len(self.prefix):])))
          except (ValueError, TypeError, RecursionError):
            self.events.append({"event": "malformed"})
        if len(self.res) > max(self.max_output, 1 << 16):
          self.failure = "output_limit"
      else:
        self._output(key.data, chunk)

  def _output(self, name, chunk) -> None:
    self.output_bytes += len(chunk)
    self.bufs[name] += chunk[:max(_STREAM_KEEP - len(self.bufs[name]), 0)]
    if self.output_bytes > self.max_output:
      self.failure = "output_limit"


def _short(exc: BaseException) -> str:
  return (type(exc).__name__ + ": " + str(exc))[:300]


def _raised(event: dict) -> Exception:
  """The exception a sandboxed call raised, as a builtin exception (RuntimeError if none fits)."""
  cls, msg = getattr(builtins, str(event.get("raised")), None), str(event.get("error", "")).split(": ", 1)[-1]
  try:
    return cls(msg) if isinstance(cls, type) and issubclass(cls, Exception) else RuntimeError(msg)
  except Exception:  # pylint: disable=broad-except
    return RuntimeError(msg)


def _drive(channel: _Channel, tests: list[str]) -> tuple[int, str | None, str, tuple[int, ...]]:
  """Runs the tests over the channel: ``(passed, terminal record or None, error, unsplit)``."""
  event = channel.recv()
  if event and event.get("event") == "start":
    channel.layers = tuple(str(x) for x in event.get("layers", ()))
    event = channel.recv()
  kind = event and event.get("event")
  if kind != "ready":
    error = str(event.get("error", ""))[:300] if event else ""
    channel.memory |= bool(event and event.get("memory"))
    return 0, (kind if kind in ("syntax_error", "solution_error", "setup_error") else "tamper" if kind else None), \
        error, ()

  def call_solution(name, args, kwargs):
    ref = lambda x: x.name if type(x) is _split.SolutionCall else None
    try:
      request = {"f": name, "a": _codec.encode(list(args), ref), "kw": _codec.encode(kwargs, ref)}
    except (TypeError, ValueError) as e:
      raise TypeError(f"argument of {name}() is not plain data: {e}") from None
    event = channel.call(request)
    if "raised" in event:
      raise _raised(event)
    try:
      return _codec.decode(event.get("value"))
    except (ValueError, TypeError, RecursionError) as e:
      raise TypeError(f"{name}() returned {e}") from None

  env = {"__builtins__": _split.PARENT_BUILTINS}
  passed, error, unsplit = 0, "", []
  for i, test in enumerate(tests):
    plan = _split.plan(test, {k for k, v in env.items() if type(v) is not _split.SolutionCall}, f"<test {i}>")
    failure = None
    try:
      if plan is None:
        unsplit.append(i)
        event = channel.call({"src": test})
        failure = None if event.get("ok") is True else str(event.get("error"))[:300]
      else:
        env.update({name: _split.SolutionCall(call_solution, name) for name in plan[1]})
        env.update({name: importlib.import_module(name) for name in plan[2]})
        exec(plan[0], env)  # pylint: disable=exec-used
    except _Abort:
      break
    except (Exception, SystemExit) as e:  # pylint: disable=broad-except
      failure = _short(e)
    if channel.failure:  # a test that swallowed _Abort
      break
    passed += failure is None
    error = error or failure or ""
  return passed, None, error, tuple(unsplit)


def _result(channel: _Channel, outcome, total: int, returncode: int, wall_s: float, oom: bool) -> CodeResult:
  passed, terminal, error, unsplit = outcome
  stdout, stderr = (channel.bufs[k].decode("utf-8", "replace") for k in ("out", "err"))
  failure, memory = channel.failure, channel.memory or oom
  if terminal == "setup_error":
    logging.warning("code sandbox set-up failed: %s", error)
  if failure == "output_limit" or failure == "timeout":
    status, passed = failure, 0
  elif terminal == "syntax_error":
    status = "syntax_error"
  elif terminal in ("tamper", "setup_error") or failure == "tamper":
    status, passed, error = "crashed", 0, error or channel.error
  elif terminal == "solution_error":
    status = "memory" if memory else "crashed"
  elif failure == "exited":
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
      status, why = "timeout", "CPU time limit"
    else:
      status, why = "memory" if memory or "MemoryError" in stderr else "crashed", f"exit status {returncode}"
    error = error or why
  else:
    status = "memory" if memory else "ok" if passed == total else "failed"
  return CodeResult(passed, total, status, stdout, stderr, error, wall_s, channel.layers, unsplit)


class CodeSandboxPool:
  """Scores many (code, tests) pairs in parallel, one sandboxed process per pair.

  ``max_workers`` (default: the cores this process may run on) bounds concurrent sandboxes; the
  threads mostly wait on them (split tests' comparisons run in the threads, under the GIL).
  ``run_kwargs`` (timeout_s, memory_mb, ...) are defaults for ``run_code_tests``.
  """

  def __init__(self, max_workers: int | None = None, **run_kwargs: Any):
    self.max_workers = max_workers or len(os.sched_getaffinity(0))
    self.run_kwargs = run_kwargs
    self._executor = concurrent.futures.ThreadPoolExecutor(self.max_workers, thread_name_prefix="sandbox")

  def run(self, codes: Sequence[str], tests: Sequence[Sequence[str]], **run_kwargs: Any) -> list[CodeResult]:
    """``run_code_tests`` for each pair, in input order."""
    if len(codes) != len(tests):
      raise ValueError(f"{len(codes)} codes but {len(tests)} test lists")
    kwargs = {**self.run_kwargs, **run_kwargs}
    futures = [self._executor.submit(run_code_tests, c, t, **kwargs) for c, t in zip(codes, tests)]
    return [f.result() for f in futures]

  def close(self) -> None:
    self._executor.shutdown(wait=True)

  def __enter__(self) -> "CodeSandboxPool":
    return self

  def __exit__(self, *exc) -> None:
    self.close()


_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str) -> str:
  """The code in a completion: the last ```python (or unlabeled) fenced block after any
  ``</thinking>``; the last fenced block of any language otherwise; else the raw text."""
  text = completion.rsplit("</thinking>", 1)[-1]
  blocks = _FENCE_RE.findall(text)
  for lang, body in reversed(blocks):
    if lang.lower() in ("python", "py", "python3", ""):
      return body
  return blocks[-1][1] if blocks else text


_default_pool: CodeSandboxPool | None = None
_default_pool_lock = threading.Lock()


def _get_default_pool() -> CodeSandboxPool:
  global _default_pool
  with _default_pool_lock:
    if _default_pool is None:
      _default_pool = CodeSandboxPool()
    return _default_pool


def code_reward_fn(prompts: Sequence[str], completions: Sequence[str], tests: Sequence[Sequence[str]] | None = None,
                   *, pool: CodeSandboxPool | None = None, **unused_fields: Any) -> np.ndarray:
  """Contract-style code reward: fraction of ``tests`` passed by the completion's code.

  "ok" and "failed" runs score ``passed/total``; every other status (timeout, memory, crashed,
  syntax_error, output_limit) scores 0. NaN where an example has no tests (``None`` or empty).
  """
  del prompts, unused_fields
  n = len(completions)
  scores = np.full([n], np.nan, np.float32)
  if tests is None:
    return scores
  if len(tests) != n:
    raise ValueError(f"{n} completions but {len(tests)} test lists")
  idx = [i for i in range(n) if tests[i]]
  results = (pool or _get_default_pool()).run([extract_code(completions[i]) for i in idx], [tests[i] for i in idx])
  for i, r in zip(idx, results):
    scores[i] = r.fraction if r.status in ("ok", "failed") else 0.0
  return scores
