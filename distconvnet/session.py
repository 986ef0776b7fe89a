"""One run's cast, built once from the command line: options, device, data, net, optimizer,
console, run directory and history. The loop in train.py only talks to this object.
"""

import gc
import os
import random
import re
import time
from dataclasses import replace
from typing import NamedTuple

import torch

from . import checkpoint, fastpath, metrics, netedit, options, report, rundir
from .cfg import read_cfg, read_text
from .layers import BuildContext
from .model import ConvNet
from .optim import Ccn2SGD, weight_stats
from .errors import ConfigError, OptionError
from .parallel import data_parallel, launch
from .parallel.model_parallel import PassSchedule
from .parallel.plan import Plan, nodes_of
from .providers import ProviderOptions, make_provider


class RunPlan(NamedTuple):
    cli: options.Options        # what was typed
    state: dict | None          # the checkpoint to resume, or None
    opts: options.Options       # the final options (spec §3.3)


def plan_run(argv, job_restarted=None):
    """What a command line asks for, before anything is built: the parent of spawned workers
    asks it too, to know how many to start. `job_restarted`: see launch.restart_checkpoint."""
    cli = options.parse_command_line(argv)
    state = _resume_state(cli, job_restarted)
    return RunPlan(cli, state, _final_options(cli, state))


def _resume_state(cli, job_restarted):
    load = cli.load_file if cli.is_given("load_file") else None
    save_file = cli.save_file_override if cli.is_given("save_file_override") else None
    if load is None and save_file and os.path.isdir(save_file) and any(
            map(checkpoint.is_checkpoint_name, os.listdir(save_file))):
        load = save_file            # spec §3.2: an existing --save-file auto-resumes
    load = launch.restart_checkpoint(cli, job_restarted=job_restarted) or load
    return checkpoint.check_resumable(checkpoint.load_state(load)) if load else None


def _final_options(cli, state):
    if state is None:
        options.check_mandatory(cli)
        return cli
    saved = options.Options.from_dict(state["options"])
    merged = options.merge_for_resume(saved, cli)
    # spec §11.4: a resumed run trains its checkpoint's net, so the listing names that net's
    # file, not a --layer-def typed now (Session warns when that one differs).
    merged.values["layer_def"] = saved.values["layer_def"]
    return merged


def use_deterministic_algorithms():
    """--deterministic 1: the same run gives the same bits. cuBLAS reads its workspace setting
    when it first starts, so this comes before any CUDA work; cuDNN autotuning, which may pick
    different kernels run to run, is left off by fastpath.place(autotune=False)."""
    os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


class Session:
    def __init__(self, argv, stream=None, plan=None):
        cli, self.state, self.opts = plan or plan_run(argv)
        self.launch = launch.launch_info()
        self.console = report.Console(is_master=self.launch.is_master, stream=stream,
                                      world_size=self.launch.world_size)
        self.device = self._pick_device()
        fastpath.use_own_stream(self.device)
        # The ranks' gradient and cost sync; the identity for one process (parallel/).
        self.sync = data_parallel.make_sync(self.launch, self.opts.dist_backend, self.device)
        self.is_master = self.sync.is_master
        if self._joins_a_restarted_job():
            cli, self.state, self.opts = plan_run(argv, job_restarted=True)
        self._check_same_checkpoint()
        self.cuda_devices = sorted(set(self.sync.all_gather(self.device.index))) \
            if self.device.type == "cuda" else []
        self.seed = self._seed()
        self.test_only = bool(self.opts.test_only or self.opts.write_features)
        self._build_data()
        self._build_model()
        self.model.warnings[:0] = self._ignored_layer_def(cli)
        self.optimizer = Ccn2SGD(self.model.weight_layers(), self.opts.minibatch_size,
                                 num_passes=self.parallel_plan.num_passes,
                                 active_pass_period=self.parallel_plan.active_pass_period,
                                 fused=self.pass_schedule is None and fastpath.fused_update(
                                     self.opts.compile, self.device))
        if self.pass_schedule is not None:
            self.pass_schedule.freeze_remote_layers(self.optimizer)
        self.train_step = fastpath.train_step(
            self.forward, self.optimizer, self.autocast,
            graphs=self.pass_schedule is None and self.sync.world_size == 1
            and fastpath.fused_update(self.opts.compile, self.device)
            and self.optimizer.updates_every_step())
        self.sync.attach(self.optimizer)
        self.eval_minibatch = max(self.opts.minibatch_size, 256)
        self._restore()
        self._seed_dropout_per_rank()
        self.run_dir = self._run_dir(cli)
        self.run_dir_claim = self._claim_run_dir(cli)
        try:
            # Rank 0 logs one JSON line per batch and test next to the checkpoints (metrics.py).
            self.metrics = metrics.open_log(
                None if self.test_only else self.run_dir,
                None if self.test_only else self.opts.tensorboard,
                is_master=self.console.is_master, resume_step=self.batches_at_start)
        except BaseException:
            self.release_run_dir()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.release_run_dir()

    # -- construction ------------------------------------------------------------------------
    def _pick_device(self):
        if self.opts.device == "auto" and not torch.cuda.is_available():
            self.console.line("No CUDA device is available: running on the CPU.")
        if self.opts.deterministic:
            use_deterministic_algorithms()
        return launch.pick_device(self.opts.device, self.opts.gpu, self.launch)

    def _joins_a_restarted_job(self):
        """A job restarts as a whole: once the agent of any rank has restarted its workers,
        every rank resumes, also those of a node that joined afresh (a failed node's
        replacement, whose agent has restarted nothing). The options that chose this rank's
        device are the command line's, the same in the resumed plan."""
        restarted = self.sync.all_gather(launch.agent_restarted())
        return any(restarted) and not restarted[self.sync.rank]

    def _check_same_checkpoint(self):
        paths = self.sync.all_gather(self.state["path"] if self.state else None)
        if len(set(paths)) > 1:
            raise launch.DistributedError(f"the ranks would resume from different checkpoints "
                                          f"({', '.join(map(str, paths))}): give them one "
                                          f"shared file system")

    def _seed(self):
        seed = self.opts.seed
        if seed is None:
            seed = self.sync.broadcast(random.SystemRandom().randrange(2**31))
            self.opts.values["seed"] = seed      # recorded, so the run can be repeated
        torch.manual_seed(seed)
        return seed

    def _build_data(self):
        opts = self.opts
        provider_opts = ProviderOptions(
            inner_size=opts.inner_size, color_noise=opts.color_noise,
            scalar_mean=opts.scalar_mean, multiview=False, seed=self.seed, device=self.device,
            minibatch=opts.minibatch_size, skip_bad_images=bool(opts.skip_bad_images))
        epoch, batchnum = (1, None) if self.state is None else self._next_cursor()
        self.train_data = None if self.test_only else make_provider(
            opts.dp_type, opts.data_path, opts.train_batch_range, init_epoch=epoch,
            init_batchnum=batchnum, test=False, options=provider_opts, rank=self.sync.rank,
            world_size=self.sync.world_size)
        self.test_data = make_provider(
            opts.dp_type, opts.data_path, opts.test_batch_range, test=True,
            options=replace(provider_opts, multiview=bool(opts.multiview_test)),
            rank=self.sync.rank, world_size=self.sync.world_size)

    def _next_cursor(self):
        return tuple(self.state["train_cursor"])

    def _build_model(self):
        opts = self.opts
        def_path = os.path.join(opts.layer_path, opts.layer_def)
        params_path = os.path.join(opts.layer_path, opts.layer_params)
        def_text = self.state["layer_def"] if self.state else read_text(def_path)
        self.layer_params_text = read_text(params_path)
        ctx = BuildContext(self.test_data.get_data_dims, self.test_data.get_num_classes())
        if self.state:
            def_text = self._edit_loaded_net(params_path, def_text, ctx)
            model = ConvNet.from_checkpoint(self.state["path"], def_text, ctx, params_path,
                                            self.layer_params_text)
        else:
            model = ConvNet(def_path, params_path, ctx, layer_def_text=def_text,
                            layer_params_text=self.layer_params_text)
        self.layer_def_text = def_text
        self.model = fastpath.place(model, self.device, autotune=not self.opts.deterministic)
        self.precision = fastpath.resolve_precision(self.opts.precision, self.device)
        self.autocast = fastpath.autocast(self.device, self.precision)
        self.parallel_plan = Plan(nodes_of(self.model))
        self.pass_schedule = self._pass_schedule()
        # The pass schedule syncs what it must itself; DDP would sync every weight everywhere.
        wrapped = self.model if self.pass_schedule is not None else self.sync.wrap(self.model)
        forward = fastpath.forward_fn(wrapped,
                                      fastpath.resolve_compile(self.opts.compile, self.device))
        self.forward = forward if self.pass_schedule is not None else \
            self.sync.forward_fn(forward)

    def _ignored_layer_def(self, cli):
        """spec §11.4: a resumed run trains the net stored in its checkpoint. A --layer-def
        typed now that describes another net is ignored, and a warning says so."""
        if self.state is None or not cli.is_given("layer_def"):
            return []
        typed = os.path.join(self.opts.layer_path, cli.layer_def)
        if _net_of(read_text(typed)) == _net_of(self.state["layer_def"]):
            return []
        return [f"--layer-def {typed} is ignored: a resumed run trains the net stored in its "
                f"checkpoint ({self.state['path']}), which differs; start a new run (without "
                f"--load-file) to train {typed}"]

    def _edit_loaded_net(self, params_path, def_text, ctx):
        """--unshare-weights and --conv-to-local (spec §3.2): edit the checkpoint's net text and
        state before the net is built from them, then forget the edits so that a later resume
        does not apply them again (the reset options are what the next checkpoint stores)."""
        unshare, to_local = self.opts.unshare_weights, self.opts.conv_to_local
        if not unshare and not to_local:
            return def_text
        loaded = ConvNet.from_checkpoint(self.state["path"], def_text, ctx, params_path,
                                         self.layer_params_text)
        def_text, self.state["model"], self.state["optimizer"], lines = netedit.apply_edits(
            def_text, self.state["model"], self.state["optimizer"], loaded, unshare, to_local)
        for line in lines:
            self.console.line(line)
        self.opts.values["unshare_weights"], self.opts.values["conv_to_local"] = [], []
        return def_text

    def _pass_schedule(self):
        """spec §8: several passes per minibatch (hybrid nets), or layers spread over several
        processes, run the pass schedule; one pass on one process, or a data-parallel net on
        several (DDP or MPI), runs the plain forward."""
        world = self.sync.world_size
        plan = self.parallel_plan
        if plan.num_passes == 1 and (world == 1 or plan.is_data_parallel):
            return None
        if world > 1 and self.opts.dist_backend == "mpi":
            raise OptionError("--dist-backend mpi syncs data-parallel nets only; this net "
                              "places layers on different GPUs (gpu=): use gloo or nccl")
        schedule = PassSchedule(self.model, plan, world_size=world, rank=self.sync.rank,
                                compile_layers=fastpath.resolve_compile(self.opts.compile,
                                                                        self.device))
        schedule.create_process_groups()
        return schedule

    def _restore(self):
        if self.state is None:
            self.epoch, self.batchnum = 1, None
            self.train_outputs, self.test_outputs = [], []
            self.batches_at_start = 0
            return
        state, file = self.state, self.state["path"]
        checkpoint.check_tensors(state["model"], self.model.state_dict(), file)
        self.model.load_state_dict(state["model"])
        with checkpoint.restoring(file, "optimizer state"):
            self.optimizer.load_state_dict(state["optimizer"])
        with checkpoint.restoring(file, "random state"):
            torch.set_rng_state(state["rng"]["torch"])
            if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
                torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        with checkpoint.restoring(file, "data position and history"):
            if self.train_data is not None:
                self.train_data.load_state_dict(state["train_data"])
                self.test_data.load_state_dict(state["test_data"])
            self.train_outputs = [tuple(o) for o in state["train_outputs"]]
            self.test_outputs = [tuple(o) for o in state["test_outputs"]]
        self.epoch, self.batchnum = state["epoch"], state["batchnum"]
        self.batches_at_start = self.batches_done()

    def _seed_dropout_per_rank(self):
        """Ranks draw different dropout masks: rank 0 goes on with the checkpoint's stream,
        the others with streams of their own (only dropout draws from it)."""
        if self.sync.rank > 0:
            torch.manual_seed(hash((self.seed, self.sync.rank, self.batches_at_start)) % 2**63)

    def _run_dir(self, cli):
        """spec §3.3: --save-file if typed now, else the loaded checkpoint's directory (not the
        --save-file an earlier run typed: the checkpoint may have moved), else a new one. Rank
        0's choice holds for all. Under torchrun it exists from the start, so that a restarted
        job finds it as the newest run of --save-path (launch.restart_checkpoint)."""
        if cli.is_given("save_file_override"):
            return cli.save_file_override
        if self.state is not None:
            return os.path.dirname(self.state["path"])
        run_dir = self.sync.broadcast(checkpoint.new_run_dir(self.opts.save_path))
        if self.is_master and self.launch.launcher == "torchrun" and not self.test_only:
            os.makedirs(run_dir, exist_ok=True)
        return run_dir

    def _claim_run_dir(self, cli):
        """The saving rank holds its run directory while it may write there (rundir.py)."""
        if not self.is_master or (self.test_only and not self.opts.force_save):
            return None
        return rundir.claim(self.run_dir, resumed_from=self.state and self.state["path"],
                            overwrite=bool(cli.is_given("overwrite_save_file")
                                           and cli.overwrite_save_file),
                            keep_dir=self.launch.launcher == "torchrun")

    def release_run_dir(self):
        if self.run_dir_claim is not None:
            self.run_dir_claim.release()

    # -- what the loop asks ------------------------------------------------------------------
    def changed_params(self):
        """On resume, the layer-params values that differ from the checkpoint's, as lines
        `  Layer 'conv1' epsW: 0.01 -> 0.001` under one heading (none if nothing changed)."""
        if self.state is None:
            return []
        old_text, new_text = self.state["layer_params"], self.layer_params_text
        old, new = read_cfg("(checkpoint)", old_text), read_cfg("(new)", new_text)
        spelling = {**_key_spellings(old_text), **_key_spellings(new_text)}
        names = [s.name for s in new.sections] + [s.name for s in old.sections
                                                  if s.name not in new]
        lines = []
        for name in names:
            before, after = _values_of(old.get(name)), _values_of(new.get(name))
            for key in list(after) + [k for k in before if k not in after]:
                was, now = before.get(key, "(not set)"), after.get(key, "(not set)")
                if was != now:
                    lines.append(f"  Layer '{name}' {spelling.get(key, key)}: {was} -> {now}")
        if not lines:
            return []
        return [f"Layer parameters changed since the checkpoint ({self.opts.layer_params}):",
                *lines]

    def finished(self):
        return self.train_data.cursor[0] > self.opts.num_epochs

    def batch_index(self, batchnum):
        return list(self.opts.train_batch_range).index(batchnum)

    def batches_done(self):
        if self.batchnum is None:
            return 0
        return len(self.opts.train_batch_range) * (self.epoch - 1) + \
            self.batch_index(self.batchnum) + 1

    def progress(self, epoch, batchnum):
        """spec §2: clamp((batches_done − 1) / (epochs × len(train_range)), 0, 1)."""
        n = len(self.opts.train_batch_range)
        done = n * (epoch - 1) + self.batch_index(batchnum) + 1
        return min(max((done - 1) / (self.opts.num_epochs * n), 0.0), 1.0)

    def minibatches(self, batch):
        """This rank's piece of each --mini slice of a training batch (the whole slice for one
        rank)."""
        start = 0
        for size in self.sync.shard_sizes(self._whole_cases(batch), self.opts.minibatch_size):
            yield [m[start:start + size] for m in batch.mats]
            start += size

    def minibatch_sizes(self, batch):
        """The size of each whole --mini slice of a training batch, over all ranks."""
        total, mini = self._whole_cases(batch), self.opts.minibatch_size
        return [min(mini, total - start) for start in range(0, total, mini)]

    def _whole_cases(self, batch):
        """The cases of a training batch over all ranks: the provider that sharded it knows
        them, so no rank needs to ask the others."""
        return self.train_data.num_cases(batch.batchnum)

    def sum_over_ranks(self, sums, cases):
        """A batch's cost sums and cases over all ranks (unchanged for one process)."""
        return self.sync.sum_over_ranks(sums, cases)

    def gather_rows(self, tensors):
        """Rows of this rank's shard of a test batch, in the batch's order on rank 0; None on
        the other ranks."""
        return self.sync.gather_rows(tensors, self.opts.minibatch_size)

    def close(self):
        self.release_run_dir()
        for provider in (self.train_data, self.test_data):
            if hasattr(provider, "close"):
                provider.close()    # the image provider's threads and DALI buffers
        # DDP's reducer and the pass schedule hold process groups: dropped here, the groups
        # end inside destroy_process_group, not whenever the last reference goes (possibly at
        # interpreter shutdown, where gloo's threads can abort the process; CI once saw a rank
        # die at exit with "terminate called without an active exception").
        self.forward = self.pass_schedule = None
        gc.collect()
        self.sync.close()

    def feature_layers(self):
        return [self.opts.write_features] if self.test_only and self.opts.write_features else []

    def test_batches_for_event(self):
        """--test-one 1: the next test batch, cycling; 0: the whole test range."""
        if self.opts.test_one:
            return [self._next_test_batch()]
        return self.all_test_batches()

    def all_test_batches(self):
        for _ in self.opts.test_batch_range:
            yield self._next_test_batch()

    def _next_test_batch(self):
        batch = self.test_data.get_next_batch()
        self.report_data_warnings(self.test_data)
        return batch

    def report_data_warnings(self, provider):
        """What a provider handled on its own (bad images replaced), on stderr, from any rank."""
        for text in getattr(provider, "take_warnings", list)():
            self.console.warn(self.sync.rank, f"warning: {text}")

    # -- history and numbers -----------------------------------------------------------------
    def raw_sums(self, sums):
        """{cost name: [float]} of device or host sums, in one copy to the host."""
        if not sums:
            return {}
        flat = torch.cat([values.detach().double().flatten() for values in sums.values()])
        numbers = flat.tolist()
        raw, start = {}, 0
        for name, values in sums.items():
            raw[name], start = numbers[start:start + values.numel()], start + values.numel()
        return raw

    def printed_costs(self, sums, cases):
        return self._filtered(self.raw_sums(sums), cases)

    def _filtered(self, raw, cases):
        """Each cost's printed values from its raw sums (usually: divided by the cases)."""
        layers = self.model.layers
        return [(name, list(layers[name].output_filter(raw[name], max(cases, 1))))
                for name in self.model.printed_costs]

    def record_train(self, epoch, batchnum, sums, cases):
        self.epoch, self.batchnum = epoch, batchnum
        return self._record(self.train_outputs, sums, cases)

    def record_test(self, sums, cases):
        return self._record(self.test_outputs, sums, cases)

    def _record(self, history, sums, cases):
        """Append the batch's sums to `history`; returns the printed costs."""
        raw = self.raw_sums(sums)
        history.append((raw, cases))
        return self._filtered(raw, cases)

    def test_averages(self):
        """The last len(test_range) test events, case-weighted (spec §7)."""
        recent = self.test_outputs[-len(self.opts.test_batch_range):]
        cases = sum(n for _, n in recent)
        totals = {}
        for sums, _ in recent:
            for name, values in sums.items():
                totals[name] = [a + b for a, b in zip(totals.get(name, [0.0] * len(values)),
                                                      values)]
        return self._filtered(totals, cases)

    def weight_stats(self):
        return weight_stats(self.model.weight_layers(), self.optimizer)

    # -- saving --------------------------------------------------------------------------------
    def save(self):
        """Rank 0 writes the checkpoint; everything in it is global, so any number of ranks
        can resume from it."""
        if not self.is_master:
            return None
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
               else None}
        state = {
            "options": self.opts.to_dict(), "layer_def": self.layer_def_text,
            "layer_params": self.layer_params_text,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "increments": _to_cpu(self.optimizer.increments()),
            "epoch": self.epoch, "batchnum": self.batchnum,
            "train_outputs": self.train_outputs, "test_outputs": self.test_outputs,
            "train_cursor": list(self.train_data.cursor) if self.train_data else [1, None],
            "train_data": self.train_data.state_dict() if self.train_data else {},
            "test_data": self.test_data.state_dict(), "rng": rng,
            "saved_at": time.time(),
        }
        return checkpoint.save(self.run_dir, self.epoch, self.batchnum, state)


def _values_of(section):
    return {} if section is None else {key: section.raw(key) for key in section.keys()}


def _net_of(cfg_text):
    """What a layer-def text says, without its comments and layout (None if it does not parse)."""
    try:
        return [(s.name, _values_of(s)) for s in read_cfg("(layer-def)", cfg_text).sections]
    except ConfigError:
        return None


def _key_spellings(cfg_text):
    """{lower-cased key: the key as written}: the cfg reader folds case, the user did not."""
    found = re.findall(r"^\s*([A-Za-z_]\w*)\s*[=:]", cfg_text, re.M)
    return {key.lower(): key for key in found}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
