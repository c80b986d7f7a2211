"""Splits a test between the trusted parent and the sandbox.

A test is *split* when every name it takes from the solution is only called (``f(x)``) or passed to a
call (``check(candidate)``): it then runs here, in the parent, with each such name bound to a
``SolutionCall`` that runs the call in the sandbox and returns its result decoded as plain data, so
comparisons, ``len``, ``sorted``, ``isinstance``... only ever see exact builtin values and the test
text never enters the sandbox. Builtin names always mean the parent's builtins (a solution that
defines ``abs`` does not change the test's ``abs``); ``print`` prints nothing; ``SAFE_MODULES`` a test
uses without importing (``math.isclose``, after the solution's ``import math``) are imported here.
Tests that use the solution's names otherwise (``obj.attr``, ``assert flag``), unsafe builtins
(``open``, ``exec``, ``globals``...), or imports outside ``SAFE_MODULES`` return None from ``plan``
and run inside the sandbox as before.
"""
import ast
import builtins
import threading
import types

SAFE_MODULES = frozenset("math cmath random copy re string itertools functools collections operator heapq "
                         "bisect fractions decimal statistics hashlib".split())
_AST_LOCK = threading.Lock()  # CPython 3.11's AST <-> object conversion is not thread-safe (gh-106905)
_UNSAFE = frozenset("open input exec eval compile globals locals vars breakpoint help exit quit "
                    "memoryview dir copyright credits license".split())


def _import(name, globals=None, locals=None, fromlist=(), level=0):
  if level or name.split(".")[0] not in SAFE_MODULES:
    raise ImportError(f"{name} cannot be imported by a test run outside the sandbox")
  return __import__(name, globals, locals, fromlist, level)


PARENT_BUILTINS = {k: v for k, v in vars(builtins).items() if not k.startswith("_") and k not in _UNSAFE}
PARENT_BUILTINS.update(__import__=_import, __build_class__=builtins.__build_class__, print=lambda *a, **k: None)


class SolutionCall:
  """Stands for the solution's ``name`` in a split test: calling it runs ``call(name, args, kwargs)``."""

  def __init__(self, call, name):
    self.call, self.name = call, name

  def __call__(self, *args, **kwargs):
    return self.call(self.name, args, kwargs)


def plan(test: str, known, filename: str = "<test>") -> tuple[types.CodeType, set[str], set[str]] | None:
  """``(compiled test, solution names it calls, SAFE_MODULES it uses unimported)``, or None if it
  must run inside the sandbox. ``known``: names the parent already holds from earlier split tests.
  """
  try:
    with _AST_LOCK:
      tree = ast.parse(test)
  except (SyntaxError, ValueError):
    return None
  bound, parents = set(), {}
  for node in ast.walk(tree):
    for child in ast.iter_child_nodes(node):
      parents[child] = node
    if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
      bound.add(node.id)
    elif isinstance(node, ast.arg):
      bound.add(node.arg)
    elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
      bound.add(node.name)
    elif isinstance(node, (ast.Global, ast.Nonlocal)):
      bound.update(node.names)
    elif isinstance(node, ast.ExceptHandler) and node.name:
      bound.add(node.name)
    elif isinstance(node, (ast.Import, ast.ImportFrom)):
      mods = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
      if getattr(node, "level", 0) or any(m.split(".")[0] not in SAFE_MODULES for m in mods):
        return None
      bound.update((a.asname or a.name).split(".")[0] for a in node.names)
  calls, modules = set(), set()
  for node in ast.walk(tree):
    if not isinstance(node, ast.Name) or node.id in bound or node.id in known or node.id in PARENT_BUILTINS:
      continue
    up = parents.get(node)
    if node.id in SAFE_MODULES and isinstance(up, ast.Attribute):  # math.isclose after the solution's import
      modules.add(node.id)
      continue
    if (node.id in vars(builtins) or isinstance(up, ast.Starred)
        or not (isinstance(up, ast.keyword) or isinstance(up, ast.Call) and (up.func is node or node in up.args))):
      return None
    calls.add(node.id)
  try:
    with _AST_LOCK:
      return compile(tree, filename, "exec"), calls, modules
  except (SyntaxError, ValueError):  # e.g. "return" outside a function: fails inside as before
    return None
