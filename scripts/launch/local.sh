#!/usr/bin/env bash
# Start N jaxserve processes on this machine as one deployment (process 0 leads and serves
# gRPC; the others follow), with the machine's devices split between them.
#
#   scripts/launch/local.sh N CONFIG [serve args...]
#   COMMAND=generate scripts/launch/local.sh 2 configs/x.yaml --prompt "Hello" --json
#
# GPUs: process i sees the i-th N-th of the GPUs (of CUDA_VISIBLE_DEVICES where it is set,
# else of all of them); their number must be a multiple of N. Without GPUs each
# process gets DEVICES_PER_PROCESS host CPU devices (default 1). The coordinator listens on
# 127.0.0.1:$COORDINATOR_PORT (default: a free port). SIGTERM or SIGINT goes to the leader,
# which drains and then releases the followers. Exits with the leader's code when it is not
# 0, else with the first non-zero code of a follower. A follower that fails makes the
# leader exit too (3: a peer was lost), so that is the code a lost follower gives.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 N CONFIG [args...]" >&2
  exit 2
fi
n=$1
config=$2
shift 2
if ! [[ $n =~ ^[1-9][0-9]*$ ]]; then
  echo "$0: N must be a whole number >= 1 (got '$n')" >&2
  exit 2
fi
here=$(cd "$(dirname "$0")/../.." && pwd)
jaxserve=${JAXSERVE:-$here/.venv/bin/jaxserve}
command=${COMMAND:-serve}
port=${COORDINATOR_PORT:-$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
# The GPUs to split: CUDA_VISIBLE_DEVICES's list where it is set (nvidia-smi ignores it).
if [ -n "${CUDA_VISIBLE_DEVICES+set}" ]; then
  IFS=, read -r -a gpu_ids <<< "$CUDA_VISIBLE_DEVICES"
else
  mapfile -t gpu_ids < <( (nvidia-smi -L 2>/dev/null || true) | grep '^GPU' \
    | sed -E 's/^GPU ([0-9]+):.*/\1/' || true)
fi
gpus=${#gpu_ids[@]}
if [ "$gpus" -gt 0 ] && [ $((gpus % n)) -ne 0 ]; then
  echo "$0: $gpus GPUs (${gpu_ids[*]}) do not split into $n processes evenly" >&2
  exit 2
fi

pids=()
for ((i = 0; i < n; i++)); do
  env_vars=()
  if [ "$gpus" -gt 0 ]; then
    per=$((gpus / n))
    mine=$(IFS=,; echo "${gpu_ids[*]:$((i * per)):$per}")
    env_vars+=("CUDA_VISIBLE_DEVICES=$mine")
  else
    env_vars+=("XLA_FLAGS=${XLA_FLAGS:-} --xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}")
  fi
  extra=()
  if [ "$i" -gt 0 ] && [ "$command" = serve ]; then
    extra+=(--no-progress)
  fi
  env "${env_vars[@]}" "$jaxserve" "$command" --config "$config" \
    --coordinator-address "127.0.0.1:$port" --num-processes "$n" --process-id "$i" \
    "${extra[@]}" "$@" &
  pids+=($!)
done

trap 'kill -TERM "${pids[0]}" 2>/dev/null || true' TERM INT
# reap I: wait for process I and record its exit code. It polls rather than blocking in
# `wait`, which a trapped signal interrupts (returning 128 + the signal, and sometimes -1
# when asked again) while the process runs on or is just exiting.
reap() {
  while kill -0 "${pids[$1]}" 2>/dev/null; do
    sleep 0.2 || true  # a group-wide signal ends the sleep too
  done
  local code=0
  wait "${pids[$1]}" || code=$?
  codes[$1]=$code
  echo "local.sh: process $1 exited with $code" >&2
}
# The group's exit code: the first non-zero one, the leader's first; 0 when all exit 0.
# A follower that fails ends the wait at once (the leader then notices the loss itself).
codes=()
while true; do
  for ((i = 0; i < n; i++)); do
    if [ -z "${codes[$i]:-}" ] && ! kill -0 "${pids[$i]}" 2>/dev/null; then
      reap "$i"
    fi
  done
  if [ -n "${codes[0]:-}" ] || [[ " ${codes[*]} " =~ \ [1-9] ]]; then
    break
  fi
  sleep 0.5 || true
done
for ((i = 0; i < n; i++)); do
  if [ -z "${codes[$i]:-}" ]; then
    reap "$i"
  fi
done
if [ "${codes[0]}" -ne 0 ]; then
  exit "${codes[0]}"
fi
for code in "${codes[@]}"; do
  if [ "$code" -ne 0 ]; then
    exit "$code"
  fi
done
exit 0
