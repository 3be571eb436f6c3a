#!/bin/bash
# Train on this machine: every GPU (or 2 CPU processes without GPUs), with the recipe's
# launch.strategy (auto: chosen by memory). STRATEGY=zero3 overrides it; so do launch.*=... overrides.
#   launch/one_node.sh configs/runs/cpu_sample_en.yaml [key=value ...]
set -euo pipefail
config=${1:?usage: [STRATEGY=s] launch/one_node.sh RUN.yaml [key=value ...]}
shift
# Only what the user set goes on the line: the recipe's launch.* keys decide the rest.
exec qa-dist launch --config="$config" ${STRATEGY:+--strategy="$STRATEGY"} "$@"
