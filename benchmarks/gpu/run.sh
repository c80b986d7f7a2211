#!/usr/bin/env bash
# README's accelerator figures in one run of under 8 minutes on one H100 / H200 (benchmarks/gpu/README.md):
#   * MFU of the update (`sft`: forward + backward + AdamW) of a 1.07 B policy, `--size=1b
#     --dtype=bfloat16`, against the bf16 matmul rate measured in the same process;
#   * decode tokens/s (`sample`) against the HBM roofline at the bandwidth measured in the same process,
#     weights stored in bf16 (inference) and, time permitting, in f32 (the RL loop's master weights).
#
#   benchmarks/gpu/run.sh                   # jax with CUDA preinstalled; the rest installed if missing
#   WHEELS=wheels benchmarks/gpu/run.sh     # offline: the missing packages from pre-downloaded wheels
#   SIZE=tiny benchmarks/gpu/run.sh         # CPU smoke test: the same steps at toy sizes
#
# Env: OUT (raw output, JSON, table; default a new temp dir), PY (python3), VENV (PY's own venv if PY
# runs in one, else benchmarks/gpu/.venv made with --system-site-packages; an existing one is
# reused), WHEELS, SIZE (1b | tiny), BUDGET_S (470: wall seconds for everything), SFT_ARGS /
# DECODE_ARGS (replace the workload flags below).
# Never installs jax: the installed jax / jaxlib / CUDA plugins are pinned while pip runs.
set -euo pipefail
cd "$(dirname "$0")/../.."
deadline=$((SECONDS + ${BUDGET_S:-470}))
PY=${PY:-python3} SIZE=${SIZE:-1b}
# A python that is itself a venv (the H200 image's /opt/torch/.venv) is used as it is: a venv made
# from it with --system-site-packages would see its base interpreter's packages, not jax.
if [ -z "${VENV:-}" ] && "$PY" -c 'import sys; sys.exit(sys.prefix == sys.base_prefix)'; then
  VENV=$("$PY" -c 'import sys; print(sys.prefix)')
fi
VENV=${VENV:-benchmarks/gpu/.venv}
OUT=${OUT:-$(mktemp -d -t rlhfjax_gpu_XXXXXX)}
mkdir -p "$OUT"
raw="$OUT/gpu_bench.txt"
: >"$raw"
if [ "$SIZE" = tiny ]; then
  SFT_ARGS=${SFT_ARGS:---batch=4 --seq=64 --steps=2 --matmul_n=256}
  DECODE_ARGS=${DECODE_ARGS:---batch=8 --prompt=8 --new_tokens=32 --steps=2 --matmul_n=256}
else
  SFT_ARGS=${SFT_ARGS:---batch=16 --seq=1024 --steps=5 --attention=dot_product}
  DECODE_ARGS=${DECODE_ARGS:---batch=128 --prompt=64 --new_tokens=256 --steps=3}
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv --system-site-packages "$VENV"
py="$VENV/bin/python"
"$py" -c "import jax" || { echo "run.sh: jax is not importable from $py: install jax (CUDA) first" >&2; exit 1; }
# What the two benches import beyond jax (DEPS=all: every dependency in pyproject.toml but jax),
# each only if missing or too old; and the pins that keep pip off the installed jax.
missing=$(DEPS=${DEPS:-bench} OUT="$OUT" "$py" - <<'PY'
import importlib.metadata as md, os, tomllib
from pip._vendor.packaging.requirements import Requirement
reqs = [Requirement(r) for r in tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]]
bench = {"flax", "optax", "ml-collections", "absl-py", "numpy"}
def ok(r):
  try:
    return r.specifier.contains(md.version(r.name), prereleases=True)
  except md.PackageNotFoundError:
    return False
print(" ".join(str(r) for r in reqs if r.name != "jax" and not ok(r)
               and (os.environ["DEPS"] == "all" or r.name in bench)))
pins = {}  # the first of each name on sys.path: the one imported
for d in md.distributions():
  name = (d.metadata["Name"] or "").lower().replace("_", "-")
  if name.startswith(("jax", "nvidia-")):
    pins.setdefault(name, f"{name}=={d.version}")
open(os.path.join(os.environ["OUT"], "constraints.txt"), "w").write("".join(p + "\n" for p in sorted(pins.values())))
PY
)
pip=("$py" -m pip install -q -c "$OUT/constraints.txt" ${WHEELS:+--no-index --find-links "$WHEELS"})
if [ -n "$missing" ]; then
  echo "run.sh: installing $missing (pinned: $(tr '\n' ' ' <"$OUT/constraints.txt"))"
  # shellcheck disable=SC2086
  "${pip[@]}" $missing
fi
if ! (cd / && "$py" -c "import rlhfjax" 2>/dev/null); then  # this checkout, no deps
  "${pip[@]}" --no-deps -e . 2>/dev/null || "${pip[@]}" --no-deps --no-build-isolation -e . \
    || echo "run.sh: pip install -e . failed; running from the checkout (PYTHONPATH)"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-$OUT/jax_cache}

bench() {  # NAME MIN_S CAP_S ARGS...: one bench, if MIN_S of the budget are left, for at most CAP_S
  local name=$1 need=$2 left=$((deadline - SECONDS))
  local cap=$((left < $3 ? left : $3))
  shift 3
  if [ "$left" -lt "$need" ]; then
    echo "run.sh: skipping $name (${left}s left of BUDGET_S, it needs ~${need}s)" | tee -a "$raw"
    return 0
  fi
  echo "\$ python -m rlhfjax.bench $* --json=$OUT/$name.json  # at most ${cap}s" | tee -a "$raw"
  timeout "$cap" "$py" -m rlhfjax.bench "$@" --json="$OUT/$name.json" 2>&1 | tee -a "$raw" \
    || echo "run.sh: $name failed or ran out of time (rc ${PIPESTATUS[0]})" | tee -a "$raw"
}

{ command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; } \
  >>"$raw" 2>&1 || true
# shellcheck disable=SC2086
bench update 60 210 sft --size="$SIZE" --dtype=bfloat16 $SFT_ARGS
# shellcheck disable=SC2086
bench decode_bf16 60 180 sample --size="$SIZE" --dtype=bfloat16 --param_dtype=bfloat16 $DECODE_ARGS
# shellcheck disable=SC2086
bench decode_f32 120 600 sample --size="$SIZE" --dtype=bfloat16 $DECODE_ARGS
"$py" benchmarks/gpu/table.py "$OUT"/update.json "$OUT"/decode_bf16.json "$OUT"/decode_f32.json \
  | tee "$OUT/table.md"
echo "run.sh: raw output $raw, JSON + table in $OUT ($SECONDS s)"
