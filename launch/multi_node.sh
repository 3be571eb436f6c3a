#!/bin/bash
# Train on several machines started by hand (no Slurm). Run the same line on every machine, with
# the head node's address and this machine's rank (0 on the head node):
#   HEAD=10.0.0.1 NODES=2 RANK=0 launch/multi_node.sh RUN.yaml [key=value ...]   # on the head node
#   HEAD=10.0.0.1 NODES=2 RANK=1 launch/multi_node.sh RUN.yaml [key=value ...]   # on the other
# PORT (the rendezvous port) and STRATEGY are optional: unset, the recipe's launch.port and
# launch.strategy apply. The feature cache (data.cache_dir) should be on a file system every
# machine sees.
set -euo pipefail
config=${1:?usage: HEAD=addr NODES=n RANK=r [PORT=p] [STRATEGY=s] launch/multi_node.sh RUN.yaml [key=value ...]}
shift
exec qa-dist launch --config="$config" --nodes="${NODES:?}" --machine-rank="${RANK:?}" --head="${HEAD:?}" \
    ${PORT:+--port="$PORT"} ${STRATEGY:+--strategy="$STRATEGY"} "$@"
