"""Child side of rlhfjax.rewards.sandbox: launcher (privileged set-up) + call server.

Not imported by the package: sandbox.py passes ``_sandbox_codec.py`` + this file's source to
``python -I -S -B -c``. Stdlib only, and few imports (start-up time is most of a run). Requests arrive
on stdin as length-prefixed ``marshal`` data (trusted: they come from the parent; first the
configuration: code, limits, nonce, uid, cgroups); replies go, one ``<nonce> <json>`` line each, to
the inherited pipe fd ``result_fd``. A request is a call into the solution (reply: its result, encoded) or, for a test
the parent cannot split, the test's source (reply: passed or not).
"""
import _signal
import builtins
import ctypes
import marshal
import os
import resource
import struct
import sys
from _json import encode_basestring_ascii as _esc

CLONE_NEWNS, CLONE_NEWCGROUP, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x02000000, 0x04000000, 0x08000000
CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x10000000, 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
MS_REMOUNT, MS_BIND, MS_REC, MS_PRIVATE = 32, 4096, 16384, 1 << 18
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS, PR_SET_SECCOMP = 1, 38, 22
# (audit arch, syscall numbers) per machine; the seccomp filter and pivot_root need them.
_ARCH = {
    "x86_64": (0xC000003E, dict(
        ptrace=101, process_vm_readv=310, process_vm_writev=311, mount=165, umount2=166, pivot_root=155,
        chroot=161, unshare=272, setns=308, bpf=321, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, userfaultfd=323, perf_event_open=298, keyctl=250, add_key=248,
        request_key=249, open_by_handle_at=304, kexec_load=246, init_module=175, finit_module=313,
        delete_module=176, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, clone=56, clone3=435)),
    "aarch64": (0xC00000B7, dict(
        ptrace=117, process_vm_readv=270, process_vm_writev=271, mount=40, umount2=39, pivot_root=41,
        chroot=51, unshare=97, setns=268, bpf=280, io_uring_setup=425, io_uring_enter=426,
        io_uring_register=427, userfaultfd=282, perf_event_open=241, keyctl=219, add_key=217,
        request_key=218, open_by_handle_at=265, kexec_load=104, init_module=105, finit_module=273,
        delete_module=106, open_tree=428, move_mount=429, fsopen=430, fsconfig=431, fsmount=432, fspick=433,
        mount_setattr=442, clone=220, clone3=435)),
}.get(os.uname().machine)

_libc = ctypes.CDLL(None, use_errno=True)


def _mount(src, target, fstype, flags, data):
  enc = lambda s: None if s is None else s.encode()
  if _libc.mount(enc(src), enc(target), enc(fstype), ctypes.c_ulong(flags), enc(data)) != 0:
    raise OSError(ctypes.get_errno(), f"mount {target}: {os.strerror(ctypes.get_errno())}")


def _bind_ro(src, target, extra=MS_NOSUID | MS_NODEV):
  _mount(src, target, None, MS_BIND | MS_REC, None)
  _mount(None, target, None, MS_REMOUNT | MS_BIND | MS_RDONLY | extra, None)


def _to_json(x, _type=type):
  """JSON text of None/bool/int/float/str and lists/dicts of them (the json module imports re)."""
  t = _type(x)
  if x is None or t is bool:
    return "null" if x is None else "true" if x else "false"
  if t is int:
    return int.__repr__(x)
  if t is float:
    return float.__repr__(x) if x - x == 0 else "NaN" if x != x else "Infinity" if x > 0 else "-Infinity"
  if t is str:
    return _esc(x)
  if t is list:
    return "[" + ",".join([_to_json(v) for v in x]) + "]"
  if t is dict:
    return "{" + ",".join([_esc(k) + ":" + _to_json(v) for k, v in x.items()]) + "}"
  raise TypeError(f"{t.__name__} is not JSON")


def _mountpoints():
  with open("/proc/self/mountinfo") as f:
    return [line.split()[4].encode().decode("unicode_escape") for line in f]  # \040 -> space


def _build_root(root, uid):
  """Lays out the minimal root on the tmpfs at ``root``: read-only stdlib and system libraries
  (for extension modules loaded later), /sandbox (cwd, home) and /tmp, four device nodes."""
  for d, mode in (("sandbox", 0o700), ("tmp", 0o1777), ("dev", 0o755), ("proc", 0o555)):
    os.mkdir(os.path.join(root, d))
    os.chmod(os.path.join(root, d), mode)
  os.chown(os.path.join(root, "sandbox"), uid, uid)
  for dev in ("null", "zero", "random", "urandom"):
    open(os.path.join(root, "dev", dev), "w").close()
    _bind_ro("/dev/" + dev, os.path.join(root, "dev", dev), MS_NOSUID | MS_NOEXEC)
  for path in ("/usr/lib", "/usr/lib64", "/lib", "/lib64", "/etc/ld.so.cache", os.path.dirname(os.__file__)):
    inside = root + path
    if os.path.lexists(inside) or not os.path.exists(path):
      continue  # already visible through an earlier bind, or absent on this host
    os.makedirs(os.path.dirname(inside), 0o755, exist_ok=True)
    if os.path.islink(path):
      os.symlink(os.readlink(path), inside)
      continue
    if os.path.isdir(path):
      os.mkdir(inside)
    else:
      open(inside, "w").close()
    _bind_ro(path, inside)


def _seccomp():
  """Installs a filter denying (EPERM) namespace creation, ptrace, mounts, bpf, io_uring, userfaultfd,
  perf_event_open, keyctl and module/kexec calls; clone3 gets ENOSYS (its flags are behind a
  pointer) so libc falls back to clone, whose flags are checked. Foreign-ABI syscalls kill."""
  arch, nr = _ARCH
  ins = lambda code, k, jt=0, jf=0: struct.pack("HBBI", code, jt, jf, k)
  ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
  deny = ret, 0x00050000 | 1  # SECCOMP_RET_ERRNO | EPERM
  prog = [ins(ld, 4), ins(jeq, arch, 1, 0), ins(ret, 0x80000000), ins(ld, 0)]
  if arch == 0xC000003E:
    prog += [ins(jge, 0x40000000, 0, 1), ins(*deny)]  # x32 ABI
  for name, n in nr.items():
    if name not in ("clone", "clone3"):
      prog += [ins(jeq, n, 0, 1), ins(*deny)]
  ns_flags = CLONE_NEWNS | CLONE_NEWCGROUP | CLONE_NEWUTS | CLONE_NEWIPC | CLONE_NEWUSER | CLONE_NEWPID | CLONE_NEWNET
  prog += [ins(jeq, nr["clone3"], 0, 1), ins(ret, 0x00050000 | 38),
           ins(jeq, nr["clone"], 0, 3), ins(ld, 16), ins(jset, ns_flags, 0, 1), ins(*deny),
           ins(ret, 0x7FFF0000)]
  buf = ctypes.create_string_buffer(b"".join(prog))
  fprog = struct.pack("HxxxxxxQ", len(prog), ctypes.addressof(buf))
  return _libc.prctl(PR_SET_SECCOMP, 2, ctypes.c_char_p(fprog), 0, 0) == 0


def _main():
  """Everything holding the nonce lives in this frame, not in ``__main__``'s globals."""
  _write, _read, _dumps, _loads, _exit = os.write, os.read, _to_json, marshal.loads, os._exit
  _len, _type, _isinstance, _str, _compile, _exec = len, type, isinstance, str, compile, exec  # pre-patching
  _REQ = os.dup(0)
  _devnull = os.open("/dev/null", os.O_RDONLY)
  os.dup2(_devnull, 0)
  os.close(_devnull)
  _pending = [b""]

  def _recv():
    while _len(_pending[0]) < 4 or _len(_pending[0]) < 4 + int.from_bytes(_pending[0][:4], "little"):
      chunk = _read(_REQ, 1 << 16)
      if not chunk:
        _exit(0)  # the parent is done (or gone)
      _pending[0] += chunk
    n = 4 + int.from_bytes(_pending[0][:4], "little")
    msg, _pending[0] = _pending[0][4:n], _pending[0][n:]
    return _loads(msg)

  _cfg = _recv()
  _RFD = _cfg["result_fd"]
  _NONCE = _cfg["nonce"]

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
  _new_root = False

  if _uid is not None:  # running as root: cgroup, namespaces, minimal root, drop to _uid
    try:
      for _procs in _cfg["cgroups"]:
        with open(_procs, "r+") as f:
          f.write(str(os.getpid()))
      _layers += ["cgroup"] if _cfg["cgroups"] else []
    except OSError as e:
      _fail_setup(f"join cgroup: {e}")
    for flag, name in ((CLONE_NEWNET, "netns"), (CLONE_NEWIPC, "ipcns"), (CLONE_NEWUTS, "utsns"),
                       (CLONE_NEWNS, "mountns"), (CLONE_NEWPID, "pidns")):
      if _libc.unshare(flag) == 0:
        _layers.append(name)
    if "mountns" in _layers:
      try:
        _mount(None, "/", None, MS_REC | MS_PRIVATE, None)  # nothing propagates back to the host
        _mount("tmpfs", _workdir, "tmpfs", MS_NOSUID | MS_NODEV,
               f"size={_cfg['disk_mb']}m,nr_inodes=4096,mode=0755")
      except OSError as e:
        _fail_setup(str(e))
      try:
        if "pidns" in _layers and _ARCH:
          _build_root(_workdir, _uid)
          _new_root = True
      except OSError:
        pass
      if not _new_root:  # fallback: the host's tree, every mount read-only in this namespace
        for mp in _mountpoints():
          if mp == _workdir:  # our tmpfs stays writable
            continue
          try:
            keep = os.statvfs(mp).f_flag & (MS_NOSUID | MS_NODEV | MS_NOEXEC)
            _mount(None, mp, None, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV | keep, None)
          except OSError:
            pass
        try:
          _homedir = os.path.join(_workdir, "work")
          os.mkdir(_homedir, 0o700)
          os.chown(_homedir, _uid, _uid)
          # The stdlib may sit under an unreadable directory (/root/.pyenv): expose it read-only.
          _prefix_bind = os.path.join(_workdir, "python")
          os.mkdir(_prefix_bind, 0o755)
          _bind_ro(sys.base_prefix, _prefix_bind)
        except OSError as e:
          _fail_setup(str(e))
      _layers.append("rofs")
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
      _libc.prctl(PR_SET_PDEATHSIG, _signal.SIGKILL, 0, 0, 0)
      try:  # a /proc of this namespace only: host processes invisible
        _mount("proc", os.path.join(_workdir, "proc") if _new_root else "/proc", "proc",
               MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
      except OSError:
        pass
      if _new_root:  # the tmpfs becomes "/", the host's tree is detached
        os.chdir(_workdir)
        if _libc.syscall(_ARCH[1]["pivot_root"], b".", b".") != 0 or _libc.umount2(b".", 2) != 0:
          _fail_setup(f"pivot_root: {os.strerror(ctypes.get_errno())}")
        os.chdir("/")
        _homedir = "/sandbox"
        _layers.append("root")

  if _prefix_bind is None and not _new_root:
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
  if _ARCH and _seccomp():
    _layers.append("seccomp")

  os.chdir(_homedir)
  os.environ.clear()
  os.environ.update({"PATH": "/usr/bin:/bin", "HOME": _homedir, "TMPDIR": _homedir, "LC_ALL": "C.UTF-8"})
  if _prefix_bind is not None:
    sys.path[:] = [p.replace(sys.base_prefix, _prefix_bind, 1) if p.startswith(sys.base_prefix) else p
                   for p in sys.path]
  _signal.signal(_signal.SIGXFSZ, _signal.SIG_IGN)  # oversize writes raise OSError instead of killing

  # Harness-level stubs: defence in depth only, bypassable from Python (``_socket``, ``ctypes``).
  if "netns" not in _layers:  # (with it the kernel already refuses every connection)
    class _NoSocket:
      def __init__(self, *args, **kwargs):
        raise PermissionError("network access is disabled in the sandbox")

    import socket
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
    try:
      return (_type(exc).__name__ + ": " + _str(exc))[:300]
    except BaseException:  # a __str__ that raises
      return _type(exc).__name__

  def _serve(code):
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
    _emit({"event": "ready"})
    def refs(name):
      if name not in namespace:
        raise NameError(f"name {name!r} is not defined")
      return namespace[name]

    while True:
      req = _recv()
      reply = {"event": "reply", "k": req["k"], "t": req["t"]}
      try:
        if "src" in req:  # a test the parent could not split: run it here, the old way
          _exec(_compile(req["src"], f"<test {req['k']}>", "exec"), namespace)  # pylint: disable=exec-used
          reply["ok"] = True
        else:
          value = refs(req["f"])(*decode(req["a"], refs), **decode(req["kw"], refs))
          reply["value"] = encode(value)
      except BaseException as e:  # incl. SystemExit
        reply.update(raised=_type(e).__name__, error=_short(e), memory=_isinstance(e, MemoryError))
      try:
        _emit(reply)
      except (ValueError, TypeError, RecursionError) as e:  # e.g. an int too long to print
        _emit({"event": "reply", "k": req["k"], "t": req["t"], "raised": "TypeError", "error": _short(e)})

  _code = _cfg["code"]
  del _cfg, _lim
  _serve(_code)
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  except BaseException:
    pass
  _exit(0)  # skip atexit handlers the solution may have registered


globals().pop("_main")()
