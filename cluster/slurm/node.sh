#!/usr/bin/env bash
# One node of a dalle-rs job (started once per node, by dalle.sbatch or any
# launcher that sets the variables below). Node 0 runs `dalle launch` (the
# coordinator and this node's workers); the others run `dalle node`, the
# agent that starts one `dalle worker` per device, reports their exits to
# the coordinator and restarts them. Both become this process (exec), so
# SIGTERM (preemption, the time limit with `--signal=TERM@…`) reaches them:
# the workers stop at their next step boundary after its checkpoint, and
# the node exits 75 (0 when the job finished, 1 on a failure).
#
# Environment:
#   SLURM_NODEID, SLURM_NNODES   this node's index and the node count
#   DALLE_COORDINATOR_HOST       node 0's address, as the others reach it
#   DALLE_JOB_TOKEN              the job token (the same on every node)
#   DALLE_JOB_TOKEN_FILE         or a file holding it (its first line),
#                                which wins over DALLE_JOB_TOKEN
#   DALLE_DEVICES_PER_NODE       workers per node (default: the GPUs Slurm
#                                gives the node, else 1)
#   DALLE_SLOT_KIND              cuda (default) or cpu
#   DALLE_PORT                   the coordinator's port (default 29500)
#   DALLE_STATUS_PORT            its status page (default 29501)
#   DALLE_ADVERTISE              how other nodes reach this one (default:
#                                its host name)
#   DALLE_MAX_RESTARTS           local workers restarted at most (default 3)
#   DALLE_RUN_DIR                this node's run directory (default: the
#                                job's run.dir)
#   DALLE_TLS_CERT, DALLE_TLS_KEY  serve the coordinator over TLS with this
#                                certificate and key (PEM, on node 0)
#   DALLE_TLS_CA                 the CA the workers trust (default:
#                                DALLE_TLS_CERT, right for a self-signed one)
#   DALLE_STATUS_TOKEN_FILE      guard the status page with this bearer token
#   DALLE                        the dalle binary (default: dalle on PATH)
#
# Without TLS the job token and the ring secrets cross the cluster network in
# cleartext (plain HTTP/2): anyone who can sniff it can join the job. Set
# DALLE_TLS_CERT and DALLE_TLS_KEY unless that network is trusted.
set -euo pipefail

config=${1:?usage: node.sh CONFIG [dalle global flags...]}
shift
node=${SLURM_NODEID:?SLURM_NODEID is not set}
nodes=${SLURM_NNODES:?SLURM_NNODES is not set}
head=${DALLE_COORDINATOR_HOST:?DALLE_COORDINATOR_HOST is not set}
token_file=()
if [[ -n ${DALLE_JOB_TOKEN_FILE:-} ]]; then
  token_file=(--token-file "$DALLE_JOB_TOKEN_FILE")
else
  : "${DALLE_JOB_TOKEN:?neither DALLE_JOB_TOKEN nor DALLE_JOB_TOKEN_FILE is set}"
fi
per_node=${DALLE_DEVICES_PER_NODE:-${SLURM_GPUS_ON_NODE:-1}}
kind=${DALLE_SLOT_KIND:-cuda}
port=${DALLE_PORT:-29500}
status_port=${DALLE_STATUS_PORT:-29501}
advertise=${DALLE_ADVERTISE:-$(hostname)}
max_restarts=${DALLE_MAX_RESTARTS:-3}
dalle=${DALLE:-dalle}
run_dir=()
if [[ -n ${DALLE_RUN_DIR:-} ]]; then
  run_dir=(--run-dir "$DALLE_RUN_DIR")
fi
scheme=http
serve_tls=()
trust_tls=()
if [[ -n ${DALLE_TLS_CERT:-} ]]; then
  scheme=https
  serve_tls=(--tls-cert "$DALLE_TLS_CERT" --tls-key "${DALLE_TLS_KEY:?DALLE_TLS_KEY is not set}")
  trust_tls=(--tls-ca "${DALLE_TLS_CA:-$DALLE_TLS_CERT}")
elif [[ $node == 0 ]]; then
  echo "node.sh: warning: no DALLE_TLS_CERT: the job token crosses the network in cleartext" >&2
fi
status_guard=()
if [[ -n ${DALLE_STATUS_TOKEN_FILE:-} ]]; then
  status_guard=(--status-token-file "$DALLE_STATUS_TOKEN_FILE")
fi

if [[ $node == 0 ]]; then
  exec "$dalle" --config "$config" "$@" launch \
    --nproc "$per_node" --min-workers $((nodes * per_node)) \
    --listen "0.0.0.0:$port" --status "0.0.0.0:$status_port" --advertise "$advertise" \
    --max-restarts "$max_restarts" \
    "${token_file[@]}" "${serve_tls[@]}" "${trust_tls[@]}" "${status_guard[@]}"
fi

case $kind in
  cuda) workers=(--gpus "$per_node") ;;
  cpu) workers=(--nproc "$per_node") ;;
  *) echo "node.sh: DALLE_SLOT_KIND is cuda or cpu, not $kind" >&2; exit 2 ;;
esac
exec "$dalle" node --coordinator "$scheme://$head:$port" "${workers[@]}" \
  --advertise "$advertise" --max-restarts "$max_restarts" \
  "${run_dir[@]}" "${token_file[@]}" "${trust_tls[@]}"
