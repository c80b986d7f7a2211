"""The architecture the docs describe, checked on the source: no import cycles between rlhfjax
modules (module-level and function-level imports alike), one host loop, and a model-agnostic core."""

import ast
import os
import pathlib

PKG = pathlib.Path(__file__).resolve().parent.parent / "rlhfjax"


def _modules() -> dict[str, pathlib.Path]:
  out = {}
  for path in PKG.rglob("*.py"):
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def _target(name: str, modules) -> str | None:
  """The most specific rlhfjax module a dotted import name refers to."""
  while name and name not in modules:
    name = name.rpartition(".")[0]
  return name or None


def import_graph() -> dict[str, set[str]]:
  modules = _modules()
  graph = {m: set() for m in modules}
  for mod, path in modules.items():
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text())):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:  # relative import
          anchor = mod if is_pkg else mod.rpartition(".")[0]
          for _ in range(node.level - 1):
            anchor = anchor.rpartition(".")[0]
          base = f"{anchor}.{base}" if base else anchor
        # `from pkg import sub` imports the submodule; `from mod import name`, the module
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
      for name in names:
        t = _target(name, modules) if name.startswith("rlhfjax") else None
        if t and t != mod and t != "rlhfjax":
          graph[mod].add(t)
  return graph


def find_cycle(graph):
  state, stack = {}, []

  def visit(n):
    state[n] = 1
    stack.append(n)
    for m in sorted(graph[n]):
      if state.get(m) == 1:
        return stack[stack.index(m):] + [m]
      if m not in state and (c := visit(m)):
        return c
    stack.pop()
    state[n] = 2
    return None

  for n in sorted(graph):
    if n not in state and (c := visit(n)):
      return c
  return None


def test_no_import_cycles():
  graph = import_graph()
  assert "rlhfjax.train.stage" in graph["rlhfjax.train.pipeline"]  # the checker sees imports
  assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_checker_finds_a_cycle():
  assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
  assert find_cycle({"a": {"b"}, "b": set()}) is None


def _source(rel: str) -> str:
  return (PKG / rel).read_text()


def test_sampler_and_rl_core_never_build_a_model():
  for rel in [*(str(p.relative_to(PKG)) for p in (PKG / "sampling").glob("*.py")),
              "train/rl.py", "train/rl_shard_map.py"]:
    code = "\n".join(line for line in _source(rel).splitlines()
                     if not line.lstrip().startswith("#"))
    tree = ast.parse(code)
    calls = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not calls & {"PolicyModel", "ValueModel", "PolicyValueModel", "RewardModel"}, rel


def test_one_host_loop():
  # checkpoints, cadence and finite checks live in the driver; stages only declare hooks
  for path in (PKG / "train").glob("*.py"):
    src = path.read_text()
    if path.name in ("stage.py",):
      continue
    assert "Checkpointer(" not in src, path.name
    assert "check_finite(" not in src, path.name
    assert "ProgressBar(" not in src, path.name
  assert os.path.exists(PKG / "train" / "stage.py")
