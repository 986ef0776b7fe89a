"""What a run saves and restores, and where: it collects the state_dict()s of the net, the
optimizer, the providers, the run's position and history and the random generators into one
checkpoint (checkpoint.py writes and reads the file), in the run directory that the saving rank
holds while it may write there (rundir.py).
"""

import os
import time

import torch

from . import checkpoint, rundir


class Checkpointer:
    """Rank 0 writes the checkpoints of a run into `run_dir`; everything in them is global, so
    any number of ranks can resume from one."""

    def __init__(self, run_dir, claim, is_master, layer_def_text, layer_params_text):
        self.run_dir, self.claim, self.is_master = run_dir, claim, is_master
        self.layer_def_text, self.layer_params_text = layer_def_text, layer_params_text

    def save(self, run):
        if not self.is_master:
            return None
        device, position = run.device, run.position
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}
        # The position is stored three ways (epoch/batchnum, train_cursor, train_data), as the
        # readers of earlier checkpoints expect each of them.
        state = {
            "options": run.opts.to_dict(), "layer_def": self.layer_def_text,
            "layer_params": self.layer_params_text,
            "model": {k: v.detach().cpu() for k, v in run.model.state_dict().items()},
            "optimizer": _to_cpu(run.optimizer.state_dict()),
            "increments": _to_cpu(run.optimizer.increments()),
            "epoch": position.epoch, "batchnum": position.batchnum,
            "train_outputs": run.history.train, "test_outputs": run.history.test,
            "train_cursor": list(position.cursor),
            "train_data": run.train_data.state_dict() if run.train_data else {},
            "test_data": run.test_data.state_dict(), "rng": rng,
            "saved_at": time.time(),
        }
        return checkpoint.save(self.run_dir, position.epoch, position.batchnum, state)

    def release(self):
        if self.claim is not None:
            self.claim.release()


def open_run_dir(plan, ranks, launcher, test_only, texts):
    """The Checkpointer of a run, holding its run directory if this rank saves there: spec
    §3.3's directory is --save-file if typed now, else the loaded checkpoint's directory (not
    the --save-file an earlier run typed: the checkpoint may have moved), else a new one. Rank
    0's choice holds for all. Under torchrun it exists from the start, so that a restarted job
    finds it as the newest run of --save-path (runplan.restart_checkpoint). A --test-only run
    holds it only if it saves (--force-save)."""
    cli, state, opts, _ = plan
    if cli.is_given("save_file_override"):
        run_dir = cli.save_file_override
    elif state is not None:
        run_dir = os.path.dirname(state["path"])
    else:
        run_dir = ranks.broadcast(checkpoint.new_run_dir(opts.save_path))
        if ranks.is_master and launcher == "torchrun" and not test_only:
            os.makedirs(run_dir, exist_ok=True)
    claim = None
    if ranks.is_master and (not test_only or opts.force_save):
        claim = rundir.claim(run_dir, resumed_from=state and state["path"],
                             overwrite=bool(cli.is_given("overwrite_save_file")
                                            and cli.overwrite_save_file),
                             keep_dir=launcher == "torchrun")
    return Checkpointer(run_dir, claim, ranks.is_master, *texts)


def restore(state, model, optimizer, device, providers, position, history):
    """Load a resumed checkpoint into the run's parts, each part's misfit named."""
    file = state["path"]
    checkpoint.check_tensors(state["model"], model.state_dict(), file)
    model.load_state_dict(state["model"])
    with checkpoint.restoring(file, "optimizer state"):
        optimizer.load_state_dict(state["optimizer"])
    with checkpoint.restoring(file, "random state"):
        torch.set_rng_state(state["rng"]["torch"])
        if device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], device)
    with checkpoint.restoring(file, "data position and history"):
        train_data, test_data = providers
        if train_data is not None:
            train_data.load_state_dict(state["train_data"])
            test_data.load_state_dict(state["test_data"])
        history.train = [tuple(o) for o in state["train_outputs"]]
        history.test = [tuple(o) for o in state["test_outputs"]]
    position.epoch, position.batchnum = state["epoch"], state["batchnum"]


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
