#!/usr/bin/env bash
# Runs N JAX processes on this machine, each with M fake CPU devices, joined by
# jax.distributed through a coordinator on 127.0.0.1 and gloo CPU collectives: a multi-host
# run in miniature, for tests and for debugging sharding/multi-process code on a laptop.
#
# Usage:
#   launch/local_multiprocess.sh [options] -- --config=configs/X.py --workdir=DIR [--config.g.f=v ...]
#   launch/local_multiprocess.sh [options] -- COMMAND [ARGS ...]
# Words after `--` that start with an option are arguments of `$PYTHON -m ddpm_jax.main`;
# otherwise they are the command itself. Every process runs the same command.
#
# Options (or the environment variable in brackets):
#   -n, --num-processes N        processes (NUM_PROCESSES, default 2)
#   -d, --devices-per-process M  fake CPU devices per process (DEVICES_PER_PROCESS, default 4)
#   --port P                     coordinator port (PORT, default: a free port)
#   --logdir DIR                 per-process logs DIR/process_<i>.log (LOGDIR, default under /tmp)
#   --timeout S                  stop every process after S seconds, 0 = never (TIMEOUT, default 0)
#   --dry-run                    print the commands and run nothing (DRY_RUN=1)
#
# Needs: bash, the package importable by $PYTHON (default: python, else python3), coreutils
# `timeout` when --timeout is used. Process i runs with JAX_PLATFORMS=cpu,
# XLA_FLAGS=--xla_force_host_platform_device_count=M, JAX_COORDINATOR_ADDRESS=127.0.0.1:P,
# JAX_NUM_PROCESSES=N and JAX_PROCESS_ID=i, which ddpm_jax.runtime.distributed.initialize_if_needed
# reads (ddpm_jax.main calls it first).
#
# Exit status: 0 when every process exits 0. When one fails the others are stopped (a
# process whose peer died would otherwise block in a collective) and the script exits with
# the first failure's status after printing the end of the failed logs.
# Resume: run the same command again with the same --workdir; training resumes from the
# last checkpoint there.
set -euo pipefail

# shq, shjoin, absolute_workdir_args.
# shellcheck source=launch/lib.bash
source "$(dirname "${BASH_SOURCE[0]}")/lib.bash"
die() { echo "local_multiprocess.sh: $*" >&2; exit 2; }

NUM_PROCESSES=${NUM_PROCESSES:-2}
DEVICES_PER_PROCESS=${DEVICES_PER_PROCESS:-4}
PORT=${PORT:-}
LOGDIR=${LOGDIR:-${TMPDIR:-/tmp}/ddpm_jax_local_$(date +%Y%m%d_%H%M%S)_$$}
TIMEOUT=${TIMEOUT:-0}
DRY_RUN=${DRY_RUN:-0}
if [[ -z ${PYTHON:-} ]]; then
  if command -v python >/dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi

while (($#)); do
  case $1 in
    -n | --num-processes) NUM_PROCESSES=${2:?$1 needs a value}; shift 2 ;;
    -d | --devices-per-process) DEVICES_PER_PROCESS=${2:?$1 needs a value}; shift 2 ;;
    --port) PORT=${2:?--port needs a value}; shift 2 ;;
    --logdir) LOGDIR=${2:?--logdir needs a value}; shift 2 ;;
    --timeout) TIMEOUT=${2:?--timeout needs a value}; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (the command goes after '--'; see --help)" ;;
  esac
done
(($#)) || die "no command: give one after '--', e.g. -- --config=configs/X.py --workdir=DIR"
[[ $NUM_PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--num-processes must be a positive integer, got '$NUM_PROCESSES'"
[[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] || die "--devices-per-process must be a positive integer, got '$DEVICES_PER_PROCESS'"
[[ $TIMEOUT =~ ^[0-9]+$ ]] || die "--timeout must be a whole number of seconds, got '$TIMEOUT'"

absolute_workdir_args "$PWD" "$@"
set -- "${ARGS[@]}"
if [[ $1 == -* ]]; then
  command=("$PYTHON" -m ddpm_jax.main "$@")
else
  command=("$@")
fi
if [[ -z $PORT ]]; then
  # Bind port 0 and let the kernel pick; the port is free again once the socket closes.
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
fi
if ! [[ $PORT =~ ^[0-9]+$ ]] || ((PORT < 1 || PORT > 65535)); then
  die "--port must be in 1..65535, got '$PORT'"
fi

# Inherited XLA_FLAGS are kept, except a device count that would contradict ours.
xla_flags=$(sed -E 's/(^| )--xla_force_host_platform_device_count=[^ ]*//g; s/^ +//' <<<"${XLA_FLAGS:-}")
xla_flags="${xla_flags:+$xla_flags }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS"
timeout_prefix=()
((TIMEOUT > 0)) && timeout_prefix=(timeout --kill-after=10 "$TIMEOUT")

lines=()
for ((i = 0; i < NUM_PROCESSES; i++)); do
  words=(env JAX_PLATFORMS=cpu JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo "XLA_FLAGS=$xla_flags"
    "JAX_COORDINATOR_ADDRESS=127.0.0.1:$PORT" "JAX_NUM_PROCESSES=$NUM_PROCESSES"
    "JAX_PROCESS_ID=$i" ${timeout_prefix[@]+"${timeout_prefix[@]}"} "${command[@]}")
  lines+=("$(shjoin "${words[@]}")")
done

if [[ $DRY_RUN == 1 ]]; then
  echo "mkdir -p $(shq "$LOGDIR")"
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    echo "${lines[$i]} > $(shq "$LOGDIR/process_$i.log") 2>&1 &"
  done
  echo "wait  # for all $NUM_PROCESSES; if one fails, stop the others and exit with its status"
  exit 0
fi

mkdir -p "$LOGDIR"
pids=()
stop_all() {
  local pid
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for ((t = 0; t < 50; t++)); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    ((alive)) || return 0
    sleep 0.1
  done
  # Under jax.distributed SIGTERM only requests a preemption checkpoint, which a process
  # blocked on a dead peer never reaches. With --timeout, $pid is `timeout`, which leads its
  # own process group with the python child in it: kill the group, or the child is orphaned.
  for pid in "${pids[@]}"; do
    kill -KILL -- "-$pid" 2>/dev/null || true
    kill -KILL "$pid" 2>/dev/null || true
  done
}
trap 'stop_all; exit 130' INT TERM

echo "local_multiprocess.sh: $NUM_PROCESSES processes x $DEVICES_PER_PROCESS CPU devices," \
  "coordinator 127.0.0.1:$PORT, logs in $LOGDIR" >&2
for ((i = 0; i < NUM_PROCESSES; i++)); do
  # `exec` keeps $! the pid of the process itself, so that it can be stopped.
  bash -c "exec ${lines[$i]}" >"$LOGDIR/process_$i.log" 2>&1 &
  pids+=($!)
done

# Poll rather than `wait -n -p` (bash >= 5.1): which process ended matters for the report.
declare -A status=()
first_failure=""
while ((${#status[@]} < NUM_PROCESSES)); do
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    [[ -n ${status[$i]:-} ]] && continue
    kill -0 "${pids[$i]}" 2>/dev/null && continue
    rc=0
    wait "${pids[$i]}" || rc=$?
    status[$i]=$rc
    if ((rc != 0)) && [[ -z $first_failure ]]; then
      first_failure=$i
      echo "local_multiprocess.sh: process $i exited with status $rc; stopping the others" >&2
      stop_all
    fi
  done
  ((${#status[@]} < NUM_PROCESSES)) && sleep 0.1
done

if [[ -n $first_failure ]]; then
  for ((i = 0; i < NUM_PROCESSES; i++)); do
    ((status[$i] == 0)) && continue
    echo "----- process $i (status ${status[$i]}): tail of $LOGDIR/process_$i.log -----" >&2
    tail -n 30 "$LOGDIR/process_$i.log" >&2 || true
  done
  exit "${status[$first_failure]}"
fi
echo "local_multiprocess.sh: all $NUM_PROCESSES processes exited 0; logs in $LOGDIR" >&2
