# Sourced by train.sbatch and sweep.sbatch (not run on its own): start one `accelerate launch`
# per node with `srun`, all meeting at one rendezvous.
#
#   illm_launch SCRIPT ARGS...
#
# MASTER_ADDR is the first host of the allocation (scontrol); MASTER_PORT is
# ILLM_BASE_PORT (default 29500) plus ILLM_PORT_OFFSET (default 0; sweep tasks that may share
# a node use their array index). --num_machines is the node count, --machine_rank each node's
# $SLURM_NODEID (expanded on that node), --num_processes nodes x GPUS_PER_NODE (default: the
# GPUs SLURM gives each node, else 8). The static rendezvous needs no extra service.

illm_launch() {
    local script=$1
    shift
    local gpus_per_node=${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}
    # sed, not head: head exits early and, under pipefail, scontrol's SIGPIPE would fail the job
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
    MASTER_PORT=$((${ILLM_BASE_PORT:-29500} + ${ILLM_PORT_OFFSET:-0} % 1000))
    export MASTER_ADDR MASTER_PORT
    # Single quotes: $SLURM_NODEID and $SLURM_NNODES are expanded by the shell on each node.
    srun --kill-on-bad-exit=1 bash -c 'accelerate launch \
        --multi_gpu \
        --num_machines "$SLURM_NNODES" \
        --machine_rank "$SLURM_NODEID" \
        --num_processes $((SLURM_NNODES * '"$gpus_per_node"')) \
        --main_process_ip "$MASTER_ADDR" \
        --main_process_port "$MASTER_PORT" \
        --rdzv_backend static \
        --mixed_precision no \
        --dynamo_backend no \
        "$@"' illm-launch "$script" "$@"
}
