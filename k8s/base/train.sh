#!/usr/bin/env bash
# Entry point of every training pod (job.yaml), from the ConfigMap nvp-scripts. The params ConfigMap is its
# environment (NODES, GPUS_PER_NODE, DATA_PATH, OUT_DIR), NODE_RANK the pod's completion index.
set -euo pipefail
# train.yaml is mounted beside this script (/etc/nvp-dist).
config_dir=$(dirname "${BASH_SOURCE[0]}")

# Pods are named <prefix>-<index> in the headless Service's subdomain: <job>-<i> for the Indexed Job,
# <jobset>-<replicatedJob>-<jobIndex>-<i> for a JobSet. Node 0 is the rendezvous; with --no_ssh deepspeed
# resolves none of the hostfile's names, which only size the world and order the ranks.
prefix=${HOSTNAME%-*}
if [[ -z ${MASTER_ADDR:-} ]]; then
  fqdn=$(hostname -f)
  MASTER_ADDR="$prefix-0.${fqdn#*.}"
fi
hostfile=$HOME/hostfile  # HOME is an emptyDir of this pod
for ((i = 0; i < NODES; i++)); do
  echo "$prefix-$i slots=$GPUS_PER_NODE"
done >"$hostfile"

# deepspeed's runner has no SIGTERM handler: ignoring the signal (inherited across exec) keeps it waiting
# for its launch.py child, which handles it, instead of dying at once and taking the container, and the
# ranks' checkpoint, down with it. This shell ignores it too, and waits.
trap '' TERM
# launch.py exits 1 when it is signalled itself, even after its ranks checkpointed and exited 143, and the
# Job's podFailurePolicy reads the container's code: every rank records its own in NVP_EXIT_DIR
# (nvp_dist/train/failures.py), and when all of this pod's ranks agree, theirs is the pod's code. Otherwise
# (a rank killed, or stopped by the watchdog, before it recorded) the launcher's: it passes a failing rank's
# code through (README, Exit codes).
NVP_EXIT_DIR=$(mktemp -d "$HOME/exit-codes.XXXXXX")
export NVP_EXIT_DIR
code=0
deepspeed --no_ssh --node_rank "$NODE_RANK" --hostfile "$hostfile" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  launch/train.py --config "$config_dir/train.yaml" --resume auto \
  "data.path=$DATA_PATH" "train.out_dir=$OUT_DIR" || code=$?
shopt -s nullglob
recorded=("$NVP_EXIT_DIR"/rank*)
if ((${#recorded[@]} == GPUS_PER_NODE)) && [[ $(sort -u "${recorded[@]}" | wc -l) == 1 ]]; then
  code=$(<"${recorded[0]}")
fi
exit "$code"
