"""Every console line of spec §9, as pure functions returning text, and the console that prints.

The original printed with Python 2 `print x,` statements, whose "soft space" puts a space before
the next item printed on the same line, even after a newline inside a string. That is where the
page's double space after `logprob:` and the trailing spaces of the test block come from. The
functions here return those bytes exactly; each says where its text starts and ends, so that the
caller writes them back to back with Console.write and gets the original's output:

    startup:         import_banner, then training_banner unless --test-only
    training batch:  batch_prefix + cost_line + seconds_suffix + "\\n"
    test event:      batch_prefix + cost_line + test_block + weight_block + saved_block
                     + seconds_suffix + "\\n"
    NaN cost:        batch_prefix + cost_line + nan_suffix + "\\n", then stop
    test-only run:   test_only_batch_line + "\\n" + test_only_batch_costs + "\\n" per batch,
                     then test_only_block

Deliberate differences from the original:
* seconds_suffix may add our throughput after the seconds, ` (8.428 sec) [364.5 img/s]`, so the
  original's line stays a prefix of ours.
* In --test-only runs, each batch's line of raw sums is followed by our line of its costs per
  case, as a training batch prints them: `    logprob:  0.265436, 0.077441, 0.077441`.
* The banner says `Using PyTorch <version>` where the original said
  `Importing cudaconvnet._ConvNet C++ module`, and `Running on the CPU` when there is no CUDA.
* Several costs print in the net's order; Python 2 printed them in dict-hash order.
"""

import sys
import time

SEPARATOR = "========================="
TEST_OUTPUT = "======================Test output======================"
AVERAGES = "----------------------Averages-------------------------"
RULE = "-------------------------------------------------------"
CLOSING = "======================================================="
NAN_MESSAGE = "<- error nan or inf!"


# -- startup (spec §9.1 steps 2-5) --------------------------------------------------------------

def import_banner(torch_version):
    """Step 2: printed in every mode, where the original imported its C++ module."""
    return f"{SEPARATOR}\nUsing PyTorch {torch_version}\n"


def training_banner(option_lines, cuda_devices, save_dir, current_time=None):
    """Steps 4-5, printed when training starts (not in --test-only runs, as in the original).
    option_lines: options.option_listing(); cuda_devices: the CUDA device ids in use, empty on
    the CPU; current_time: time.asctime() text, now by default."""
    if current_time is None:
        current_time = time.asctime(time.localtime())
    where = ("Running on CUDA device(s) " + ", ".join("%d" % d for d in cuda_devices)
             if cuda_devices else "Running on the CPU")
    lines = [SEPARATOR, "Training ConvNet", *option_lines, SEPARATOR, where,
             f"Current time: {current_time}", f"Saving checkpoints to {save_dir}", SEPARATOR]
    return "".join(line + "\n" for line in lines)


# -- one training batch (spec §9.2) -------------------------------------------------------------

def batch_prefix(epoch, batchnum, progress):
    """`1.0 (0.00%)... `; the trailing space is the soft space before the costs."""
    return "%d.%d (%.2f%%)... " % (epoch, batchnum, 100 * progress)


def cost_line(costs):
    """`logprob:  7.156030, 1.000000, 0.995768` for costs = [(name, printed values), ...].
    Several costs are separated by one soft space; nothing trails."""
    return " ".join("%s:  %s" % (name, ", ".join("%.6f" % v for v in values))
                    for name, values in costs)


def nan_suffix():
    """Follows cost_line when a first value is NaN or Inf; the original then exited."""
    return " " + NAN_MESSAGE


def seconds_suffix(seconds, images=None):
    """` (8.428 sec)`, then our throughput ` [364.5 img/s]` when images is given."""
    text = " (%.3f sec)" % seconds
    if images and seconds > 0:
        text += " [%.1f img/s]" % (images / seconds)
    return text


# -- a test event (spec §9.2) -------------------------------------------------------------------

def test_block(test_costs, average_costs):
    """Follows the batch's cost_line directly: it ends that line with a soft space (the batch
    line gets its time only after the whole test event), then prints the Test output and
    Averages sections. Both costs lines end with a space, as on the page."""
    return (f" \n{TEST_OUTPUT}\n{cost_line(test_costs)} \n"
            f"{AVERAGES}\n{cost_line(average_costs)} \n")


def weight_block(rows):
    """The rule, then one line per weight matrix and bias vector. rows: (layer name,
    "weights[i]" or "biases", mean |value|, mean |increment|) in layer order, each layer's
    weights before its biases, as optim.weight_stats gives them. The original's soft spaces
    end every line with a space, except a weights[i] line followed by the same layer's
    weights[i+1] (those were joined into one printed string)."""
    text = RULE + " \n"
    for k, (name, label, mean, inc) in enumerate(rows):
        if label == "biases":
            text += "Layer '%s' biases: %e [%e] \n" % (name, mean, inc)
            continue
        ratio = inc / mean if mean > 0 else 0
        joined = k + 1 < len(rows) and rows[k + 1][0] == name and rows[k + 1][1] != "biases"
        text += "Layer '%s' %s: %e [%e] [%e]%s" % (name, label, mean, inc, ratio,
                                                   "\n" if joined else " \n")
    return text


def saved_block(save_dir):
    """save_dir is the run's checkpoint directory (as on the page), not the file. Ends without
    a newline: the batch's seconds_suffix completes the closing line,
    `======================================================= (16.188 sec)`."""
    return f"{RULE}\nSaved checkpoint to {save_dir}\n{CLOSING}"


# -- --test-only runs (spec §9.2) ---------------------------------------------------------------

def test_only_batch_line(batchnum, raw_sums, num_cases, seconds):
    """`batch 1000: ({'logprob': [5512.2, 2903.0, 1501.0]}, 3072) (5.100 sec)`: the original
    printed str() of the (raw cost sums, cases) tuple; Python 3's repr of str keys, float lists
    and ints is the same as Python 2.7's."""
    output = ({str(name): [float(v) for v in values] for name, values in raw_sums.items()},
              int(num_cases))
    return "batch %d: %r (%.3f sec)" % (batchnum, output, seconds)


def test_only_batch_costs(costs):
    """Ours, under each test_only_batch_line: the batch's costs per case, indented."""
    return "    " + cost_line(costs)


def test_only_block(costs, weight_rows):
    """After the last test_only_batch_line and its newline: a blank line (the original's
    leading newline), the test-set costs, then the weight statistics, as print_test_results
    wrote them; there is no Averages section in --test-only runs."""
    return f"\n{TEST_OUTPUT}\n{cost_line(costs)} \n" + weight_block(weight_rows)


# -- other messages ---------------------------------------------------------------------------

def wrote_feature_line(path):
    return f"Wrote feature file {path}"


class Console:
    """Writes only on the master rank, so every rank may call it; flushes each write so that a
    batch's prefix shows while the batch runs. warn() writes from any rank, to stderr, naming
    the rank when there are several. Streams default to the sys ones at the time of writing."""

    def __init__(self, is_master=True, stream=None, world_size=1, warn_stream=None):
        self.is_master = is_master
        self.world_size = world_size
        self._stream, self._warn_stream = stream, warn_stream

    def write(self, text):
        if self.is_master:
            stream = self._stream or sys.stdout
            stream.write(text)
            stream.flush()

    def line(self, text=""):
        self.write(text + "\n")

    def warn(self, rank, text):
        if self.is_master:
            (self._stream or sys.stdout).flush()
        prefix = f"rank {rank}: " if self.world_size > 1 else ""
        stream = self._warn_stream or sys.stderr
        stream.write(f"{prefix}{text}\n")
        stream.flush()
