"""The trainer on the model-parallel and hybrid nets: `convnet.py --gpu 0,1` and
`--gpu 0,1,2,3` against one process (gloo on the CPU), and on two GPUs over NCCL where there
are two (marked nccl)."""

import re
from pathlib import Path

import numpy as np
import pytest
from dp_helpers import DEVICE_ARGS, assert_same_history, run_ok, single
from net_helpers import LAYERS, cfg_text, no_dropout, with_update_period
from trainer_fixtures import event_costs, run_convnet, run_dir_of, run_in_process, tiny_args

from distconvnet import checkpoint
from distconvnet.parallel.model_parallel import PassSchedule


# -- the trainer: `convnet.py --gpu 0,1` and `--gpu 0,1,2,3` on the hybrid net, against one --

def assert_close_parameters(expected, got, rtol, atol, label):
    """Two checkpoints' weights and increments (the momentum, of a tenth the size: atol / 10),
    layer by layer."""
    for part, part_atol in (("weights", atol), ("increments", atol / 10)):
        for name, entry in expected[part].items():
            theirs = got[part][name]
            for a, b in zip(entry["weights"] + [entry["biases"]],
                            theirs["weights"] + [theirs["biases"]]):
                np.testing.assert_allclose(b, a, rtol=rtol, atol=part_atol,
                                           err_msg=f"{label}: {part} of {name}")


def test_trainer_runs_the_hybrid_net_on_two_and_four_processes_as_on_one(
        digit_cifar, tmp_path, monkeypatch):
    params = tmp_path / "params.cfg"
    params.write_text(no_dropout(cfg_text("test-4gpu-data-model", "params")))
    shares = []
    share_weights = PassSchedule.share_weights
    monkeypatch.setattr(PassSchedule, "share_weights",
                        lambda schedule, optimizer: (shares.append(optimizer.progress),
                                                     share_weights(schedule, optimizer)))
    runs = {}
    for gpus in ("0", "0,1", "0,1,2,3"):
        argv = tiny_args(digit_cifar, tmp_path / f"save{len(gpus)}", "--train-range", "1-2",
                         "--test-range", "6", "--epochs", 1, "--test-freq", 2, "--seed", 5,
                         "--device", "cpu",
                         layer_def=Path(LAYERS) / "layers-test-4gpu-data-model.cfg",
                         layer_params=params)
        argv[argv.index("--gpu") + 1] = gpus
        # One process runs here, where its calls can be counted; the others as real jobs.
        status, out, err = run_in_process(argv) if gpus == "0" else \
            run_convnet(argv, timeout=600)
        assert status == 0, err
        runs[gpus] = (checkpoint.load(run_dir_of(out)), event_costs(out))
    # Two training batches, one test event: the whole net was shared for it, not per batch.
    assert len(shares) == 1
    one, one_costs = runs["0"]
    for gpus in ("0,1", "0,1,2,3"):
        ckpt, costs = runs[gpus]
        np.testing.assert_allclose(costs, one_costs, rtol=1e-5)
        assert_close_parameters(one, ckpt, rtol=1e-4, atol=1e-6, label=gpus)


# -- the trainer on two GPUs, NCCL between the ranks, against one process on one GPU ----------

# --compile 1, what users get on CUDA (auto), on the float32 path: each rank compiles its
# segments with inductor.
COMPILED = ["--device", "cuda", "--precision", "fp32", "--compile", "1"]
# Float32 tolerances of the eager runs: the cost sums (relative), the weights (relative,
# absolute: 3x the CPU test's atol, for dp_helpers.CUDA_SLACK's reason). Compiled segments round
# otherwise (fused kernels; the response norms run their formula instead of the hand-written
# gradient), so they only agree roughly.
EAGER_TOLERANCES, COMPILED_TOLERANCES = (1e-5, 1e-4, 3e-6), (1e-3, 1e-3, 1e-4)
# name: (net, updatePeriod of its fc layers, the two GPUs' device options, tolerances). One GPU
# always runs eager (DEVICE_ARGS["cuda"]). The hybrid's fc layers update after every pass (the
# file's updatePeriod=1; the default, 0, means the same), or once a minibatch (2: both passes).
NCCL_RUNS = {
    "two-tower": ("test-2gpu-model", None, DEVICE_ARGS["cuda"], EAGER_TOLERANCES),
    "hybrid-updatePeriod1": ("test-2gpu-hybrid", 1, DEVICE_ARGS["cuda"], EAGER_TOLERANCES),
    "hybrid-updatePeriod2": ("test-2gpu-hybrid", 2, DEVICE_ARGS["cuda"], EAGER_TOLERANCES),
    "two-tower-compiled": ("test-2gpu-model", None, COMPILED, COMPILED_TOLERANCES),
}


@pytest.mark.nccl
@pytest.mark.slow
@pytest.mark.parametrize("name", list(NCCL_RUNS))
def test_trainer_runs_the_model_parallel_nets_on_two_gpus_as_on_one(
        digit_cifar, tmp_path, name):
    net, period, two_gpu_options, (cost_rtol, rtol, atol) = NCCL_RUNS[name]
    params = tmp_path / "params.cfg"
    params.write_text(no_dropout(with_update_period(cfg_text(net, "params"), period)))
    runs = {}
    for gpus, device_options in (("0", DEVICE_ARGS["cuda"]), ("0,1", two_gpu_options)):
        argv = tiny_args(digit_cifar, tmp_path / f"save{len(gpus)}", "--train-range", "1-2",
                         "--test-range", "6", "--epochs", 1, "--test-freq", 2, "--seed", 5,
                         *device_options, layer_def=Path(LAYERS) / f"layers-{net}.cfg",
                         layer_params=params)
        argv[argv.index("--gpu") + 1] = gpus
        # A rank compiling its segments (first minibatch, first test) keeps the other waiting in
        # a receive, which on a cold compile cache may outlast the default collective timeout.
        out, _ = run_ok(single(argv), timeout=600, DISTCONVNET_TIMEOUT="300")
        runs[gpus] = out, checkpoint.load(run_dir_of(out))
    assert re.search(r"^Running on CUDA device\(s\) 0, 1$", runs["0,1"][0], re.M)
    one, two = runs["0"][1], runs["0,1"][1]
    assert_same_history(one, two, cost_rtol)
    assert_close_parameters(one, two, rtol, atol, name)
