"""Plain data across the sandbox boundary, shared by both sides (stdlib only: sandbox.py prepends
this file's source to the child's).

``encode`` accepts exact ``None``/``bool``/``int``/``float``/``str``/``bytes`` and ``list``/``tuple``/
``set``/``dict`` of those (``type(x) is int``: subclasses and every other object raise TypeError) and
returns JSON-able data: containers as tagged lists ``["l"|"t"|"s", *items]``, ``["d", [k, v], ...]``,
``["b", hex]``. ``decode`` rebuilds exactly those types from ``json.loads`` output, rejecting
anything else; ``["r", name]`` (a reference to a solution function, parent -> child only) needs
``refs``.
"""


def encode(x, refs=None, depth=0, _type=type):
  t = _type(x)
  if x is None or t is bool or t is int or t is float or t is str:
    return x
  if depth > 100:
    raise ValueError("value nested too deeply")
  if t is list or t is tuple or t is set:
    return ["l" if t is list else "t" if t is tuple else "s", *[encode(v, refs, depth + 1) for v in x]]
  if t is dict:
    return ["d", *[[encode(k, refs, depth + 1), encode(v, refs, depth + 1)] for k, v in x.items()]]
  if t is bytes:
    return ["b", x.hex()]
  name = refs(x) if refs is not None else None
  if name is not None:
    return ["r", name]
  raise TypeError(f"{t.__name__} is not plain data")


def decode(v, refs=None):
  t = type(v)
  if v is None or t is bool or t is int or t is float or t is str:
    return v
  if t is list and v and type(v[0]) is str:
    tag, items = v[0], v[1:]
    if tag in ("l", "t", "s"):
      out = [decode(i, refs) for i in items]
      return out if tag == "l" else tuple(out) if tag == "t" else set(out)
    if tag == "d" and all(type(i) is list and len(i) == 2 for i in items):
      return {decode(k, refs): decode(w, refs) for k, w in items}
    if tag == "b" and len(items) == 1 and type(items[0]) is str:
      return bytes.fromhex(items[0])
    if tag == "r" and refs is not None and len(items) == 1 and type(items[0]) is str:
      return refs(items[0])
  raise ValueError("malformed value")
