"""One run's cast, built once from the command line: options, device, data, net, optimizer,
console, run directory and history. The loop in train.py only talks to this object.
"""

import contextlib
import os
import random
import sys
import time
from dataclasses import replace

import torch

from . import checkpoint, options, report
from .cfg import read_cfg, read_text
from .errors import OptionError
from .layers import BuildContext
from .model import ConvNet
from .optim import Ccn2SGD, weight_stats
from .providers import ProviderOptions, make_provider


class Session:
    def __init__(self, argv, stream=sys.stdout):
        cli = options.parse_command_line(argv)
        self.state = self._resume_state(cli)
        self.opts = self._final_options(cli)
        self.console = report.Console(is_master=True, stream=stream)
        self.device = self._pick_device()
        self.seed = self._seed()
        self.test_only = bool(self.opts.test_only or self.opts.write_features)
        self._build_data()
        self._build_model()
        self.optimizer = Ccn2SGD(self.model.weight_layers(), self.opts.minibatch_size)
        self.eval_minibatch = max(self.opts.minibatch_size, 256)
        self._restore()
        self.run_dir = self._run_dir()

    # -- construction ------------------------------------------------------------------------
    def _resume_state(self, cli):
        load = cli.load_file if cli.is_given("load_file") else None
        save_file = cli.save_file_override if cli.is_given("save_file_override") else None
        if load is None and save_file and os.path.isdir(save_file) and os.listdir(save_file):
            load = save_file            # spec §3.2: an existing --save-file auto-resumes
        return checkpoint.load_state(load) if load else None

    def _final_options(self, cli):
        if self.state is None:
            options.check_mandatory(cli)
            return cli
        saved = options.Options.from_dict(self.state["options"])
        return options.merge_for_resume(saved, cli)

    def _pick_device(self):
        want = self.opts.device
        if want == "cpu" or (want == "auto" and not torch.cuda.is_available()):
            if want == "auto":
                self.console.line("No CUDA device is available: running on the CPU.")
            return torch.device("cpu")
        if not torch.cuda.is_available():
            raise OptionError("--device cuda: no CUDA device is available on this machine")
        index = self.opts.gpu[0]
        if index >= torch.cuda.device_count():
            raise OptionError(f"--gpu {index}: this machine has {torch.cuda.device_count()} "
                              f"CUDA device(s)")
        torch.cuda.set_device(index)
        return torch.device("cuda", index)

    def _seed(self):
        seed = self.opts.seed
        if seed is None:
            seed = random.SystemRandom().randrange(2**31)
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
            init_batchnum=batchnum, test=False, options=provider_opts)
        self.test_data = make_provider(
            opts.dp_type, opts.data_path, opts.test_batch_range, test=True,
            options=replace(provider_opts, multiview=bool(opts.multiview_test)))

    def _next_cursor(self):
        return tuple(self.state["train_cursor"])

    def _build_model(self):
        opts = self.opts
        def_path = os.path.join(opts.layer_path, opts.layer_def)
        params_path = os.path.join(opts.layer_path, opts.layer_params)
        def_text = self.state["layer_def"] if self.state else read_text(def_path)
        self.layer_params_text = read_text(params_path)
        ctx = BuildContext(self.test_data.get_data_dims, self.test_data.get_num_classes())
        self.layer_def_text = def_text
        self.model = ConvNet(def_path, params_path, ctx, layer_def_text=def_text,
                             layer_params_text=self.layer_params_text).to(self.device)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp32": None}[self._precision()]

    def _precision(self):
        if self.opts.precision != "auto":
            return self.opts.precision
        return "bf16" if self.device.type == "cuda" else "fp32"

    def _restore(self):
        if self.state is None:
            self.epoch, self.batchnum = 1, None
            self.train_outputs, self.test_outputs = [], []
            self.batches_at_start = 0
            return
        state = self.state
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["rng"]["torch"])
        if self.device.type == "cuda" and state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        if self.train_data is not None:
            self.train_data.load_state_dict(state["train_data"])
            self.test_data.load_state_dict(state["test_data"])
        self.epoch, self.batchnum = state["epoch"], state["batchnum"]
        self.train_outputs = [tuple(o) for o in state["train_outputs"]]
        self.test_outputs = [tuple(o) for o in state["test_outputs"]]
        self.batches_at_start = self.batches_done()

    def _run_dir(self):
        if self.opts.is_given("save_file_override") or (self.state and
                                                        self.opts.save_file_override):
            return self.opts.save_file_override
        if self.state is not None:
            return os.path.dirname(self.state["path"])
        return checkpoint.new_run_dir(self.opts.save_path)

    # -- what the loop asks ------------------------------------------------------------------
    def changed_params(self):
        """Keys of the layer-params file that differ from the checkpoint's (printed on resume)."""
        if self.state is None:
            return []
        old = read_cfg("(checkpoint)", self.state["layer_params"])
        new = read_cfg(self.opts.layer_params, self.layer_params_text)
        lines = []
        for sec in new.sections:
            before = old.get(sec.name)
            for key in sec.keys():
                was = before.raw(key, None) if before is not None else None
                if was != sec.raw(key):
                    lines.append(f"Layer '{sec.name}': {key} {was} -> {sec.raw(key)}")
        return lines

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

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def minibatches(self, mats):
        cases, mini = mats[0].shape[0], self.opts.minibatch_size
        for start in range(0, cases, mini):
            yield [m[start:start + mini] for m in mats]

    def feature_layers(self):
        return [self.opts.write_features] if self.test_only and self.opts.write_features else []

    def test_batches_for_event(self):
        """--test-one 1: the next test batch, cycling; 0: the whole test range."""
        if self.opts.test_one:
            return [self.test_data.get_next_batch()]
        return self.all_test_batches()

    def all_test_batches(self):
        for _ in self.opts.test_batch_range:
            yield self.test_data.get_next_batch()

    # -- history and numbers -----------------------------------------------------------------
    def raw_sums(self, sums):
        return {name: [float(v) for v in values.cpu()] for name, values in sums.items()}

    def printed_costs(self, sums, cases):
        return self._filtered(self.raw_sums(sums), cases)

    def _filtered(self, raw, cases):
        """Each cost's printed values from its raw sums (usually: divided by the cases)."""
        layers = self.model.layers
        return [(name, list(layers[name].output_filter(raw[name], max(cases, 1))))
                for name in self.model.printed_costs]

    def record_train(self, epoch, batchnum, sums, cases):
        self.epoch, self.batchnum = epoch, batchnum
        self.train_outputs.append((self.raw_sums(sums), cases))
        return self.printed_costs(sums, cases)

    def record_test(self, sums, cases):
        self.test_outputs.append((self.raw_sums(sums), cases))
        return self.printed_costs(sums, cases)

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
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda"
               else None}
        state = {
            "options": self.opts.to_dict(), "layer_def": self.layer_def_text,
            "layer_params": self.layer_params_text,
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": _to_cpu(self.optimizer.state_dict()),
            "epoch": self.epoch, "batchnum": self.batchnum,
            "train_outputs": self.train_outputs, "test_outputs": self.test_outputs,
            "train_cursor": list(self.train_data.cursor) if self.train_data else [1, None],
            "train_data": self.train_data.state_dict() if self.train_data else {},
            "test_data": self.test_data.state_dict(), "rng": rng,
            "saved_at": time.time(),
        }
        return checkpoint.save(self.run_dir, self.epoch, self.batchnum, state)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj
