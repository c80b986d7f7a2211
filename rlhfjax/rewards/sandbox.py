"""Runs untrusted, model-written Python against unit tests in a separate, locked-down process.

Process-level isolation (kernel namespaces, resource limits), good enough to score RL rollouts
that may (accidentally or by reward hacking) write infinite loops, memory/fork bombs, gigabytes of
output, or code that pokes at the host. NOT a VM, nor a boundary against a kernel exploit (e.g. a
malicious ``ctypes`` payload) or side channels: run it on machines you can afford to lose if you
face adversarial code.

Each ``run_code_tests`` call starts ``python -I -S -B -c <_sandbox_child.py>`` (isolated mode: no
site-packages, so the code sees only the stdlib; no user site; PYTHON* env vars ignored) with an
empty environment except ``PATH``/``LC_ALL``, in a new session, with stdin closed.

As root (the usual RL box / container), enforced by the kernel:
  * uid: a fresh uid from a private range (not 0, no groups, ``no_new_privs``), unique per
    concurrent call, so the code cannot signal, ptrace or read ``/proc/<pid>/environ`` of (or
    kill) its parent.
  * pid namespace: the code is pid 1 with a fresh ``/proc`` (host processes invisible); when it
    exits or is killed the kernel kills everything it forked, ``setsid`` or not. A root launcher
    outside relays its status; ``PR_SET_PDEATHSIG`` kills the namespace if the launcher dies.
  * ``RLIMIT_NPROC`` (default 32 tasks, counted per uid -- hence a uid per call; root ignores
    NPROC): fork bombs stall.
  * network namespace: only a down loopback; ``connect`` to anything, 127.0.0.1 included, fails
    with "network unreachable". Also ipc and uts namespaces.
  * mount namespace: every mount re-mounted read-only (per-mount flags of the private copy; the
    host is unaffected); the only writable place is a size-capped tmpfs (``disk_mb``) at the
    sandbox directory (cwd, ``HOME``, ``TMPDIR``), gone with the namespace. The interpreter's
    stdlib is bind-mounted read-only inside it.
Always:
  * ``RLIMIT_AS`` = ``memory_mb`` (beyond it ``MemoryError`` -> "memory"), ``RLIMIT_CPU`` =
    ceil(``timeout_s``) + 1 s, ``RLIMIT_FSIZE`` (per file), ``RLIMIT_NOFILE``, no core files.
  * The parent enforces the wall-clock ``timeout_s`` (start-up included) by ``SIGKILL`` of the
    process group (and, after a uid drop, of every process still owned by that uid).
  * The parent reads at most ``max_output_bytes`` of stdout+stderr (and a bounded result
    channel), killing the child beyond it ("output_limit"); its own memory stays bounded.
Best effort (Python-level, bypassable with ``_socket``/``ctypes``/``_posixsubprocess``):
  * ``socket.socket`` raises; without the pid namespace or uid drop (not root, or ``unshare``
    refused) ``os.fork``/``os.system``/``subprocess`` raise too. Without root, ``RLIMIT_NPROC``
    counts all the user's processes, files have only ordinary permissions and the network is not
    isolated: protection against accidents, not against an adversary.

Result channel: the parent sends a random nonce with the code on stdin (never argv/env/files); the
harness reads it before running user code and reports each test as a ``<nonce> <json>`` line on an
inherited pipe fd separate from stdout/stderr. Lines without the nonce are ignored, and results
must arrive in order, exactly once, ending with a "done" record, else the run is "crashed": fake
JSON, guessed lines or an early exit do not score. NOT defended: code that introspects the
harness's frames (``sys._getframe``/``gc``) for the nonce, or games the tests themselves (an
``__eq__`` that is always true) -- in-process tests cannot rule that out; watch for it in samples.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import json
import logging
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


STATUSES = ("ok", "failed", "timeout", "memory", "crashed", "syntax_error", "output_limit")

_CHILD_SOURCE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_child.py")
_NOBODY = 65534
# Candidate private uid ranges (start, size); the first one inside this user namespace's uid_map
# is used. Falls back to nobody (shared NPROC accounting) if none fits.
_UID_RANGES = ((1_000_000_000, 1 << 20), (40_000, 20_000))
_uid_lock = threading.Lock()
_uids_in_use: set[int] = set()


@dataclasses.dataclass(frozen=True)
class CodeResult:
  """Outcome of one sandboxed run: ``passed`` of ``total`` tests (0 unless the solution itself ran);
  ``status`` one of ``STATUSES`` ("ok" = all passed); the first bytes of the child's ``stdout`` and
  ``stderr`` (decoded, for debugging); ``error`` a short reason (first failing exception, setup
  error, ...); ``wall_s`` wall-clock seconds; ``layers`` the isolation layers that were active
  (e.g. ``("netns", "mountns", "pidns", "rofs", "uid")``)."""

  passed: int
  total: int
  status: str
  stdout: str = ""
  stderr: str = ""
  error: str = ""
  wall_s: float = 0.0
  layers: tuple[str, ...] = ()

  @property
  def fraction(self) -> float:
    """passed/total (0 for an empty test list)."""
    return self.passed / self.total if self.total else 0.0


@functools.lru_cache(maxsize=None)
def _read_child_source() -> str:
  with open(_CHILD_SOURCE_PATH) as f:
    return f.read()


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


def sandbox_uid_range() -> tuple[int, int] | None:
  """``(first_uid, count)`` the sandbox drops to when running as root, or None (nobody/non-root)."""
  return _uid_range() if os.geteuid() == 0 else None


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
  """Pids of processes owned by sandbox uids (should be empty between runs)."""
  rng = sandbox_uid_range()
  if rng is None:
    return []
  start, size = rng
  return [pid for pid, owner, _ in _processes() if start <= owner < start + size]


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
  """Executes ``code`` and then each test (a Python snippet, usually one ``assert``) in a sandbox.

  Args:
    code: the solution source (module level; its ``__name__`` is ``"solution"``, so an
      ``if __name__ == "__main__":`` block does not run).
    tests: snippets run in order in the solution's namespace; each passes if it raises nothing.
    timeout_s: wall-clock limit for the whole run, interpreter start-up included.
    memory_mb: address-space limit (``RLIMIT_AS``) of each sandboxed process.
    max_output_bytes: stdout+stderr bytes read before the run is killed ("output_limit").
    max_procs: ``RLIMIT_NPROC`` (tasks of the sandbox uid, threads included).
    disk_mb: size of the writable tmpfs working directory (root only).
    max_file_bytes, max_open_files: ``RLIMIT_FSIZE``, ``RLIMIT_NOFILE``.

  Returns a ``CodeResult``; never raises for anything the code does.
  """
  tests = list(tests)
  total = len(tests)
  nonce = secrets.token_hex(16)
  uid = _acquire_uid()
  workdir = tempfile.mkdtemp(prefix="rlhfjax-sbx-")
  os.chmod(workdir, 0o755)
  if uid is not None:
    os.chown(workdir, uid, uid)  # used as-is only if the mount namespace is unavailable
  result_r, result_w = os.pipe()
  config = {
      "nonce": nonce, "code": code, "tests": tests, "uid": uid, "workdir": workdir, "disk_mb": disk_mb,
      "limits": {"cpu_s": int(math.ceil(timeout_s)) + 1, "as_bytes": int(memory_mb) << 20,
                 "fsize_bytes": int(max_file_bytes), "nofile": int(max_open_files), "nproc": int(max_procs)},
      "result_fd": result_w,
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
    return _supervise(proc, config, result_r, total, start, timeout_s, max_output_bytes, uid)
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
    _kill_uid(uid)
    _release_uid(uid)
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


def _supervise(proc, config, result_r, total, start, timeout_s, max_output_bytes, uid) -> CodeResult:
  with contextlib.suppress(OSError):  # BrokenPipeError included
    proc.stdin.write(json.dumps(config).encode("utf-8"))
    proc.stdin.close()
  nonce = config["nonce"]
  deadline = start + timeout_s
  max_result_bytes = (64 << 10) + 1024 * total
  sel = selectors.DefaultSelector()
  bufs = {"out": bytearray(), "err": bytearray(), "res": bytearray()}
  os.set_blocking(result_r, False)
  for f, name in ((proc.stdout, "out"), (proc.stderr, "err"), (result_r, "res")):
    sel.register(f, selectors.EVENT_READ, name)
  output_bytes = 0
  limit_hit = timed_out = False
  exit_seen_at = None
  while sel.get_map():
    now = time.monotonic()
    if now >= deadline:
      timed_out = True
      break
    if exit_seen_at is None and _exited(proc):
      exit_seen_at = now
    if exit_seen_at is not None and now - exit_seen_at > 0.5:
      break  # leader gone but something still holds the pipes (no pid namespace): stop reading
    for key, _ in sel.select(timeout=min(0.05, max(deadline - now, 0.0))):
      try:
        chunk = os.read(key.fd, 65536)
      except BlockingIOError:
        continue
      except OSError:
        chunk = b""
      if not chunk:
        sel.unregister(key.fileobj)
        continue
      name = key.data
      if name == "res":
        bufs["res"] += chunk
        limit_hit |= len(bufs["res"]) > max_result_bytes
      else:
        output_bytes += len(chunk)
        keep = _STREAM_KEEP - len(bufs[name])
        if keep > 0:
          bufs[name] += chunk[:keep]
        limit_hit |= output_bytes > max_output_bytes
    if limit_hit:
      break
  sel.close()
  # Kill the sandboxed processes first, so the launcher reaps its child and exits on its own
  # (killing the launcher first would leave the namespace's init for the host's pid 1 to reap).
  _kill_uid(uid)
  try:
    returncode = proc.wait(timeout=1.0)
  except subprocess.TimeoutExpired:
    _kill_group(proc)
    returncode = proc.wait()
  _kill_uid(uid)
  wall_s = time.monotonic() - start
  stdout = bufs["out"].decode("utf-8", "replace")
  stderr = bufs["err"].decode("utf-8", "replace")

  # Parse the authenticated result stream.
  passed, memory, done, layers, error = 0, False, False, (), ""
  terminal = None  # syntax_error / solution_error / setup_error / tamper
  expected = 0
  prefix = nonce + " "
  for raw in bytes(bufs["res"]).split(b"\n"):
    line = raw.decode("utf-8", "replace")
    if not line.startswith(prefix):
      continue
    if done or terminal:
      terminal, error = "tamper", "result records after the end of the run"
      break
    try:
      event = json.loads(line[len(prefix):])
      kind = event["event"]
    except (ValueError, KeyError, TypeError):
      terminal, error = "tamper", "malformed result record"
      break
    if kind == "start":
      layers = tuple(event.get("layers", ()))
    elif kind == "test":
      if event.get("i") != expected:
        terminal, error = "tamper", "out-of-order test record"
        break
      expected += 1
      passed += bool(event.get("ok"))
      if event.get("error") and not error:
        error = str(event["error"])
    elif kind == "done":
      if expected != total:
        terminal, error = "tamper", "done before all tests reported"
        break
      done, memory = True, memory or bool(event.get("memory"))
    elif kind in ("syntax_error", "solution_error", "setup_error"):
      terminal, error = kind, str(event.get("error", ""))
      memory = memory or bool(event.get("memory"))
    else:
      terminal, error = "tamper", f"unknown record {kind!r}"
      break

  def result(status, n_passed=0):
    if status == "crashed" and terminal == "setup_error":
      logging.warning("code sandbox set-up failed: %s", error)
    return CodeResult(n_passed, total, status, stdout, stderr, error, wall_s, layers)

  if limit_hit:
    return result("output_limit")
  if timed_out:
    return result("timeout")
  if terminal == "syntax_error":
    return result("syntax_error")
  if terminal in ("tamper", "setup_error"):
    return result("crashed")
  if terminal == "solution_error":
    return result("memory" if memory else "crashed")
  if not done:
    if returncode in (-signal.SIGXCPU, 128 + signal.SIGXCPU):
      status, why = "timeout", "CPU time limit"
    else:
      status, why = "crashed", f"exit status {returncode}"
    error = error or why
    return result("memory" if "MemoryError" in stderr else status, passed)
  if memory:
    return result("memory", passed)
  return result("ok" if passed == total else "failed", passed)


class CodeSandboxPool:
  """Scores many (code, tests) pairs in parallel, one sandboxed process per pair.

  Threads only wait on subprocesses, so ``max_workers`` bounds concurrent sandboxes (CPU load);
  ``run_kwargs`` (timeout_s, memory_mb, ...) are defaults for ``run_code_tests``.
  """

  def __init__(self, max_workers: int | None = None, **run_kwargs: Any):
    self.max_workers = max_workers or os.cpu_count() or 1
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
