"""Console text, byte for byte against the transcripts of the user's page (TrainingExample.md)."""

import io

from distconvnet import report

LOGPROB = "logprob"

# The user's page, verbatim (trailing spaces included).
PAGE_BATCH_LINES = [
    "1.0 (0.00%)... logprob:  7.156030, 1.000000, 0.995768 (8.428 sec)",
    "1.1 (0.00%)... logprob:  7.064633, 0.999674, 0.996419 (8.364 sec)",
    "1.2 (0.01%)... logprob:  7.001623, 0.999349, 0.994466 (8.365 sec)",
]
PAGE_TEST_BLOCK = "".join(line + "\n" for line in [
    "======================Test output======================",
    "logprob:  5.305025, 0.938802, 0.819987 ",
    "----------------------Averages-------------------------",
    "logprob:  5.305025, 0.938802, 0.819987 ",
    "------------------------------------------------------- ",
    "Layer 'conv1' weights[0]: 7.898808e-03 [2.681663e-05] [3.395022e-03] ",
    "Layer 'conv1' biases: 2.679429e-04 [8.097122e-07] ",
    "Layer 'conv2' weights[0]: 7.992361e-03 [4.403163e-06] [5.509215e-04] ",
    "Layer 'conv2' biases: 9.996093e-01 [1.494067e-06] ",
    "Layer 'conv3' weights[0]: 2.364471e-02 [2.431529e-06] [1.028360e-04] ",
    "Layer 'conv3' biases: 7.078890e-04 [7.436417e-06] ",
    "Layer 'conv5' weights[0]: 2.368802e-02 [4.521301e-06] [1.908687e-04] ",
    "Layer 'conv5' biases: 9.988006e-01 [8.624080e-06] ",
    "Layer 'fc4096a' weights[0]: 7.150869e-03 [1.230828e-06] [1.721229e-04] ",
    "Layer 'fc4096a' biases: 9.999307e-01 [2.777610e-06] ",
    "Layer 'fc4096b' weights[0]: 7.796859e-03 [3.070737e-06] [3.938428e-04] ",
    "Layer 'fc4096b' biases: 9.987001e-01 [7.562206e-06] ",
    "Layer 'fc1000' weights[0]: 7.961722e-03 [5.245239e-06] [6.588071e-04] ",
    "Layer 'fc1000' biases: 6.999997e+00 [1.039037e-04] ",
    "-------------------------------------------------------",
    "Saved checkpoint to /usr/local/storage/akrizhevsky/tmp/ConvNet__2014-07-16_14.25.04",
    "======================================================= (16.188 sec)",
])
# The page's conv4 lines are left out: its biases line reads "[9.176imagenete-06]", a search-and-
# replace accident in the wiki, not something a printf can produce.

# Unrounded means that print as the page does (the page's ratios come from unrounded means, so
# conv2 and conv3 need a digit more than the page shows).
PAGE_WEIGHT_STATS = [
    ("conv1", "weights[0]", 7.898808e-03, 2.681663e-05),
    ("conv1", "biases", 2.679429e-04, 8.097122e-07),
    ("conv2", "weights[0]", 7.9923606e-03, 4.403163e-06),
    ("conv2", "biases", 9.996093e-01, 1.494067e-06),
    ("conv3", "weights[0]", 2.364471e-02, 2.43152855e-06),
    ("conv3", "biases", 7.078890e-04, 7.436417e-06),
    ("conv5", "weights[0]", 2.368802e-02, 4.521301e-06),
    ("conv5", "biases", 9.988006e-01, 8.624080e-06),
    ("fc4096a", "weights[0]", 7.150869e-03, 1.230828e-06),
    ("fc4096a", "biases", 9.999307e-01, 2.777610e-06),
    ("fc4096b", "weights[0]", 7.796859e-03, 3.070737e-06),
    ("fc4096b", "biases", 9.987001e-01, 7.562206e-06),
    ("fc1000", "weights[0]", 7.961722e-03, 5.245239e-06),
    ("fc1000", "biases", 6.999997e+00, 1.039037e-04),
]
SAVE_DIR = "/usr/local/storage/akrizhevsky/tmp/ConvNet__2014-07-16_14.25.04"


def test_batch_lines_match_the_page():
    total = 90 * 418                  # --epochs 90 over --train-range 0-417
    batches = [((1, 0, 0 / total), [7.156030, 1.0, 0.995768], 8.428),
               ((1, 1, 1 / total), [7.064633, 0.999674, 0.996419], 8.364),
               ((1, 2, 2 / total), [7.001623, 0.999349, 0.994466], 8.365)]
    lines = [report.batch_prefix(*cursor) + report.cost_line([(LOGPROB, values)])
             + report.seconds_suffix(seconds) for cursor, values, seconds in batches]
    assert lines == PAGE_BATCH_LINES


def test_throughput_follows_the_original_line():
    line = (report.batch_prefix(1, 0, 0.0) + report.cost_line([(LOGPROB, [7.15603, 1, 0.995768])])
            + report.seconds_suffix(8.428, images=3072))
    assert line == PAGE_BATCH_LINES[0] + " [364.5 img/s]"
    assert report.seconds_suffix(0.0, images=3072) == " (0.000 sec)"


def test_progress_percentage_rounds_like_printf():
    assert report.batch_prefix(12, 201, 0.123456) == "12.201 (12.35%)... "
    assert report.batch_prefix(90, 417, 1.0) == "90.417 (100.00%)... "


def test_several_costs_share_the_line_separated_by_a_soft_space():
    costs = [(LOGPROB, [2.0, 0.5]), ("sqdiff", [0.25])]
    assert report.cost_line(costs) == "logprob:  2.000000, 0.500000 sqdiff:  0.250000"


def test_nan_message_follows_the_costs():
    text = report.cost_line([(LOGPROB, [float("nan"), 1.0])]) + report.nan_suffix()
    assert text == "logprob:  nan, 1.000000 <- error nan or inf!"


def test_test_event_matches_the_page():
    page_first = PAGE_BATCH_LINES[0][:PAGE_BATCH_LINES[0].index(" (8.428")]
    out = io.StringIO()
    console = report.Console(is_master=True, stream=out)
    console.write(report.batch_prefix(1, 0, 0.0))
    console.write(report.cost_line([(LOGPROB, [7.156030, 1.0, 0.995768])]))
    console.write(report.test_block([(LOGPROB, [5.305025, 0.938802, 0.819987])],
                                    [(LOGPROB, [5.305025, 0.938802, 0.819987])]))
    console.write(report.weight_block(PAGE_WEIGHT_STATS))
    console.write(report.saved_block(SAVE_DIR))
    console.line(report.seconds_suffix(16.188))
    # The batch line before a test block keeps its soft space and loses its time (spec §9.2).
    assert out.getvalue() == page_first + " \n" + PAGE_TEST_BLOCK


def test_weight_lines_of_a_multi_matrix_layer():
    rows = [("fc10", "weights[0]", 0.5, 0.001), ("fc10", "weights[1]", 0.25, 0.0),
            ("fc10", "weights[2]", 0.0, 0.0), ("fc10", "biases", 1.0, 0.5)]
    assert report.weight_block(rows) == (
        "------------------------------------------------------- \n"
        "Layer 'fc10' weights[0]: 5.000000e-01 [1.000000e-03] [2.000000e-03]\n"
        "Layer 'fc10' weights[1]: 2.500000e-01 [0.000000e+00] [0.000000e+00]\n"
        "Layer 'fc10' weights[2]: 0.000000e+00 [0.000000e+00] [0.000000e+00] \n"
        "Layer 'fc10' biases: 1.000000e+00 [5.000000e-01] \n")


def test_weight_block_without_weight_layers_is_the_rule():
    assert report.weight_block([]) == "------------------------------------------------------- \n"


def test_test_only_output():
    batch = report.test_only_batch_line(
        1000, {LOGPROB: [5725.6, 1307.0, 608.0]}, 3072, 5.1)
    assert batch == "batch 1000: ({'logprob': [5725.6, 1307.0, 608.0]}, 3072) (5.100 sec)"
    block = report.test_only_block([(LOGPROB, [1.863741, 0.425480, 0.198100])],
                                   PAGE_WEIGHT_STATS[:2])
    assert block == (
        "\n======================Test output======================\n"
        "logprob:  1.863741, 0.425480, 0.198100 \n"   # the page's line, trailing space included
        "------------------------------------------------------- \n"
        "Layer 'conv1' weights[0]: 7.898808e-03 [2.681663e-05] [3.395022e-03] \n"
        "Layer 'conv1' biases: 2.679429e-04 [8.097122e-07] \n")


def test_test_only_line_prints_plain_python_numbers():
    class FakeScalar(float):
        def __repr__(self):
            return "tensor(2.5)"
    line = report.test_only_batch_line(6, {"logprob": [FakeScalar(2.5)], "err": [1]}, 7, 0.25)
    assert line == "batch 6: ({'logprob': [2.5], 'err': [1.0]}, 7) (0.250 sec)"


def test_startup_banner():
    options = ["Minibatch size: 128 [DEFAULT]", "Testing frequency: 201 "]
    text = report.import_banner("2.13.0") + report.training_banner(
        options, [0, 1], "/tmp/ConvNet__2014-07-16_14.25.04", "Wed Jul 16 14:25:04 2014")
    assert text == (
        "=========================\n"
        "Using PyTorch 2.13.0\n"
        "=========================\n"
        "Training ConvNet\n"
        "Minibatch size: 128 [DEFAULT]\n"
        "Testing frequency: 201 \n"
        "=========================\n"
        "Running on CUDA device(s) 0, 1\n"
        "Current time: Wed Jul 16 14:25:04 2014\n"
        "Saving checkpoints to /tmp/ConvNet__2014-07-16_14.25.04\n"
        "=========================\n")
    on_cpu = report.training_banner([], [], "/tmp/x", "now")
    assert "\nRunning on the CPU\n" in on_cpu


def test_other_messages():
    path = "/f/data_batch_1000"
    assert report.wrote_feature_line(path) == "Wrote feature file " + path


def test_console_prints_only_on_the_master():
    master, worker = io.StringIO(), io.StringIO()
    report.Console(True, master).line("1.0 (0.00%)...")
    report.Console(False, worker).line("1.0 (0.00%)...")
    assert master.getvalue() == "1.0 (0.00%)...\n"
    assert worker.getvalue() == ""


def test_warnings_come_from_every_rank_and_name_it():
    out, err = io.StringIO(), io.StringIO()
    report.Console(False, out, world_size=4, warn_stream=err).warn(3, "skipped a bad JPEG")
    report.Console(True, out, world_size=1, warn_stream=err).warn(0, "alone")
    assert err.getvalue() == "rank 3: skipped a bad JPEG\nalone\n"
    assert out.getvalue() == ""


def test_console_defaults_to_the_current_stdout(capsys):
    report.Console().write("x")
    report.Console().warn(0, "w")
    captured = capsys.readouterr()
    assert (captured.out, captured.err) == ("x", "w\n")
