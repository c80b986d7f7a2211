"""Code sandbox: correct/partial/broken code, and each attack contained with reward 0."""
import json
import os
import socket
import threading
import time
import uuid

import numpy as np
import pytest

from rlhfjax.rewards import sandbox
from rlhfjax.rewards.sandbox import CodeSandboxPool, code_reward_fn, extract_code, run_code_tests

IS_ROOT = os.geteuid() == 0
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(10, 5) == 15"]


def _reward(code, tests, **kw):
  pool = CodeSandboxPool(1, **kw)
  try:
    return float(code_reward_fn([""], [f"```python\n{code}\n```"], tests=[tests], pool=pool)[0])
  finally:
    pool.close()


@pytest.fixture(autouse=True)
def no_strays():
  yield
  assert sandbox.stray_sandbox_processes() == []


def test_correct_code_passes_all():
  r = run_code_tests("def add(a, b):\n  return a + b\n", ADD_TESTS)
  assert (r.passed, r.total, r.status) == (3, 3, "ok")
  if IS_ROOT:
    assert {"netns", "mountns", "pidns", "rofs", "uid"} <= set(r.layers)


def test_partially_correct_code():
  r = run_code_tests("def add(a, b):\n  return abs(a) + b\n", ADD_TESTS)
  assert (r.passed, r.total, r.status) == (2, 3, "failed")
  assert _reward("def add(a, b):\n  return abs(a) + b\n", ADD_TESTS) == pytest.approx(2 / 3)


def test_syntax_error():
  r = run_code_tests("def add(a, b)\n  return a + b\n", ADD_TESTS)
  assert (r.passed, r.status) == (0, "syntax_error")


def test_solution_raising_at_import_or_exiting_is_crashed():
  assert run_code_tests("raise RuntimeError('x')", ADD_TESTS).status == "crashed"
  assert run_code_tests("import sys; sys.exit(0)", ADD_TESTS).status == "crashed"
  # os._exit inside a test must not count as a pass of the remaining tests.
  r = run_code_tests("import os\ndef add(a, b):\n  os._exit(0)\n", ADD_TESTS)
  assert (r.passed, r.status) == (0, "crashed")


def test_stdlib_imports_work_after_privilege_drop():
  code = "import heapq, fractions, decimal, itertools, bisect, statistics, textwrap, unittest\n" \
         "def add(a, b):\n  return int(fractions.Fraction(a) + b)\n"
  assert run_code_tests(code, ADD_TESTS).status == "ok"


def test_main_block_does_not_run():
  code = "def add(a, b):\n  return a + b\nif __name__ == '__main__':\n  input()\n"
  assert run_code_tests(code, ADD_TESTS).status == "ok"


def test_infinite_loop_times_out():
  t0 = time.monotonic()
  r = run_code_tests("while True:\n  pass\n", ADD_TESTS, timeout_s=1.0)
  assert r.status == "timeout" and r.passed == 0
  assert time.monotonic() - t0 < 1.0 + 1.5
  # A loop inside a test also times out.
  r = run_code_tests("def add(a, b):\n  while True: pass\n", ADD_TESTS, timeout_s=1.0)
  assert r.status == "timeout"


def test_memory_bomb():
  r = run_code_tests("x = bytearray(10 ** 10)\ndef add(a, b): return a + b", ADD_TESTS, memory_mb=128)
  assert r.status == "memory" and r.passed == 0
  r = run_code_tests("chunks = []\nwhile True:\n  chunks.append(bytearray(10 ** 7))\n", ADD_TESTS, memory_mb=128)
  assert r.status == "memory"
  assert _reward("x = 'a' * (10 ** 10)\ndef add(a, b): return a + b", ADD_TESTS, memory_mb=128) == 0.0


@pytest.mark.skipif(not IS_ROOT, reason="kernel-enforced process containment needs root (see sandbox docs)")
def test_fork_bomb_contained_and_cleaned_up():
  code = (
      "import os\n"
      "def add(a, b):\n"
      "  while True:\n"
      "    try:\n"
      "      if os.fork() == 0:\n"
      "        os.setsid()\n"  # try to escape the process group
      "    except OSError:\n"
      "      pass\n"
  )
  t0 = time.monotonic()
  r = run_code_tests(code, ADD_TESTS, timeout_s=1.5, max_procs=16)
  assert r.status == "timeout" and r.passed == 0
  assert time.monotonic() - t0 < 1.5 + 2.0
  assert sandbox.stray_sandbox_processes() == []


def test_cannot_write_outside_its_directory(tmp_path):
  target_dir = f"/tmp/rlhfjax-pwn-{uuid.uuid4().hex}"
  repo_file = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), f"pwned-{uuid.uuid4().hex}")
  code = (
      "import os\n"
      "wrote = []\n"
      f"for path in [{target_dir + '/pwned'!r}, {repo_file!r}, {str(tmp_path / 'pwned')!r}, '/var/tmp/pwned', '/dev/shm/pwned']:\n"
      "  try:\n"
      "    os.makedirs(os.path.dirname(path), exist_ok=True)\n"
      "    open(path, 'w').write('x')\n"
      "    wrote.append(path)\n"
      "  except OSError:\n"
      "    pass\n"
      "open('scratch.txt', 'w').write('inside is fine')\n"
      "def add(a, b): return a + b\n"
  )
  # Inside the minimal root /tmp is a private tmpfs (writes there are fine, also to a checkout under
  # /tmp); the host paths must stay untouched, and nothing outside the writable tmpfs may be created.
  r = run_code_tests(code, ["assert open('scratch.txt').read() == 'inside is fine'",
                            "assert {p for p in wrote if not p.startswith('/tmp/')}, wrote"])
  assert (r.passed, r.status) == (1, "failed"), r
  for path in (target_dir, repo_file, tmp_path / "pwned"):
    assert not os.path.exists(path)


def test_no_network():
  listener = socket.socket()
  listener.bind(("127.0.0.1", 0))
  listener.listen(1)
  listener.settimeout(0.2)
  port = listener.getsockname()[1]
  code = (
      "import socket, _socket\n"
      "connected = []\n"
      "for make in (lambda: socket.create_connection(('127.0.0.1', PORT), timeout=1),\n"
      "             lambda: _socket.socket(_socket.AF_INET, _socket.SOCK_STREAM)):\n"
      "  try:\n"
      "    s = make()\n"
      "    s.settimeout(1)\n"
      "    s.connect(('127.0.0.1', PORT))\n"
      "    connected.append(True)\n"
      "  except OSError:\n"
      "    pass\n"
  ).replace("PORT", str(port))
  try:
    r = run_code_tests(code, ["assert connected"])
    assert (r.passed, r.status) == (0, "failed"), r
    with pytest.raises(socket.timeout):
      listener.accept()
  finally:
    listener.close()


def test_cannot_read_parent_environment(monkeypatch):
  secret = f"s3cr3t-{uuid.uuid4().hex}"
  monkeypatch.setenv("RLHFJAX_TEST_SECRET", secret)
  code = (
      "import os, glob\n"
      "found = [v for v in os.environ.values() if v.startswith('s3cr3t-')]\n"
      "for p in glob.glob('/proc/*/environ'):\n"
      "  try:\n"
      "    if b's3cr3t-' in open(p, 'rb').read(): found.append(p)\n"
      "  except OSError:\n"
      "    pass\n"
      "print(found)\n"
  )
  r = run_code_tests(code, ["assert found"])
  assert (r.passed, r.status) == (0, "failed"), r
  assert secret not in r.stdout and secret not in r.stderr


def test_printing_gigabytes_hits_output_limit():
  t0 = time.monotonic()
  r = run_code_tests("import sys\nwhile True:\n  sys.stdout.write('x' * 1000000)\n", ADD_TESTS, timeout_s=10.0)
  assert r.status == "output_limit" and r.passed == 0
  assert time.monotonic() - t0 < 5.0
  assert len(r.stdout) <= 8 << 10
  r = run_code_tests("import os\nwhile True:\n  os.write(2, b'y' * 65536)\n", ADD_TESTS, timeout_s=10.0)
  assert r.status == "output_limit"


def test_cannot_kill_parent():
  parent = os.getpid()
  code = (
      "import os, signal\n"
      "for pid in (os.getppid(), PARENT, 1, -1, 0):\n"
      "  try:\n"
      "    os.kill(pid, signal.SIGKILL)\n"
      "  except OSError:\n"
      "    pass\n"
      "def add(a, b): return a + b\n"
  ).replace("PARENT", str(parent))
  r = run_code_tests(code, ADD_TESTS)
  assert os.getpid() == parent  # still here
  assert r.status in ("ok", "crashed")  # killing its own namespace is allowed; the parent survives


def test_fake_results_on_stdout_and_guessed_fds_do_not_score():
  code = (
      "import os, json\n"
      "fake = json.dumps({'event': 'done', 'memory': False})\n"
      "print('{\"passed\": 3, \"total\": 3, \"status\": \"ok\"}')\n"
      "for fd in range(3, 64):\n"
      "  for i in range(3):\n"
      "    try: os.write(fd, (json.dumps({'event': 'test', 'i': i, 'ok': True}) + '\\n').encode())\n"
      "    except OSError: pass\n"
      "  try: os.write(fd, (fake + '\\n').encode())\n"
      "  except OSError: pass\n"
      "os._exit(0)\n"
  )
  r = run_code_tests(code, ADD_TESTS)
  assert r.passed == 0 and r.status == "crashed"


def test_pool_scores_batch_in_parallel():
  good = "def add(a, b):\n  return a + b\n"
  codes = [good, "def add(a, b):\n  return a * b if a < 0 else a + b\n", "def add(a, b) return", "while True: pass", good]
  with CodeSandboxPool(2, timeout_s=1.0) as pool:
    t0 = time.monotonic()
    results = pool.run(codes, [ADD_TESTS] * len(codes))
    assert time.monotonic() - t0 < 4.0
  assert [r.status for r in results] == ["ok", "failed", "syntax_error", "timeout", "ok"]
  completions = [f"<thinking>easy</thinking>\n```python\n{c}```" for c in codes]
  with CodeSandboxPool(2, timeout_s=1.0) as pool:
    scores = code_reward_fn([""] * 5, completions, tests=[ADD_TESTS] * 4 + [[]], pool=pool)
  np.testing.assert_allclose(scores[:4], [1.0, 2 / 3, 0.0, 0.0], rtol=1e-6)
  assert np.isnan(scores[4])  # no tests: could not score


def test_extract_code():
  assert extract_code("text\n```python\nx = 1\n```\nmore") == "x = 1\n"
  assert extract_code("```python\na\n```\n```\nb\n```") == "b\n"
  assert extract_code("```python\na\n```\n```bash\nls\n```") == "a\n"
  assert extract_code("<thinking>```python\nbad\n```</thinking>```python\ngood\n```") == "good\n"
  assert extract_code("x = 1") == "x = 1"


def test_disk_filling_is_capped():
  code = (
      "import os\n"
      "written = 0\n"
      "for i in range(100):\n"
      "  try:\n"
      "    with open(f'f{i}', 'wb') as f:\n"
      "      for _ in range(8):\n"
      "        f.write(b'x' * (1 << 20)); written += 1 << 20\n"
      "  except OSError:\n"
      "    pass\n"
  )
  r = run_code_tests(code, ["assert written < (64 << 20), written"], disk_mb=16, max_file_bytes=4 << 20)
  assert r.status == "ok", r


def test_codec_round_trips_exact_types_only():
  from rlhfjax.rewards import _sandbox_codec as codec
  value = {"a": [1, 2.5, None, True, b"\x00x", "é"], (1, "t"): {3, 4}, 5: (), "nan": float("inf")}
  assert codec.decode(json.loads(json.dumps(codec.encode(value)))) == value
  for bad in (type("I", (int,), {})(1), [type("S", (str,), {})("x")], object(), {1: frozenset()}, iter([])):
    with pytest.raises(TypeError):
      codec.encode(bad)
  for bad in ({"a": 1}, ["x", 1], ["s", ["l"]], ["r", "f"], ["b", 1]):
    with pytest.raises((ValueError, TypeError)):
      codec.decode(bad)


def test_split_plan():
  from rlhfjax.rewards._sandbox_split import plan
  assert plan("assert abs(f(1) - 2) < 1e-6 and sorted(g(x=[1])) == [1]", set())[1] == {"f", "g"}
  assert plan("def check(c):\n  assert c(1) == 2\ncheck(solve)", set())[1] == {"solve"}
  assert plan("y = f(1)", set())[1] == {"f"} and plan("assert y == 2", {"y"})[1] == set()
  assert plan("assert math.isclose(f(1), 2.0)", set())[1:] == ({"f"}, {"math"})
  for unsplittable in ("assert flag", "assert obj.m() == 1", "assert open('x').read()", "import os",
                       "assert f(*xs)", "exec('f(1)')", "assert f(1 +)"):
    assert plan(unsplittable, set()) is None, unsplittable


@pytest.mark.skipif(not IS_ROOT, reason="the minimal root needs root")
def test_fallback_without_minimal_root(monkeypatch):
  src = sandbox._read_child_source().replace("          _build_root(_workdir, _uid)\n", "          raise OSError\n")
  monkeypatch.setattr(sandbox, "_read_child_source", lambda: src)
  code = "import os\ndef f(x): return 2 * x\ndef write(path): open(path, 'w').write('x')\n"
  r = run_code_tests(code, ["assert f(2) == 4", "write('/etc/rlhfjax-pwned')", "write('scratch')", "assert f(2) == 5"])
  assert (r.passed, r.status) == (2, "failed") and "root" not in r.layers and "rofs" in r.layers, r
  assert not os.path.exists("/etc/rlhfjax-pwned")
