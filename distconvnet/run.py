"""A run: everything one `python convnet.py ...` trains or tests with, built in one function.

build_run(plan) goes top to bottom: who this process is and on which device (the process-wide
settings of knobs.py with it), the job's ranks, the data, the net, the way it trains across
the ranks (parallel/strategy.py), the optimizer, the position and history (resumed from the
checkpoint if there is one), the run directory and the metrics log. The training loop
(train.py), the test passes (evaluate.py) and the benchmark (bench.py) take what they use
from the Run it returns.
"""

import os
import random
from dataclasses import dataclass, replace

import torch

from . import checkpointer, fastpath, knobs, metrics, netedit, report
from .cfg import read_text
from .checkpointer import Checkpointer
from .history import History, RunState
from .layers import BuildContext
from .model import ConvNet
from .optim import Ccn2SGD
from .parallel import launch, strategy
from .parallel.plan import Plan, nodes_of
from .parallel.ranks import join_job
from .parallel.strategy import Strategy
from .providers import ProviderOptions, make_provider
from .providers.batches import Provider
from .runplan import RunPlan, ignored_layer_def, plan_run


@dataclass
class Run:
    plan: RunPlan               # the options and the checkpoint resumed
    console: report.Console
    device: torch.device
    cuda_devices: list          # the CUDA devices of all ranks (empty on the CPU)
    model: ConvNet
    autocast: object            # the forward's precision context (fastpath.autocast)
    strategy: Strategy
    optimizer: Ccn2SGD
    train_data: Provider | None     # None in --test-only runs
    test_data: Provider
    position: RunState
    history: History
    batches_at_start: int       # training batches done at the checkpoint resumed
    checkpointer: Checkpointer
    metrics: object

    @property
    def opts(self):
        return self.plan.opts

    @property
    def test_only(self):
        return bool(self.opts.test_only or self.opts.write_features)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.checkpointer.release()

    def close(self):
        """After a run that succeeded: the run directory, the providers' threads and buffers,
        then the ranks' process groups."""
        self.checkpointer.release()
        for provider in (self.train_data, self.test_data):
            if provider is not None:
                provider.close()
        self.strategy.close()


def build_run(plan, stream=None, data=None, saving=True):
    """The Run of a plan (runplan.plan_run). `data`: the (training, test) providers to use
    instead of the options' (the benchmark's synthetic batches); `saving=False`: a run that
    holds no run directory and logs nothing (the benchmark)."""
    opts = plan.opts
    info = launch.launch_info()
    console = report.Console(is_master=info.is_master, stream=stream,
                             world_size=info.world_size)
    if opts.device == "auto" and not torch.cuda.is_available():
        console.line("No CUDA device is available: running on the CPU.")
    device = launch.pick_device(opts.device, opts.gpu, info)
    precision = fastpath.resolve_precision(opts.precision, device)
    knobs.for_run(device, precision, bool(opts.deterministic))
    ranks = join_job(info, opts.dist_backend, device)
    if _joins_a_restarted_job(ranks):
        plan = plan_run(plan.argv, job_restarted=True)
        opts = plan.opts
    _check_same_checkpoint(ranks, plan.state)
    cuda_devices = sorted(set(ranks.all_gather(device.index))) if device.type == "cuda" else []
    seed = _seed(opts, ranks)
    test_only = bool(opts.test_only or opts.write_features)
    train_data, test_data = data or _providers(plan, seed, device, ranks, test_only)

    model, texts = _build_net(plan, test_data, console)
    model = fastpath.place(model, device)
    model.warnings[:0] = ignored_layer_def(plan)
    trainer, optimizer, autocast = _training(opts, model, ranks, device, precision)

    position = RunState(list(opts.train_batch_range), opts.num_epochs,
                        cursor=train_data.cursor if train_data is not None else (1, None))
    history = History(model, len(opts.test_batch_range))
    if plan.state is not None:
        checkpointer.restore(plan.state, model, optimizer, device, (train_data, test_data),
                             position, history)
    batches_at_start = position.batches_done()
    _seed_dropout_per_rank(seed, ranks.rank, batches_at_start)
    saver, log = _outputs(plan, ranks, info.launcher, console, test_only, texts,
                          batches_at_start, saving)
    return Run(plan, console, device, cuda_devices, model, autocast, trainer, optimizer,
               train_data, test_data, position, history, batches_at_start, saver, log)


def _training(opts, model, ranks, device, precision):
    """(strategy, optimizer, autocast): how the net trains across the ranks (spec §8's plan
    picks the strategy), and the optimizer it steps."""
    parallel_plan = Plan(nodes_of(model))
    trainer = strategy.choose(parallel_plan, ranks)(
        ranks, parallel_plan, model, device, fastpath.resolve_compile(opts.compile, device))
    fused = trainer.fuses_update and fastpath.fused_update(opts.compile, device)
    optimizer = Ccn2SGD(model.weight_layers(), opts.minibatch_size,
                        num_passes=parallel_plan.num_passes,
                        active_pass_period=parallel_plan.active_pass_period, fused=fused)
    autocast = fastpath.autocast(device, precision)
    trainer.attach(optimizer, autocast)
    return trainer, optimizer, autocast


def _outputs(plan, ranks, launcher, console, test_only, texts, batches_at_start, saving):
    """(Checkpointer, metrics log): the run directory this rank holds, if any, and rank 0's
    log of one JSON line per batch and test next to the checkpoints (metrics.py)."""
    if saving:
        saver = checkpointer.open_run_dir(plan, ranks, launcher, test_only, texts)
    else:
        saver = Checkpointer(None, None, ranks.is_master, *texts)
    logging = saving and not test_only
    try:
        log = metrics.open_log(saver.run_dir if logging else None,
                               plan.opts.tensorboard if logging else None,
                               is_master=console.is_master, resume_step=batches_at_start)
    except BaseException:
        saver.release()
        raise
    return saver, log


def _joins_a_restarted_job(ranks):
    """A job restarts as a whole: once the agent of any rank has restarted its workers, every
    rank resumes, also those of a node that joined afresh (a failed node's replacement, whose
    agent has restarted nothing). The options that chose this rank's device are the command
    line's, the same in the resumed plan."""
    restarted = ranks.all_gather(launch.agent_restarted())
    return any(restarted) and not restarted[ranks.rank]


def _check_same_checkpoint(ranks, state):
    paths = ranks.all_gather(state["path"] if state else None)
    if len(set(paths)) > 1:
        raise launch.DistributedError(f"the ranks would resume from different checkpoints "
                                      f"({', '.join(map(str, paths))}): give them one shared "
                                      f"file system")


def _seed(opts, ranks):
    seed = opts.seed
    if seed is None:
        seed = ranks.broadcast(random.SystemRandom().randrange(2**31))
        opts.values["seed"] = seed      # recorded, so the run can be repeated
    torch.manual_seed(seed)
    return seed


def _providers(plan, seed, device, ranks, test_only):
    """(training provider or None for --test-only, test provider), at the resumed position."""
    opts = plan.opts
    provider_opts = ProviderOptions(
        inner_size=opts.inner_size, color_noise=opts.color_noise, scalar_mean=opts.scalar_mean,
        multiview=False, seed=seed, device=device, minibatch=opts.minibatch_size,
        skip_bad_images=bool(opts.skip_bad_images))
    epoch, batchnum = (1, None) if plan.state is None else tuple(plan.state["train_cursor"])
    train = None if test_only else make_provider(
        opts.dp_type, opts.data_path, opts.train_batch_range, init_epoch=epoch,
        init_batchnum=batchnum, test=False, options=provider_opts, rank=ranks.rank,
        world_size=ranks.world_size)
    test = make_provider(
        opts.dp_type, opts.data_path, opts.test_batch_range, test=True,
        options=replace(provider_opts, multiview=bool(opts.multiview_test)), rank=ranks.rank,
        world_size=ranks.world_size)
    return train, test


def _build_net(plan, test_data, console):
    """(the net, (its layer-definition text, the layer-params text)): the checkpoint's net
    with the layer-params file of now when resuming (spec §5), after --unshare-weights and
    --conv-to-local edit it."""
    cli, state, opts, _ = plan
    def_path = os.path.join(opts.layer_path, opts.layer_def)
    params_path = os.path.join(opts.layer_path, opts.layer_params)
    def_text = state["layer_def"] if state else read_text(def_path)
    params_text = read_text(params_path)
    ctx = BuildContext(test_data.get_data_dims, test_data.get_num_classes())
    if state is None:
        return ConvNet(def_path, params_path, ctx, layer_def_text=def_text,
                       layer_params_text=params_text), (def_text, params_text)
    def_text = _edit_loaded_net(plan, params_path, params_text, ctx, console)
    return ConvNet.from_checkpoint(state["path"], def_text, ctx, params_path,
                                   params_text), (def_text, params_text)


def _edit_loaded_net(plan, params_path, params_text, ctx, console):
    """--unshare-weights and --conv-to-local (spec §3.2): edit the checkpoint's net text and
    state before the net is built from them, then forget the edits so that a later resume
    does not apply them again (the reset options are what the next checkpoint stores)."""
    state, opts = plan.state, plan.opts
    unshare, to_local = opts.unshare_weights, opts.conv_to_local
    if not unshare and not to_local:
        return state["layer_def"]
    loaded = ConvNet.from_checkpoint(state["path"], state["layer_def"], ctx, params_path,
                                     params_text)
    def_text, state["model"], state["optimizer"], lines = netedit.apply_edits(
        state["layer_def"], state["model"], state["optimizer"], loaded, unshare, to_local)
    for line in lines:
        console.line(line)
    opts.values["unshare_weights"], opts.values["conv_to_local"] = [], []
    return def_text


def _seed_dropout_per_rank(seed, rank, batches_at_start):
    """Ranks draw different dropout masks: rank 0 goes on with the checkpoint's stream, the
    others with streams of their own (only dropout draws from it)."""
    if rank > 0:
        torch.manual_seed(hash((seed, rank, batches_at_start)) % 2**63)
