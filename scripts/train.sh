#!/usr/bin/env bash
# The paper's VIAR training run (VIAR scripts/train.sh): torchrun, one node x 8 GPUs, ImageNet 256px.
#
#   bash scripts/train.sh --data_path /data/imagenet
#
# Extra arguments go to train.py after the recipe, so they override it (e.g. --bs 256 --ep 10). The launch is set by
# environment variables: NPROC (GPUs per node, 8), NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1),
# MASTER_PORT (29500); for two nodes run on each: NNODES=2 NODE_RANK=<0|1> MASTER_ADDR=<node 0's address> bash ...
# DRY_RUN=1 prints the command instead of running it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3

recipe=(--depth=30 --bs=512 --ep=550 --tblr=8e-5 --fp16=1 --alng=1e-5 --wpe=0.01 --twde=0.08
        --use_implicit=True --p_depth=5)
cmd=("$python" -m torch.distributed.run
     --nnodes="${NNODES:-1}" --node_rank="${NODE_RANK:-0}" --nproc_per_node="${NPROC:-8}"
     --master_addr="${MASTER_ADDR:-127.0.0.1}" --master_port="${MASTER_PORT:-29500}"
     train.py "${recipe[@]}" "$@")
if [ -n "${DRY_RUN:-}" ]; then
    printf '%q ' "${cmd[@]}"
    echo
else
    exec "${cmd[@]}"
fi
