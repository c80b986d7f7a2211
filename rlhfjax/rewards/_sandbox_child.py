"""Child side of rlhfjax.rewards.sandbox: launcher (privileged set-up) + test harness.

Not imported by the package: sandbox.py passes this file's source to ``python -I -S -B -c``.
Stdlib only. The configuration (code, tests, limits, nonce, uid) arrives as JSON on stdin; results
go, one ``<nonce> <json>`` line per event, to the inherited pipe fd ``result_fd``.
"""
import builtins
import ctypes
import json
import os
import resource
import signal
import socket
import sys

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src, target, fstype, flags, data):
  enc = lambda s: None if s is None else s.encode()
  if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
    raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _mountpoints():
  with open("/proc/self/mountinfo") as f:
    return [line.split()[4].encode().decode("unicode_escape") for line in f]  # \040 -> space


def _main():
  """Everything holding the nonce lives in this frame, not in ``__main__``'s globals."""
  _cfg = json.loads(sys.stdin.buffer.read().decode("utf-8"))
  _devnull = os.open("/dev/null", os.O_RDONLY)
  os.dup2(_devnull, 0)
  os.close(_devnull)
  _RFD = _cfg["result_fd"]
  _NONCE = _cfg["nonce"]
  _write, _dumps, _exit = os.write, json.dumps, os._exit

  def _emit(obj):
    data = (_NONCE + " " + _dumps(obj) + "\n").encode()
    while data:
      data = data[_write(_RFD, data):]

  def _fail_setup(msg):
    _emit({"event": "setup_error", "error": msg})
    _exit(3)

  _workdir = _cfg["workdir"]
  _uid = _cfg["uid"]
  _layers = []  # which isolation layers are active, reported to the parent
  _homedir = _workdir
  _prefix_bind = None

  if _uid is not None:  # running as root: namespaces, read-only filesystem, drop to _uid
    for flag, name in ((CLONE_NEWNET, "netns"), (CLONE_NEWIPC, "ipcns"), (CLONE_NEWUTS, "utsns"),
                       (CLONE_NEWNS, "mountns"), (CLONE_NEWPID, "pidns")):
      if _libc.unshare(flag) == 0:
        _layers.append(name)
    if "mountns" in _layers:
      try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates back to the host
      except OSError as e:
        _fail_setup(str(e))
      # Every mount read-only *in this namespace* (MS_BIND|MS_REMOUNT changes per-mount flags of
      # our private copies only, never the shared superblock).
      for mp in _mountpoints():
        try:
          keep = os.statvfs(mp).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
          _mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep, None)
        except OSError:
          pass
      try:
        _mount("tmpfs", _workdir, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={_cfg['disk_mb']}m,nr_inodes=4096,mode=0755")
        _homedir = os.path.join(_workdir, "work")
        os.mkdir(_homedir, 0o700)
        os.chown(_homedir, _uid, _uid)
        # The interpreter's stdlib may sit under an unreadable directory (/root/.pyenv): expose a
        # read-only bind of it inside the sandbox dir and point sys.path there.
        _prefix_bind = os.path.join(_workdir, "python")
        os.mkdir(_prefix_bind, 0o755)
        _mount(sys.base_prefix, _prefix_bind, None, MS_BIND | MS_REC, None)
        _mount(None, _prefix_bind, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, None)
        _layers.append("rofs")
      except OSError as e:
        _fail_setup(str(e))
    if "pidns" in _layers:
      _child = os.fork()
      if _child:  # launcher: stays root outside the namespace, waits, relays the exit status
        os.close(_RFD)
        try:
          _, _status = os.waitpid(_child, 0)  # retried on EINTR by Python itself (PEP 475)
        except ChildProcessError:
          _exit(3)
        _exit(os.waitstatus_to_exitcode(_status) if os.WIFEXITED(_status) else 128 + os.WTERMSIG(_status))
      # pid 1 of the new namespace: dies with the launcher; when it exits the kernel kills the rest.
      _libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
      try:
        _mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)  # hide host processes
      except OSError:
        pass

  if _prefix_bind is None:
    # No private mount to reach the stdlib through after dropping privileges: import common
    # modules now, while they are readable.
    for _m in ("math", "re", "collections", "itertools", "functools", "heapq", "bisect", "string",
               "typing", "fractions", "decimal", "random", "statistics", "operator", "copy",
               "dataclasses", "json", "datetime", "array", "enum"):
      try:
        __import__(_m)
      except ImportError:
        pass

  _lim = _cfg["limits"]
  for _res, _val in ((resource.RLIMIT_CPU, _lim["cpu_s"]), (resource.RLIMIT_FSIZE, _lim["fsize_bytes"]),
                     (resource.RLIMIT_NOFILE, _lim["nofile"]), (resource.RLIMIT_CORE, 0),
                     (resource.RLIMIT_NPROC, _lim["nproc"])):
    try:
      _hard = _val + 1 if _res == resource.RLIMIT_CPU else _val
      resource.setrlimit(_res, (_val, _hard))
    except (ValueError, OSError) as e:
      _fail_setup(f"setrlimit {_res}: {e}")

  if _uid is not None:
    try:
      os.setgroups([])
      os.setgid(_uid)
      os.setuid(_uid)
    except OSError as e:
      _fail_setup(f"drop privileges: {e}")
    if os.getuid() == 0 or os.geteuid() == 0:
      _fail_setup("still root after setuid")
    _layers.append("uid")
  _libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)  # setuid binaries cannot regain privileges

  os.chdir(_homedir)
  os.environ.clear()
  os.environ.update({"PATH": "/usr/bin:/bin", "HOME": _homedir, "TMPDIR": _homedir, "LC_ALL": "C.UTF-8"})
  if _prefix_bind is not None:
    sys.path[:] = [p.replace(sys.base_prefix, _prefix_bind, 1) if p.startswith(sys.base_prefix) else p
                   for p in sys.path]
  signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # oversize writes raise OSError instead of killing

  # Harness-level stubs: defence in depth only, bypassable from Python (``_socket``, ``ctypes``).
  class _NoSocket:
    def __init__(self, *args, **kwargs):
      raise PermissionError("network access is disabled in the sandbox")

  socket.socket = _NoSocket
  socket.create_connection = _NoSocket
  if "pidns" not in _layers or "uid" not in _layers:
    def _no_process(*args, **kwargs):
      raise PermissionError("process creation is disabled in the sandbox")

    for _name in ("fork", "forkpty", "system", "popen", "posix_spawn", "posix_spawnp", "spawnv", "spawnve",
                  "spawnl", "spawnle", "execv", "execve", "execl", "execle", "execvp", "execvpe"):
      if hasattr(os, _name):
        setattr(os, _name, _no_process)
    try:
      import subprocess
      subprocess.Popen = _no_process
    except ImportError:
      pass

  resource.setrlimit(resource.RLIMIT_AS, (_lim["as_bytes"], _lim["as_bytes"]))
  _emit({"event": "start", "layers": _layers})

  def _short(exc):
    return (type(exc).__name__ + ": " + str(exc))[:300]

  def _harness(code, tests):
    memory = False
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
      compiled = compile(code, "<solution>", "exec")
    except (SyntaxError, ValueError, OverflowError, MemoryError) as e:
      _emit({"event": "syntax_error", "error": _short(e)})
      return
    try:
      exec(compiled, namespace)  # pylint: disable=exec-used
    except BaseException as e:  # incl. SystemExit: the solution may not stop the harness
      _emit({"event": "solution_error", "memory": isinstance(e, MemoryError), "error": _short(e)})
      return
    for i, test in enumerate(tests):
      ok, err = False, None
      try:
        exec(compile(test, f"<test {i}>", "exec"), namespace)  # pylint: disable=exec-used
        ok = True
      except MemoryError as e:
        memory, err = True, _short(e)
      except BaseException as e:
        err = _short(e)
      _emit({"event": "test", "i": i, "ok": ok, "error": err})
    _emit({"event": "done", "memory": memory})

  _code, _tests = _cfg["code"], _cfg["tests"]
  del _cfg, _lim
  _harness(_code, _tests)
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:
    pass
  _exit(0)  # skip atexit handlers the solution may have registered


globals().pop("_main")()
