"""launch/*: each `--dry-run` for a 2-host run prints the commands it would run (and runs none of
gcloud / kubectl / sbatch / srun: here they are stubs that fail)."""

import os
import shlex
import subprocess

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAIN = ["--config=exceed_teacher", "--workdir=/shared/run", "--config.sft.steps=10"]


def _dry_run(tmp_path, script, *options, **env):
  """stdout lines of `launch/SCRIPT --dry-run OPTIONS -- MAIN` with stub cluster tools on PATH."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir(exist_ok=True)
  for tool in ("gcloud", "kubectl", "sbatch", "srun"):
    (bin_dir / tool).write_text(f"#!/bin/sh\necho {tool} was called >&2\nexit 99\n")
  (bin_dir / "scontrol").write_text(  # the job's nodes
      '#!/bin/sh\n[ "$1 $2" = "show hostnames" ] && printf "gpu-a17\\ngpu-a18\\n"\n')
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = dict({k: v for k, v in os.environ.items() if not k.startswith("SLURM_")},
             PATH=f"{bin_dir}:{os.environ['PATH']}", USER="me", **env)
  argv = ["bash", os.path.join(ROOT, "launch", script), "--dry-run", *options, "--", *MAIN]
  out = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert out.returncode == 0 and not out.stderr, out.stderr
  return out.stdout.splitlines()


def _command(line):
  assert line.startswith("+ ")
  return shlex.split(line[2:])


def test_tpu_vm_creates_runs_on_all_workers_and_deletes(tmp_path):
  cmds = [_command(l) for l in _dry_run(tmp_path, "tpu_vm.sh", "--spot", ACCELERATOR_TYPE="v4-16",
                                        ZONE="us-central2-b", BUCKET="bkt")]
  create, *_, ssh_install, ssh_run, delete = cmds
  assert create[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
  assert {"rlhfjax-me", "--accelerator-type=v4-16", "--zone=us-central2-b", "--spot"} <= set(create)
  (scp,) = [c for c in cmds if c[3:5] == ["tpu-vm", "scp"]]
  assert "--worker=all" in scp
  assert "--worker=all" in ssh_install and "gcsfuse --implicit-dirs bkt /mnt/bkt" in ssh_install[-1]
  assert "pip install -q -e './rlhfjax[tpu]'" in ssh_install[-1]
  # every worker runs the same command; jax.distributed finds the others (no process flags)
  assert "--worker=all" in ssh_run
  assert ssh_run[-1] == "--command=cd rlhfjax && " + shlex.join(["python", "-m", "rlhfjax.main", *MAIN])
  assert delete[3:6] == ["tpu-vm", "delete", "rlhfjax-me"]


def test_tpu_vm_queued_resource(tmp_path):
  cmds = [_command(l) for l in _dry_run(tmp_path, "tpu_vm.sh", "--queued", ACCELERATOR_TYPE="v5p-16")]
  assert cmds[0][3:6] == ["queued-resources", "create", "rlhfjax-me"]
  assert {"--node-id=rlhfjax-me", "--accelerator-type=v5p-16"} <= set(cmds[0])
  assert "--spot" not in cmds[0]
  assert cmds[-1][3:5] == ["queued-resources", "delete"] and "--force" in cmds[-1]


def _manifest(lines):
  """The JobSet between `kubectl apply -f - <<'EOF'` and `EOF`, parsed; the commands after it."""
  assert lines[0] == "+ kubectl apply -f - <<'EOF'"
  end = lines.index("EOF")
  return yaml.safe_load("\n".join(lines[1:end])), [_command(l) for l in lines[end + 1:]]


def test_gke_jobset_tpu_slice(tmp_path):
  jobset, cmds = _manifest(_dry_run(tmp_path, "gke.sh", NUM_HOSTS="2", NAME="rl", IMAGE="img:1"))
  job = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  assert (job["parallelism"], job["completions"], job["completionMode"]) == (2, 2, "Indexed")
  assert pod["nodeSelector"] == {"cloud.google.com/gke-tpu-accelerator": "tpu-v5p-slice",
                                 "cloud.google.com/gke-tpu-topology": "2x2x2"}
  (container,) = pod["containers"]
  assert container["image"] == "img:1" and container["resources"]["limits"] == {"google.com/tpu": 4}
  assert container["command"] + container["args"] == ["python", "-m", "rlhfjax.main", *MAIN]
  assert [c[:2] for c in cmds] == [["kubectl", "wait"], ["kubectl", "logs"], ["kubectl", "delete"]]
  assert "jobset.sigs.k8s.io/jobset-name=rl" in cmds[1] and "--max-log-requests=2" in cmds[1]


def test_gke_jobset_gpu_node_pool_gets_process_flags(tmp_path):
  jobset, _ = _manifest(_dry_run(tmp_path, "gke.sh", "--gpu", "--spot", NUM_HOSTS="2", NAME="rl"))
  pod = jobset["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]
  assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
                                 "cloud.google.com/gke-spot": "true"}
  (container,) = pod["containers"]
  assert container["resources"]["limits"] == {"nvidia.com/gpu": 8}
  # process 0 is pod 0 of the JobSet's headless service; the index comes from the Indexed Job
  assert container["args"] == ["--coordinator_address=rl-workers-0-0.rl:8476", "--num_processes=2",
                               "--process_id=$(PROCESS_ID)", *MAIN]
  env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]}
  assert env["PROCESS_ID"] == "metadata.annotations['batch.kubernetes.io/job-completion-index']"


def test_slurm_submits_itself(tmp_path):
  (cmd,) = [_command(l) for l in _dry_run(tmp_path, "slurm.sbatch", NODES="2")]
  assert cmd[:4] == ["sbatch", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=1"]
  assert cmd[-len(MAIN) - 2:] == [os.path.join(ROOT, "launch", "slurm.sbatch"), "--", *MAIN]
  (cmd,) = [_command(l) for l in _dry_run(tmp_path, "slurm.sbatch", NODES="2", PER_GPU="1")]
  assert {"--ntasks-per-node=8", "--gpus-per-task=1"} <= set(cmd)


def test_slurm_job_runs_one_process_per_task_with_the_first_node_as_coordinator(tmp_path):
  for tasks in ("2", "16"):  # per node, per GPU
    (cmd,) = [_command(l) for l in _dry_run(tmp_path, "slurm.sbatch", SLURM_JOB_ID="7",
                                            SLURM_NTASKS=tasks, SLURM_JOB_NODELIST="gpu-a[17-18]")]
    assert cmd[0] == "srun" and cmd[-3:-1] == ["bash", "-c"]
    # bash -c expands $SLURM_PROCID in each task
    assert shlex.split(cmd[-1]) == ["exec", "python", "-m", "rlhfjax.main", *MAIN,
                                    "--coordinator_address=gpu-a17:8476", f"--num_processes={tasks}",
                                    "--process_id=$SLURM_PROCID"]
