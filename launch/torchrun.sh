#!/usr/bin/env bash
# Data-parallel training with torchrun, one process per GPU; the arguments are convnet.py's.
#   NGPU=2 launch/torchrun.sh --data-provider image --data-path ... --gpu 0 --mini 256 ...
# Knobs (environment): NGPU processes on this machine (default: all its GPUs, else 1);
# MAX_RESTARTS restarts of a failed job, each resuming the newest checkpoint (default 0);
# NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT for several machines (run it on each);
# PYTHON (default python).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NGPU=${NGPU:-$(( gpus > 0 ? gpus : 1 ))}
# NVLink SHARP multicast stays off: where the fabric cannot do it, NCCL hangs at start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ "${NNODES:-1}" -gt 1 ]; then
  where=(--nnodes "$NNODES" --node-rank "${NODE_RANK:?set NODE_RANK}"
         --master-addr "${MASTER_ADDR:?set MASTER_ADDR}" --master-port "${MASTER_PORT:-29500}")
else
  where=(--standalone)
fi
exec "${PYTHON:-python}" -m torch.distributed.run "${where[@]}" --nproc-per-node "$NGPU" \
  --max-restarts "${MAX_RESTARTS:-0}" "$here/../convnet.py" "$@"
