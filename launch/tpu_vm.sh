#!/usr/bin/env bash
# her2jax on every worker of a Cloud TPU VM (pod slice), over gcloud's ssh.
#
#   launch/tpu_vm.sh --setup NAME ZONE [GIT_URL [GIT_REF]]   clone / update and install on every worker
#   launch/tpu_vm.sh NAME ZONE --config=configs/X.py --workdir=DIR --mode=train [her2jax flags...]
#   launch/tpu_vm.sh --stop NAME ZONE                        SIGTERM on every worker: save and stop
#
# The run starts the same command on all workers (--worker=all) with HER2JAX_DISTRIBUTED=auto,
# so her2jax asks JAX to detect the pod: the workers, this worker's index and the coordinator
# (worker 0) come from the TPU VM's metadata; no --coordinator_address. Every worker runs it
# under launch/run_task.sh, which names the worker that died first when the run fails.
# --setup clones GIT_URL (default: this checkout's origin; GIT_REF default: this checkout's
# commit, which must be pushed) into REPO_DIR and installs her2jax with jax[tpu] into its .venv.
# The dataset must be at the same path on every worker (prepare on each, mount a shared
# filesystem, or copy it: gcloud compute tpus tpu-vm scp --recurse --worker=all --zone=ZONE
# DATA NAME:DATA); so must the workdir, or point --workdir at a shared filesystem. The run
# lasts as long as this ssh session: start it from tmux / screen or a VM that stays up.
#
# Environment: REPO_DIR (on the workers; relative to the home directory or absolute; default
# her2jax), PYTHON (the workers' Python >= 3.11 for --setup; default python3), GCLOUD (default
# gcloud), GCLOUD_FLAGS (extra gcloud flags, e.g. "--project=P").
set -euo pipefail

usage() {
  { echo 'usage:'; sed -n '4,6p' "$0" | sed 's/^# */  /'; } >&2
  exit 2
}

mode=run
case ${1:-} in
  --setup) mode=setup; shift ;;
  --stop) mode=stop; shift ;;
  -h|--help|"") usage ;;
  -*) echo "$0: unknown option $1" >&2; usage ;;
esac
[[ $# -ge 2 ]] || usage
name=$1 zone=$2
shift 2
[[ -n $name && -n $zone ]] || usage

repo_dir=${REPO_DIR:-her2jax}
python=${PYTHON:-python3}
gcloud=${GCLOUD:-gcloud}
read -r -a gcloud_flags <<< "${GCLOUD_FLAGS:-}"
# shellcheck disable=SC2016  # expands on the worker
pid_file='.run_task.$(hostname).pid'   # in REPO_DIR on each worker, for --stop

on_workers() {   # the remote command -> run on every worker, and wait for all
  "$gcloud" compute tpus tpu-vm ssh "$name" --zone="$zone" --worker=all "${gcloud_flags[@]}" \
    --command="$1"
}

quoted() {   # arguments -> one string that the workers' bash splits back into them
  local joined
  printf -v joined '%q ' "$@"
  printf '%s' "${joined% }"
}

# shellcheck disable=SC2016  # the $ expressions below expand on the workers
case $mode in
  setup)
    [[ $# -le 2 ]] || usage
    url=${1:-} ref=${2:-}
    if [[ -z $url ]]; then
      url=$(git remote get-url origin 2>/dev/null) || {
        echo "$0: no GIT_URL given and this checkout has no 'origin' remote" >&2; exit 2; }
      ref=${ref:-$(git rev-parse HEAD)}
    fi
    ref=${ref:-HEAD}
    echo "tpu_vm: installing ${url} at ${ref} into ${repo_dir} on every worker of ${name}" >&2
    on_workers "set -e
      [ -d $(quoted "$repo_dir")/.git ] || git clone --quiet $(quoted "$url") $(quoted "$repo_dir")
      cd $(quoted "$repo_dir")
      git fetch --quiet origin $(quoted "$ref") && git checkout --quiet --detach FETCH_HEAD
      $(quoted "$python") -m venv .venv
      .venv/bin/pip install --quiet --upgrade pip
      .venv/bin/pip install --quiet -e . 'jax[tpu]'
      echo \"worker \$(hostname): her2jax \$(git rev-parse --short HEAD), jax \$(.venv/bin/python -c 'import jax; print(jax.__version__)')\""
    ;;
  stop)
    [[ $# -eq 0 ]] || usage
    echo "tpu_vm: SIGTERM to her2jax on every worker of ${name} (they save and stop)" >&2
    on_workers "cd $(quoted "$repo_dir") || exit 2
      if [ -f ${pid_file} ]; then kill -TERM \"\$(cat ${pid_file})\" 2>/dev/null || true; fi"
    ;;
  run)
    [[ $# -ge 1 ]] || usage
    status=0
    on_workers "cd $(quoted "$repo_dir") || exit 2
      export HER2JAX_DISTRIBUTED=auto
      worker=\${TPU_WORKER_ID:-\$(curl -sf -m 5 -H Metadata-Flavor:Google \
http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number)}
      if [ -n \"\$worker\" ]; then export TPU_WORKER_ID=\$worker; fi   # run_task.sh names it
      echo \$\$ > ${pid_file}
      exec launch/run_task.sh .venv/bin/her2jax $(quoted "$@")" || status=$?
    if (( status != 0 )); then
      echo "tpu_vm: the run failed (status ${status}); the earliest 'run_task:' line above" \
        "names the worker that died. Run the same command again: it resumes from the latest" \
        "checkpoint." >&2
    fi
    exit "$status"
    ;;
esac
