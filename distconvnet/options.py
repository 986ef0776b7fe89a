"""The command line of convnet.py (spec §3): one table of options, getopt-style parsing,
excuses and requirements, the merge on resume, the usage table and the startup listing.

Deliberate differences from the original (python_util/options.py):
* Our options (the last rows of the table) are new; each row's description says what it does.
* `--feature-path/some/dir` (no space or '=') is read as `--feature-path /some/dir`: the user's
  page writes it that way. Any known option name followed by '/' carries its value likewise.
* Ranges also take comma lists, `0-3,7`, kept in the order written (spec §15 recommends it).
* `--write-features` really requires `--feature-path` (the original named the flag instead of
  the dest, so it never checked: spec §15.12). The trainer treats `--write-features` as
  `--test-only 1`, because the user's page omits it (spec §15.18).
* `--device cpu` makes `--gpu` optional; it then reads `0`, as the wiki says it defaults to.
* `--layer-def` may change on resume (spec §3.2); only `--inner-size` is set_once.
* A bare `--debug` means `--debug 1`; every other option takes a value, as in the original.
  A stray positional argument is an error (getopt silently stopped reading there).
* Errors say `--mini: expected an integer, got 'x'` instead of "Unable to parse option ...".
"""

import copy
import difflib
from dataclasses import dataclass

from .errors import OptionError, brief
from .optiontypes import BOOL, FLOAT, INT, RANGE, STRING, ChoiceType, ListType, ValueProblem


# The default of a mandatory option. The original used None, but our --seed defaults to None.
REQUIRED = object()
EXCUSE_ALL = "all"


@dataclass(frozen=True)
class Option:
    flag: str               # typed as --flag
    dest: str               # the key in Options.values and in checkpoints (the original's name)
    type: object
    default: object         # REQUIRED: mandatory unless excused
    description: str        # the original's words, printed by usage and the startup listing
    excuses: object = ()    # dests that need not be given when this option is, or EXCUSE_ALL
    requires: tuple = ()    # dests that must be given when this option is
    set_once: bool = False  # may not change on resume

    @property
    def is_mandatory(self):
        return self.default is REQUIRED

    def default_value(self):
        return None if self.is_mandatory else copy.deepcopy(self.default)

    def value_text(self, value):
        return "" if value is None else self.type.text(value)


OPTIONS = (
    # IGPUModel's options (python_util/gpumodel.py), with ConvNet's overrides; spec §3.2.
    Option("load-file", "load_file", STRING, "", "Load file", excuses=EXCUSE_ALL),
    Option("save-path", "save_path", STRING, REQUIRED, "Save path",
           excuses=("save_file_override",)),
    Option("save-file", "save_file_override", STRING, REQUIRED, "Save file override",
           excuses=("save_path",)),
    Option("train-range", "train_batch_range", RANGE, REQUIRED, "Data batch range: training"),
    Option("test-range", "test_batch_range", RANGE, REQUIRED, "Data batch range: testing"),
    Option("data-provider", "dp_type", STRING, REQUIRED, "Data provider"),
    Option("test-freq", "testing_freq", INT, 57, "Testing frequency"),
    Option("epochs", "num_epochs", INT, 50000, "Number of epochs"),
    Option("data-path", "data_path", STRING, REQUIRED, "Data path"),
    Option("test-only", "test_only", BOOL, 0, "Test and quit?"),
    Option("test-one", "test_one", BOOL, 1, "Test on one batch at a time?"),
    Option("force-save", "force_save", BOOL, 0, "Force save before quitting"),
    Option("gpu", "gpu", ListType(INT), REQUIRED, "GPU override"),
    # ConvNet's own options (convnet.py).
    Option("mini", "minibatch_size", INT, 128, "Minibatch size"),
    Option("layer-def", "layer_def", STRING, REQUIRED, "Layer definition file"),
    Option("layer-params", "layer_params", STRING, REQUIRED, "Layer parameter file"),
    Option("layer-path", "layer_path", STRING, "", "Layer file path prefix"),
    Option("check-grads", "check_grads", BOOL, 0, "Check gradients and quit?",
           excuses=("data_path", "save_path", "save_file_override", "train_batch_range",
                    "test_batch_range")),
    Option("multiview-test", "multiview_test", BOOL, 0, "Cropped DP: test on multiple patches?"),
    Option("inner-size", "inner_size", INT, 0, "Cropped DP: crop size (0 = don't crop)",
           set_once=True),
    Option("conv-to-local", "conv_to_local", ListType(STRING), [],
           "Convert given conv layers to unshared local"),
    Option("unshare-weights", "unshare_weights", ListType(STRING), [],
           "Unshare weight matrices in given layers"),
    Option("conserve-mem", "conserve_mem", BOOL, 0, "Conserve GPU memory (slower)?"),
    Option("color-noise", "color_noise", FLOAT, 0.0,
           "Add PCA noise to color channels with given scale"),
    Option("test-out", "test_out", STRING, "", "Output test case predictions to given path",
           requires=("logreg_name", "multiview_test")),
    Option("logreg-name", "logreg_name", STRING, "", "Logreg cost layer name (for --test-out)"),
    Option("scalar-mean", "scalar_mean", FLOAT, -1.0,
           "Subtract this scalar from image (-1 = don't)"),
    Option("write-features", "write_features", STRING, "",
           "Write test data features from given layer", requires=("feature_path",)),
    Option("feature-path", "feature_path", STRING, "",
           "Write test data features to this path (to be used with --write-features)"),
    # Ours. Descriptions stay within the original's longest (72 characters), so the startup
    # listing keeps the original's column widths.
    Option("seed", "seed", INT, None,
           "Random seed (default: drawn at random, then kept in the checkpoint)"),
    Option("precision", "precision", ChoiceType("auto", "fp32", "bf16"), "auto",
           "Precision: auto = bf16 autocast on CUDA, fp32 on the CPU"),
    Option("device", "device", ChoiceType("auto", "cpu", "cuda"), "auto",
           "Device: auto = CUDA if present, else the CPU (cpu needs no --gpu)"),
    Option("compile", "compile", ChoiceType("auto", "0", "1"), "auto",
           "torch.compile the net? auto = on CUDA, off on the CPU"),
    Option("deterministic", "deterministic", BOOL, 0,
           "Use deterministic algorithms only (slower, reproducible)?"),
    Option("dist-backend", "dist_backend", ChoiceType("auto", "nccl", "gloo", "mpi"), "auto",
           "Collective backend: auto = nccl on CUDA, else gloo"),
    Option("skip-bad-images", "skip_bad_images", BOOL, 0,
           "Skip images that fail to decode instead of stopping?"),
    Option("tensorboard", "tensorboard", STRING, "",
           "Write TensorBoard scalars to this directory (\"\" = don't)"),
    Option("overwrite-save-file", "overwrite_save_file", BOOL, 0,
           "Let --save-file replace the checkpoints of another run?"),
    Option("debug", "debug", BOOL, 0, "Show Python tracebacks on errors (bare --debug = 1)"),
)

BY_DEST = {row.dest: row for row in OPTIONS}
BY_FLAG = {row.flag: row for row in OPTIONS}


class Options:
    """Typed option values by dest, and the set of dests the user typed."""

    def __init__(self, values, given=()):
        self.values = dict(values)
        self.given = set(given)

    def __getattr__(self, dest):
        try:
            return self.__dict__["values"][dest]
        except KeyError:
            raise AttributeError(f"no option with dest {dest!r}") from None

    def is_given(self, dest):
        return dest in self.given

    def to_dict(self):
        return {"values": copy.deepcopy(self.values), "given": sorted(self.given)}

    @classmethod
    def from_dict(cls, saved):
        """Options stored by to_dict. Dests this code no longer knows are dropped (they would
        mean nothing here); options new in the code get their defaults (spec §3.3)."""
        values = {row.dest: row.default_value() for row in OPTIONS}
        values.update({k: v for k, v in saved["values"].items() if k in BY_DEST})
        return cls(values, (d for d in saved["given"] if d in BY_DEST))


def parse_command_line(argv):
    """getopt-style long options, `--name value` or `--name=value` (spec §3.1). Checks types
    and requirements; mandatory options are checked later by check_mandatory, because a
    checkpoint may supply them."""
    values = {row.dest: row.default_value() for row in OPTIONS}
    given = set()
    i = 0
    while i < len(argv):
        arg = argv[i]
        i += 1
        if not arg.startswith("--") or arg == "--":
            raise OptionError(f"unexpected argument {arg!r}: options are written --name value")
        row, value = _split_option(arg[2:])
        if value is None:
            if row.dest == "debug" and (i == len(argv) or argv[i] not in ("0", "1")):
                value = "1"
            elif i == len(argv):
                raise OptionError(f"option --{row.flag} requires a value")
            else:
                value, i = argv[i], i + 1
        values[row.dest] = _parse_value(row, value)
        given.add(row.dest)
    for row in OPTIONS:
        for dest in row.requires if row.dest in given else ():
            if dest not in given:
                other = BY_DEST[dest]
                raise OptionError(f"Option --{row.flag} ({row.description}) requires option "
                                  f"--{other.flag} ({other.description})")
    if values["device"] == "cpu" and "gpu" not in given:
        values["gpu"] = [0]
    return Options(values, given)


def _split_option(body):
    """(row, value or None) for `name`, `name=value`, or the user's page's `name/path`."""
    for flag in sorted(BY_FLAG, key=len, reverse=True):
        if body.startswith(flag + "/"):
            return BY_FLAG[flag], body[len(flag):]
    name, has_value, value = body.partition("=")
    return _find_option(name), (value if has_value else None)


def _find_option(name):
    """Exact name, else a unique prefix of one, as getopt accepts."""
    if name in BY_FLAG:
        return BY_FLAG[name]
    matches = sorted(flag for flag in BY_FLAG if name and flag.startswith(name))
    if len(matches) == 1:
        return BY_FLAG[matches[0]]
    if matches:
        raise OptionError(f"option --{name} is ambiguous: it could be "
                          + ", ".join("--" + m for m in matches))
    close = difflib.get_close_matches(name, BY_FLAG, n=1)
    raise OptionError(f"unknown option --{name}"
                      + (f" (did you mean --{close[0]}?)" if close else ""))


def _parse_value(row, text):
    try:
        return row.type.parse(text)
    except ValueProblem as e:
        raise OptionError(f"--{row.flag}: {e}") from None
    except ValueError:
        raise OptionError(f"--{row.flag}: expected {row.type.expected}, got {text!r}") from None


def merge_for_resume(saved, argv_options):
    """spec §3.3: the checkpoint's options are the base. An option typed on the new command line
    whose value differs replaces the stored one, unless it is set_once; options not typed keep
    their stored values; options new in the code get defaults."""
    merged = Options.from_dict(saved.to_dict())
    for row in OPTIONS:
        if not argv_options.is_given(row.dest):
            continue
        new = argv_options.values[row.dest]
        if row.dest in saved.values and saved.values[row.dest] == new:
            continue
        if row.set_once and row.dest in saved.values:
            raise OptionError(f"Option --{row.flag} ({row.description}) cannot be changed")
        merged.values[row.dest] = copy.deepcopy(new)
        merged.given.add(row.dest)
    return merged


def stored_value_problem(values):
    """What is wrong with option values stored in a checkpoint (a value of the wrong type for
    its option), or None. Unknown dests are ignored, as Options.from_dict drops them."""
    for dest, value in values.items():
        row = BY_DEST.get(dest)
        if row is None or (value is None and row.default in (None, REQUIRED)):
            continue
        if not row.type.holds(value):
            return f"its option --{row.flag} is {brief(value)}, not {row.type.expected}"
    return None


def check_mandatory(opts):
    """Every option without a default must be given, unless a given option excuses it."""
    for row in OPTIONS:
        if row.is_mandatory and not opts.is_given(row.dest) and not _is_excused(row, opts):
            raise OptionError(f"Option --{row.flag} ({row.description}) not supplied")


def _is_excused(row, opts):
    if row.dest == "gpu" and opts.values.get("device") == "cpu":
        return True
    return any(opts.is_given(other.dest) and (other.excuses == EXCUSE_ALL or
                                              row.dest in other.excuses) for other in OPTIONS)


def usage_text(program="convnet.py", bold=False):
    """The original's usage table: options with defaults first as `[--opt <type>] - desc
    [default]`, sorted by name, then the mandatory ones. Padding and the trailing spaces of
    its Python 2 prints are kept. bold=True adds its ANSI bold (the caller decides, e.g. when
    stdout is a terminal); the column widths then count the escapes, as the original's did."""
    def emphasize(text):
        return f"\033[1m{text}\033[0m" if bold else text

    rows = sorted(OPTIONS, key=lambda row: row.flag)
    rows = [r for r in rows if not r.is_mandatory] + [r for r in rows if r.is_mandatory]
    cells = [(emphasize("--" + r.flag) + f" <{r.type.name}>", r.description,
              None if r.is_mandatory else f"[{r.value_text(r.default)}]") for r in rows]
    widths = [max(len(c[i] or "") for c in cells) for i in range(3)]
    header = " ".join(emphasize(name.ljust(width)) for name, width in
                      zip(("    Option", "Description", "Default"), widths))
    lines = [f"{program} usage:", header + " "]
    for name, description, default in cells:
        lead = f"     {name.ljust(widths[0])}  -" if default is None else \
            f"    [{name.ljust(widths[0])}] -"
        lines.append(f"{lead} {description.ljust(widths[1])} "
                     f"{(default or ' ').ljust(widths[2])} ")
    return "\n".join(lines)


def option_listing(opts):
    """The startup lines of spec §9.1 step 4, as the original's print_values wrote them:
    `<description padded>: <value padded> [DEFAULT]`, sorted by description. Values pad to the
    longest *defaulted* value (typed ones may stick out; they keep the tag's space). Options
    without a real default (mandatory ones; --seed) get no tag and no say in the padding."""
    def is_default(row):
        return not opts.is_given(row.dest) and row.default not in (None, REQUIRED)

    texts = {row.dest: row.value_text(opts.values.get(row.dest)) for row in OPTIONS}
    desc_width = max(len(row.description) for row in OPTIONS)
    value_width = max([len(texts[row.dest]) for row in OPTIONS if is_default(row)], default=0)
    return [f"{row.description.ljust(desc_width)}: {texts[row.dest].ljust(value_width)} "
            f"{'[DEFAULT]' if is_default(row) else ''}"
            for row in sorted(OPTIONS, key=lambda row: row.description)]
