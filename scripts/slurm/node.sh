#!/usr/bin/env bash
# One per node, started by srun from common.sh: torchrun for this node's ranks.
#
# A SIGUSR1 for the step reaches every process in it. The training ranks catch it (save a
# checkpoint, exit 0), but torchrun itself would die of it (Python's default action) and take
# the step down with it, so torchrun and, until they install their handler, the ranks start
# with SIGUSR1 ignored. This script passes the signal on to the ranks again every few seconds
# until they exit, so that one that was still starting up when it came gets it too.
set -u
source "$ZT_ROOT/scripts/slurm/common.sh"
script=$1
shift
(
    trap '' USR1
    exec "$ZT_PYTHON" -m torch.distributed.run --nnodes="$ZT_NNODES" --node_rank="$SLURM_NODEID" \
        --nproc_per_node="$ZT_NPROC_PER_NODE" --master_addr="$MASTER_ADDR" --master_port="$MASTER_PORT" \
        "$script" "$@"
) &
launcher=$!

stopping=0
trap 'stopping=1' USR1
while kill -0 "$launcher" 2>/dev/null; do
    if [ "$stopping" = 1 ]; then
        for rank in $(zt_children "$launcher"); do
            kill -USR1 "$rank" 2>/dev/null
        done
        sleep 5 &
        wait $!
    else
        wait "$launcher"
    fi
done
wait "$launcher"
