#!/usr/bin/env bash
# Data-parallel training with torchrun, one process per GPU; the arguments are convnet.py's.
#   NGPU=2 launch/torchrun.sh --data-provider image --data-path ... --gpu 0 --mini 256 ...
# Several machines: run it on each, with the same NNODES, MASTER_ADDR and MASTER_PORT:
#   NNODES=2 MASTER_ADDR=node0 launch/torchrun.sh ...          (on node0, and on node1)
# Knobs (environment): NGPU processes on this machine (default: all its GPUs, else 1);
# MAX_RESTARTS restarts of a failed job, each resuming the newest checkpoint (default 0);
# NNODES machines, or MIN:MAX for an elastic job; MASTER_ADDR, a machine of the job, whose
# agent serves the rendezvous at MASTER_PORT (default 29500); RDZV_ID the job's name (default
# distconvnet); RDZV_CONF more torchrun --rdzv-conf entries; DISTCONVNET_TIMEOUT seconds that
# nodes wait for each other at the rendezvous, as ranks do in every collective (default 45);
# PYTHON (default python).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NGPU=${NGPU:-$(( gpus > 0 ? gpus : 1 ))}
# NVLink SHARP multicast stays off: where the fabric cannot do it, NCCL hangs at start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
# Every start of the workers meets in a store of its own, served by its rank 0: the agents'
# shared store never admits a node that joins a running job, such as a failed node's
# replacement (torch 2.13).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
export PYTHONPATH="$here/..${PYTHONPATH:+:$PYTHONPATH}"
timeout=${DISTCONVNET_TIMEOUT:-45}
if [ "${NNODES:-1}" != 1 ]; then
  # The node whose address is MASTER_ADDR serves the rendezvous; the others wait for it as
  # long as for each other. An elastic job starts once MIN nodes have joined and no other
  # came for a third of the timeout. (c10d numbers the nodes itself: no --node-rank.)
  conf="join_timeout=$timeout,read_timeout=$timeout,last_call_timeout=$(( timeout / 3 ))"
  where=(--nnodes "$NNODES" --rdzv-backend c10d --rdzv-id "${RDZV_ID:-distconvnet}"
         --rdzv-endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}"
         --rdzv-conf "$conf${RDZV_CONF:+,$RDZV_CONF}")
else
  where=(--standalone)
fi
exec "${PYTHON:-python}" -m distconvnet torchrun "${where[@]}" --nproc-per-node "$NGPU" \
  --max-restarts "${MAX_RESTARTS:-0}" "$here/../convnet.py" "$@"
