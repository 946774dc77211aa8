#!/usr/bin/env bash
# One task of a multi-host run: runs the command, passes SIGTERM / SIGINT on to it, and when it
# fails prints one line saying which task, where, when and why. Used by slurm.sbatch,
# tpu_vm.sh and k8s/jobset.yaml, one copy per host (or per GPU).
#
#   launch/run_task.sh COMMAND [ARGS...]      e.g. launch/run_task.sh .venv/bin/her2jax --config=...
#
# On a non-zero exit it prints to stderr, once:
#   run_task: task I on HOST ended at 2025-01-31T12:00:00.123Z: <reason>
# When one task of a run dies, JAX's coordination service aborts every other task after the
# heartbeat timeout (her2jax --heartbeat_timeout_s), so all of them print such a line: the
# task with the EARLIEST time is the one that died; the others say they were aborted.
#
# The task index I is the command's own --process_id (what her2jax is told), else SLURM_PROCID,
# TPU_WORKER_ID / CLOUD_TPU_TASK_ID, JOB_COMPLETION_INDEX (Kubernetes Indexed Job), else 0.
# Exit status: the command's (128 + N when signal N killed it).
#
# Why a wrapper and not exec: a shell that runs its command in the foreground runs its signal
# traps only after the command ends, and a container's PID 1 gets no default signal actions;
# so the command runs in the background, this script waits for it and forwards the signals
# (a preemption notice: her2jax saves and stops). Bash starts background commands with SIGINT
# ignored; the subshell below restores it, so a forwarded SIGINT is not lost.
set -uo pipefail

if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  echo "usage: $0 COMMAND [ARGS...]" >&2
  exit 2
fi

task_index() {   # the command's arguments -> this task's index
  local previous="" arg
  for arg in "$@"; do
    case $arg in
      --process_id=*) echo "${arg#--process_id=}"; return ;;
    esac
    if [[ $previous == --process_id ]]; then echo "$arg"; return; fi
    previous=$arg
  done
  echo "${SLURM_PROCID:-${TPU_WORKER_ID:-${CLOUD_TPU_TASK_ID:-${JOB_COMPLETION_INDEX:-0}}}}"
}

describe() {   # exit status -> why the task ended, in words
  local status=$1
  case $status in
    134) echo "aborted (SIGABRT, exit status 134): JAX's coordination service aborted this task" \
              "because a peer stopped sending heartbeats (or never joined), so another task died" \
              "first; look for the earliest 'run_task:' line (if this is the earliest, the abort" \
              "is this task's own error: see the stack trace above)" ;;
    137) echo "killed (SIGKILL, exit status 137), out of memory or by the scheduler: this is the" \
              "task that died (the others abort after the heartbeat timeout)" ;;
    126) echo "exit status 126 (the command is not executable)" ;;
    127) echo "exit status 127 (command not found)" ;;
    *)
      if (( status > 128 )); then
        echo "killed by signal $(( status - 128 )) (SIG$(kill -l $(( status - 128 )) 2>/dev/null \
          || echo '?')), exit status ${status}"
      else
        echo "exit status ${status}"
      fi ;;
  esac
}

task=$(task_index "$@")
host=${HOSTNAME:-$(hostname)}

# Messages go to fd 3 (this script's stderr); fd 2 is silenced while waiting because bash
# reports a background job killed by a signal ("line 12: 345 Aborted ...") on its own.
exec 3>&2
child="" pending=""
forward() {
  if [[ -z $child ]]; then pending=$1; return; fi
  echo "run_task: task ${task} on ${host}: passing SIG$1 to the command" >&3
  kill -s "$1" "$child" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

( trap - INT QUIT; exec "$@" 3>&- ) &
child=$!
if [[ -n $pending ]]; then forward "$pending"; fi

{
  # wait returns early (status > 128) when a trapped signal arrives; wait again while the
  # command is still there, then ask once more for its status (bash remembers it).
  while kill -0 "$child"; do
    wait "$child"
  done
  status=0
  wait "$child" || status=$?
} 2>/dev/null

if (( status != 0 )); then
  echo "run_task: task ${task} on ${host} ended at $(date -u +%Y-%m-%dT%H:%M:%S.%3NZ):" \
    "$(describe "$status")" >&3
fi
exit "$status"
