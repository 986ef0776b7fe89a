"""What a command line asks for, before anything is built: the options, and the checkpoint the
run resumes (spec §3.3), also for a job that torchrun restarted. The parent of spawned workers
asks it too, to know how many to start. Also here: what a resume changes (a --layer-def
typed now, an edited layer-params file), said at start.
"""

import os
import re
from typing import NamedTuple

from . import checkpoint, options
from .cfg import read_cfg, read_text
from .errors import CheckpointError, ConfigError
from .parallel.launch import agent_restarted


class RunPlan(NamedTuple):
    cli: options.Options        # what was typed
    state: dict | None          # the checkpoint to resume, or None
    opts: options.Options       # the final options (spec §3.3)
    argv: list                  # the command line, to plan again (see plan_run)


def plan_run(argv, job_restarted=None):
    """The plan of a command line. `job_restarted`: whether the job restarted (see
    restart_checkpoint); the ranks agree on it once they have met, and plan again if so."""
    cli = options.parse_command_line(argv)
    state = _resume_state(cli, job_restarted)
    return RunPlan(cli, state, _final_options(cli, state), list(argv))


def _resume_state(cli, job_restarted):
    load = cli.load_file if cli.is_given("load_file") else None
    save_file = cli.save_file_override if cli.is_given("save_file_override") else None
    if load is None and save_file and os.path.isdir(save_file) and any(
            map(checkpoint.is_checkpoint_name, os.listdir(save_file))):
        load = save_file            # spec §3.2: an existing --save-file auto-resumes
    load = restart_checkpoint(cli, job_restarted=job_restarted) or load
    return checkpoint.check_resumable(checkpoint.load_state(load)) if load else None


def _final_options(cli, state):
    if state is None:
        options.check_mandatory(cli)
        return cli
    saved = options.Options.from_dict(state["options"])
    merged = options.merge_for_resume(saved, cli)
    # spec §11.4: a resumed run trains its checkpoint's net, so the listing names that net's
    # file, not a --layer-def typed now (ignored_layer_def warns when that one differs).
    merged.values["layer_def"] = saved.values["layer_def"]
    return merged


# -- where a restarted job resumes ---------------------------------------------------------------

def newest_run_dir(save_path):
    """The newest `ConvNet__<time>` directory of --save-path (by its timestamped name), or None."""
    if not os.path.isdir(save_path):
        return None
    runs = sorted(name for name in os.listdir(save_path) if name.startswith("ConvNet__")
                  and os.path.isdir(os.path.join(save_path, name)))
    return os.path.join(save_path, runs[-1]) if runs else None


def restart_checkpoint(cli, env=None, job_restarted=None):
    """What a job restarted by torchrun --max-restarts resumes from, or None (start afresh).

    --save-file DIR resumes by itself (spec §3.2); --load-file resumes the newest checkpoint of
    its directory (the file loaded at first start may be gone: only the newest is kept); with
    --save-path, the newest run directory of that path, which is this job's own: rank 0 creates
    it at start under torchrun (run.py). A run that died before its first checkpoint starts
    afresh. Whether the job restarted is this rank's agent's word unless `job_restarted` says:
    the ranks agree on it (run.py), as a node that replaces a failed one starts its first
    workers into a restarted job."""
    if job_restarted is None:
        job_restarted = agent_restarted(env)
    if not job_restarted:
        return None
    if cli.is_given("load_file"):
        path = cli.load_file
        return path if os.path.isdir(path) else os.path.dirname(path) or "."
    if cli.is_given("save_path") and not cli.is_given("save_file_override"):
        run = newest_run_dir(cli.save_path)
        if run is not None and _has_checkpoint(run):
            return run
    return None


def _has_checkpoint(run_dir):
    try:
        checkpoint.resolve(run_dir)
    except CheckpointError:
        return False
    return True


# -- what a resume changes -------------------------------------------------------------------------

def ignored_layer_def(plan):
    """spec §11.4: a resumed run trains the net stored in its checkpoint. A --layer-def typed
    now that describes another net is ignored, and a warning says so."""
    cli, state, opts, _ = plan
    if state is None or not cli.is_given("layer_def"):
        return []
    typed = os.path.join(opts.layer_path, cli.layer_def)
    if _net_of(read_text(typed)) == _net_of(state["layer_def"]):
        return []
    return [f"--layer-def {typed} is ignored: a resumed run trains the net stored in its "
            f"checkpoint ({state['path']}), which differs; start a new run (without "
            f"--load-file) to train {typed}"]


def changed_params(plan, layer_params_text):
    """On resume, the layer-params values that differ from the checkpoint's, as lines
    `  Layer 'conv1' epsW: 0.01 -> 0.001` under one heading (none if nothing changed)."""
    if plan.state is None:
        return []
    old_text = plan.state["layer_params"]
    old, new = read_cfg("(checkpoint)", old_text), read_cfg("(new)", layer_params_text)
    spelling = {**_key_spellings(old_text), **_key_spellings(layer_params_text)}
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
    return [f"Layer parameters changed since the checkpoint ({plan.opts.layer_params}):",
            *lines]


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
