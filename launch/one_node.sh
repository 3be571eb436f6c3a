#!/bin/bash
# Train on this machine: every GPU (or 2 CPU processes without GPUs), strategy chosen by memory.
#   launch/one_node.sh configs/runs/cpu_sample_en.yaml [key=value ...]
set -euo pipefail
config=${1:?usage: launch/one_node.sh RUN.yaml [key=value ...]}
shift
exec qa-dist launch --config="$config" --strategy="${STRATEGY:-auto}" "$@"
