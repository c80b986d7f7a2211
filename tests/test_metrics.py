"""Metrics: JSONL (strict JSON with NaN), TensorBoard events, plots, report, console tables."""
import json
import math
import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rlhfjax import metrics as M

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_run(workdir):
  with M.MetricsWriter(str(workdir)) as w:
    for step in range(1, 6):
      w.write("sft", step, {"loss": 2.0 / step, "lr": np.float32(1e-3), "acc": jnp.asarray(0.1 * step),
                            "tokens": 128 * step})
    w.write("ppo", 1, {"reward": jnp.float32(0.5), "kl": float("nan"), "ratio": np.array([float("inf")]),
                       "clipped": True})
    w.write("ppo", 2, {"reward": 0.75, "kl": 0.01, "ratio": 1.0, "clipped": False})
    w.write_samples("ppo", 2, [{"prompt": "1+1=", "completion": "2", "reward": np.float32(1.0),
                                "ids": jnp.arange(3)}])


def test_jsonl_is_strict_json_with_nan_as_null(tmp_path):
  _write_run(tmp_path)
  lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
  assert len(lines) == 7
  rows = [json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}")) for line in lines]
  assert rows[0]["stage"] == "sft" and rows[0]["step"] == 1 and rows[0]["loss"] == 2.0
  assert isinstance(rows[0]["time"], float)
  assert rows[2]["acc"] == pytest.approx(0.3)
  assert rows[4]["tokens"] == 640.0
  assert rows[5]["kl"] is None and rows[5]["ratio"] is None and rows[5]["clipped"] == 1.0
  samples = [json.loads(l) for l in (tmp_path / "samples.jsonl").read_text().splitlines()]
  assert samples == [{"stage": "ppo", "step": 2, "prompt": "1+1=", "completion": "2", "reward": 1.0,
                      "ids": [0, 1, 2]}]
  assert M.read_samples(tmp_path) == samples


def test_appends_on_resume_and_rejects_bad_metrics(tmp_path):
  _write_run(tmp_path)
  with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
    w.write("sft", 6, {"loss": 0.1})
    with pytest.raises(TypeError):
      w.write("sft", 7, {"loss": np.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
      w.write("sft", 7, {"step": 1})
  assert len(M.read_metrics(tmp_path)) == 8


def test_tensorboard_events_written(tmp_path):
  _write_run(tmp_path)
  tb = tmp_path / "tb"
  events = [f for f in os.listdir(tb) if "tfevents" in f]
  assert events and all((tb / f).stat().st_size > 0 for f in events)
  # Tags are "<stage>/<key>": check the raw record bytes.
  blob = b"".join((tb / f).read_bytes() for f in events)
  assert b"sft/loss" in blob and b"ppo/reward" in blob


def test_read_metrics(tmp_path):
  _write_run(tmp_path)
  rows = M.read_metrics(tmp_path)
  assert [r["stage"] for r in rows] == ["sft"] * 5 + ["ppo"] * 2
  ppo = M.read_metrics(tmp_path, stage="ppo")
  assert math.isnan(ppo[0]["kl"]) and ppo[1]["kl"] == 0.01
  # A torn last line (killed run) is skipped.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"stage": "sft", "st')
  assert len(M.read_metrics(tmp_path)) == 7
  assert M.read_metrics(tmp_path / "missing") == []


def test_plot_curves_writes_pngs(tmp_path):
  _write_run(tmp_path)
  paths = M.plot_curves(str(tmp_path))
  assert sorted(os.path.basename(p) for p in paths) == ["ppo.png", "sft.png"]
  for p in paths:
    data = open(p, "rb").read()
    assert data[:8] == PNG_MAGIC and len(data) > 1000
  assert M.plot_curves(str(tmp_path), stages=["sft"]) == [os.path.join(str(tmp_path), "plots", "sft.png")]


def test_plot_caps_metric_count(tmp_path):
  with M.MetricsWriter(str(tmp_path), tensorboard=False) as w:
    for step in range(3):
      w.write("rl", step, {f"m{i}": float(i * step) for i in range(20)})
  (path,) = M.plot_curves(str(tmp_path))
  assert open(path, "rb").read()[:8] == PNG_MAGIC


def test_write_report_renders_tables(tmp_path):
  _write_run(tmp_path)
  M.plot_curves(str(tmp_path))
  path = M.write_report(str(tmp_path), "Arithmetic PPO", {
      "Summary": "Reward went up.",
      "Results": [{"model": "sft", "accuracy": 0.41234}, {"model": "ppo", "accuracy": 0.6, "kl": 0.02}],
  })
  text = open(path).read()
  assert path == os.path.join(str(tmp_path), "report.md")
  assert text.startswith("# Arithmetic PPO")
  assert "## Summary\n\nReward went up." in text
  assert "| model | accuracy | kl |" in text
  assert "| sft | 0.4123 |  |" in text
  assert "| ppo | 0.6 | 0.02 |" in text
  assert "![sft](plots/sft.png)" in text


def test_samples_table_truncates():
  rows = [{"prompt": "x" * 200, "completion": f"line1\nline2 {i}", "reward": 0.5 * i} for i in range(12)]
  table = M.samples_table(rows, max_rows=4, max_chars=20)
  lines = table.splitlines()
  assert lines[0].split(" | ")[0].strip() == "prompt"
  assert len(lines) == 2 + 4 + 1 and lines[-1] == "... (8 more rows)"
  assert "x" * 19 + "…" in lines[2] and "x" * 20 not in table
  assert "line1⏎line2 0" in lines[2]
  assert max(len(l) for l in lines) < 3 * 20 + 10
  assert M.samples_table([]) == "(no samples)"


def test_progress_bar_runs(capsys):
  with M.ProgressBar(total=10, desc="sft", initial=2) as bar:
    for step in range(3, 11):
      bar.update(step, loss=jnp.float32(1.5), tokens_per_s=12345.6, kl=0.01, phase="rollout")


def test_import_is_lazy():
  code = ("import sys, rlhfjax.metrics; "
          "bad = [m for m in ('matplotlib', 'tensorboardX', 'tqdm') if m in sys.modules]; "
          "assert not bad, bad")
  subprocess.run([sys.executable, "-c", code], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
