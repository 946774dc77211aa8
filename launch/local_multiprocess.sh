#!/usr/bin/env bash
# N processes of one her2jax command on this machine, over loopback: what the multi-process
# tests use, and a way to try a multi-host setup on one box.
#
#   launch/local_multiprocess.sh N [--port=PORT] -- her2jax --config=... --workdir=... --mode=train
#
# Task i runs the command with --coordinator_address=127.0.0.1:PORT --num_processes=N
# --process_id=i appended; its output lines are prefixed "[task i]". SIGTERM / SIGINT to this
# script are passed on to every task (a preemption: they agree on a step, save and stop).
# When a task dies, JAX's coordination service aborts the others after the heartbeat timeout
# (her2jax --heartbeat_timeout_s); this script then names the task that died first.
# Exit status: 0 when every task succeeded, else that of the first task to fail.
# On CPU-only machines give each process devices with
#   XLA_FLAGS=--xla_force_host_platform_device_count=K
set -euo pipefail

usage() { echo "usage: $0 N [--port=PORT] -- COMMAND [ARGS...]" >&2; exit 2; }
[[ $# -ge 3 ]] || usage
num=$1; shift
[[ $num =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$num'" >&2; exit 2; }
port=$(( 20000 + RANDOM % 20000 ))
while [[ $# -gt 0 && $1 != "--" ]]; do
  case $1 in
    --port=*) port=${1#--port=} ;;
    *) usage ;;
  esac
  shift
done
[[ ${1:-} == "--" ]] || usage
shift
[[ $# -ge 1 ]] || usage

declare -A task_of=()
pids=()
for (( i = 0; i < num; i++ )); do
  # bash starts background jobs with SIGINT and SIGQUIT ignored: restore them, so that a
  # forwarded Ctrl-C reaches the task.
  ( trap - INT QUIT
    exec "$@" --coordinator_address="127.0.0.1:${port}" --num_processes="$num" --process_id="$i"
  ) > >(sed -u "s/^/[task $i] /") 2> >(sed -u "s/^/[task $i] /" >&2) &
  pids+=("$!")
  task_of[$!]=$i
done

forwarded=""
forward() {
  forwarded=$1
  echo "local_multiprocess: passing $1 to ${num} task(s)" >&2
  kill "-$1" "${pids[@]}" 2>/dev/null || true
}
trap 'forward TERM' TERM
trap 'forward INT' INT

describe() {  # exit status -> words
  if (( $1 > 128 )); then
    echo "killed by signal $(( $1 - 128 )) ($(kill -l $(( $1 - 128 )) 2>/dev/null || echo '?'))"
  else
    echo "exit status $1"
  fi
}

first_failed="" first_status=0
declare -A running=()
for pid in "${pids[@]}"; do running[$pid]=1; done
while (( ${#running[@]} > 0 )); do
  finished="" status=0
  wait -n -p finished "${!running[@]}" || status=$?
  if [[ -z ${finished:-} ]]; then   # interrupted by a trapped signal: keep waiting
    continue
  fi
  unset "running[$finished]"
  remaining=${#running[@]}
  task=${task_of[$finished]}
  if (( status != 0 )); then
    echo "local_multiprocess: task ${task} (pid ${finished}) ended: $(describe "$status")" >&2
    if [[ -z $first_failed ]]; then
      first_failed=$task first_status=$status
      if (( remaining > 0 )) && [[ -z $forwarded ]]; then
        echo "local_multiprocess: task ${task} died first; the other tasks abort when JAX's" \
          "heartbeat timeout passes" >&2
      fi
    fi
  fi
done
wait   # the output filters

if [[ -n $first_failed && -n $forwarded ]]; then
  echo "local_multiprocess: stopped by SIG${forwarded}" >&2
  exit $(( first_status > 0 ? first_status : 1 ))
elif [[ -n $first_failed ]]; then
  echo "local_multiprocess: FAILED: task ${first_failed} died first ($(describe "$first_status"))" >&2
  exit $(( first_status > 0 ? first_status : 1 ))
fi
