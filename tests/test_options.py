"""The command line: the option table, parsing, excuses/requires, resume merge, usage, listing."""

import json

import pytest

from distconvnet import options
from distconvnet.errors import OptionError
from distconvnet.options import (Options, check_mandatory, merge_for_resume, option_listing,
                                 parse_command_line, usage_text)

# spec §3.2, minus --max-test-err (ConvNet deletes it).
ORIGINAL_FLAGS = {
    "load-file", "save-path", "save-file", "train-range", "test-range", "data-provider",
    "data-path", "test-freq", "epochs", "test-only", "test-one", "force-save", "gpu", "mini",
    "layer-def", "layer-params", "layer-path", "check-grads", "multiview-test", "inner-size",
    "conv-to-local", "unshare-weights", "conserve-mem", "color-noise", "test-out", "logreg-name",
    "scalar-mean", "write-features", "feature-path",
}
OUR_FLAGS = {"seed", "precision", "device", "compile", "deterministic", "dist-backend",
             "skip-bad-images", "tensorboard", "overwrite-save-file", "debug"}

# The user's page, with only paths changed.
IMAGENET = ("--data-path /d/ilsvrc-2012-batches --train-range 0-417 --test-range 1000-1016 "
            "--save-path /d/tmp  --epochs 90 --layer-def layers/layers-imagenet-1gpu.cfg "
            "--layer-params layers/layer-params-imagenet-1gpu.cfg --data-provider image "
            "--inner-size 224 --gpu 0 --mini 128 --test-freq 201 --color-noise 0.1").split()
CIFAR = ("--data-provider cifar --test-range 6 --train-range 1-5 --data-path /d/cifar "
         "--inner-size 24 --save-path /d/ --gpu 0 --layer-def layers/layers-cifar10-11pct.cfg "
         "--layer-params layers/layer-params-cifar10-11pct.cfg").split()
FEATURES = ["--load-file", "/d/tmp/ConvNet__2014-07-16_14.25.04", "--write-features=fc1024",
            "--feature-path/d/fc1024-features"]


def parse(text):
    return parse_command_line(text.split())


def error_of(argv):
    with pytest.raises(OptionError) as caught:
        opts = parse_command_line(argv)
        check_mandatory(opts)
    return str(caught.value)


def test_the_flag_set_is_frozen():
    assert {row.flag for row in options.OPTIONS} == ORIGINAL_FLAGS | OUR_FLAGS
    assert len(options.BY_DEST) == len(options.OPTIONS)


def test_original_rows_keep_the_originals_defaults_and_words():
    row = options.BY_FLAG
    assert (row["test-freq"].default, row["epochs"].default) == (57, 50000)
    assert row["mini"].default == 128
    assert row["inner-size"].description == "Cropped DP: crop size (0 = don't crop)"
    assert row["feature-path"].description == \
        "Write test data features to this path (to be used with --write-features)"
    assert [r.flag for r in options.OPTIONS if r.set_once] == ["inner-size"]
    assert {r.flag for r in options.OPTIONS if r.is_mandatory} == {
        "save-path", "save-file", "train-range", "test-range", "data-provider", "data-path",
        "gpu", "layer-def", "layer-params"}


def test_no_description_widens_the_originals_listing():
    longest = len(options.BY_FLAG["feature-path"].description)
    assert max(len(r.description) for r in options.OPTIONS) == longest


def test_the_pages_imagenet_command():
    opts = parse_command_line(IMAGENET)
    check_mandatory(opts)
    assert opts.train_batch_range == list(range(418))
    assert opts.test_batch_range == list(range(1000, 1017))
    assert (opts.num_epochs, opts.minibatch_size, opts.testing_freq) == (90, 128, 201)
    assert (opts.inner_size, opts.color_noise, opts.gpu, opts.dp_type) == (224, 0.1, [0], "image")
    assert opts.is_given("color_noise") and not opts.is_given("test_one")
    assert opts.test_one == 1 and opts.seed is None and opts.precision == "auto"


def test_the_pages_cifar_command():
    opts = parse_command_line(CIFAR)
    check_mandatory(opts)
    assert (opts.test_batch_range, opts.train_batch_range) == ([6], [1, 2, 3, 4, 5])


def test_the_pages_feature_command_glues_the_path_to_the_flag():
    opts = parse_command_line(FEATURES)
    check_mandatory(opts)
    assert opts.feature_path == "/d/fc1024-features"
    assert opts.write_features == "fc1024"
    assert parse("--save-path/abs/dir").save_path == "/abs/dir"


def test_equals_and_space_forms_and_last_one_wins():
    opts = parse("--mini=64 --epochs 3 --mini 32 --layer-path=")
    assert (opts.minibatch_size, opts.num_epochs, opts.layer_path) == (32, 3, "")
    assert parse("--scalar-mean -1.5").scalar_mean == -1.5     # a value may start with '-'


def test_unique_prefixes_are_accepted_as_getopt_does():
    assert parse("--epo 7").num_epochs == 7
    assert "ambiguous" in error_of(["--test", "1"]) and "--test-range" in error_of(["--test", "1"])


@pytest.mark.parametrize("argv, message", [
    (["--mini", "x"], "--mini: expected an integer, got 'x'"),
    (["--mini", "1.5"], "--mini: expected an integer, got '1.5'"),
    (["--color-noise", "lots"], "--color-noise: expected a number, got 'lots'"),
    (["--test-only", "2"], "--test-only: expected 0 or 1, got '2'"),
    (["--test-only", "yes"], "--test-only: expected 0 or 1, got 'yes'"),
    (["--train-range", "a-b"], "--train-range: expected N, N-M or a comma list such as 0-3,7, "
                               "got 'a-b'"),
    (["--train-range", "5-3"], "--train-range: 5-3 is an empty range"),
    (["--train-range", "0-3,2"], "--train-range: batch 2 is listed twice in '0-3,2'"),
    (["--gpu", "0,x"], "--gpu: expected a comma-separated list of ints, got '0,x'"),
    (["--gpu", ""], "--gpu: expected a comma-separated list of ints, got ''"),
    (["--precision", "fp16"], "--precision: expected one of auto, fp32, bf16, got 'fp16'"),
    (["--frobnicate", "1"], "unknown option --frobnicate"),
    (["--color-nosie", "0.1"], "unknown option --color-nosie (did you mean --color-noise?)"),
    (["--mini"], "option --mini requires a value"),
    (["data.cfg"], "unexpected argument 'data.cfg': options are written --name value"),
    (["-f", "x"], "unexpected argument '-f': options are written --name value"),
])
def test_bad_command_lines(argv, message):
    assert error_of(argv) == message


def test_value_types():
    opts = parse("--train-range 0-3,7,9-10 --test-range 6 --gpu 0,1,2,3 --conv-to-local "
                 "conv1,conv2 --unshare-weights= --force-save 1 --color-noise 1e-1 "
                 "--compile 0 --seed 42 --tensorboard runs/a")
    assert opts.train_batch_range == [0, 1, 2, 3, 7, 9, 10]
    assert opts.test_batch_range == [6]
    assert opts.gpu == [0, 1, 2, 3]
    assert (opts.conv_to_local, opts.unshare_weights) == (["conv1", "conv2"], [])
    assert (opts.force_save, opts.color_noise, opts.compile, opts.seed) == (1, 0.1, "0", 42)
    assert opts.tensorboard == "runs/a"


def test_debug_may_be_bare():
    assert parse("--debug").debug == 1
    assert parse("--debug --mini 5").debug == 1 and parse("--debug --mini 5").minibatch_size == 5
    assert parse("--debug 0").debug == 0 and parse("--debug=1").debug == 1


def test_mandatory_options_and_excuses():
    without_train = [a for a in IMAGENET if a not in ("--train-range", "0-417")]
    assert error_of(without_train) == \
        "Option --train-range (Data batch range: training) not supplied"
    without_save = [a for a in IMAGENET if a not in ("--save-path", "/d/tmp")]
    assert error_of(without_save) == "Option --save-path (Save path) not supplied"
    check_mandatory(parse_command_line(without_save + ["--save-file", "/d/run"]))
    check_mandatory(parse("--load-file /d/ckpt"))
    check_mandatory(parse("--layer-def a --layer-params b --data-provider dummy-lr-16 "
                          "--check-grads 1 --gpu 0"))
    assert error_of(["--check-grads", "1", "--gpu", "0"]) == \
        "Option --data-provider (Data provider) not supplied"


def test_the_cpu_needs_no_gpu():
    no_gpu = [a for a in IMAGENET if a not in ("--gpu", "0")]
    assert error_of(no_gpu) == "Option --gpu (GPU override) not supplied"
    opts = parse_command_line(no_gpu + ["--device", "cpu"])
    check_mandatory(opts)
    assert opts.gpu == [0] and not opts.is_given("gpu")


def test_requires_is_matched_by_dest():
    assert error_of(["--load-file", "x", "--write-features", "fc"]) == (
        "Option --write-features (Write test data features from given layer) requires option "
        "--feature-path (Write test data features to this path (to be used with "
        "--write-features))")
    assert "requires option --logreg-name" in error_of(["--load-file", "x", "--test-out", "o"])
    parse("--load-file x --test-out o --logreg-name logprob --multiview-test 1")


def test_round_trip_through_json():
    opts = parse_command_line(IMAGENET)
    again = Options.from_dict(json.loads(json.dumps(opts.to_dict())))
    assert again.values == opts.values and again.given == opts.given


def test_from_dict_drops_unknown_and_fills_new_options():
    saved = parse_command_line(IMAGENET).to_dict()
    del saved["values"]["precision"]
    saved["values"]["max_test_err"] = 0.5
    saved["given"].append("max_test_err")
    opts = Options.from_dict(saved)
    assert opts.precision == "auto" and "max_test_err" not in opts.values
    assert "max_test_err" not in opts.given
    with pytest.raises(AttributeError):
        opts.max_test_err


def test_resume_keeps_stored_values_and_takes_changed_ones():
    saved = Options.from_dict(parse_command_line(IMAGENET).to_dict())
    typed = parse("--load-file /d/tmp/ConvNet__x --epochs 140 --train-range 0-418 --mini 128")
    merged = merge_for_resume(saved, typed)
    assert merged.num_epochs == 140 and merged.train_batch_range == list(range(419))
    assert merged.load_file == "/d/tmp/ConvNet__x"
    assert merged.gpu == [0] and merged.data_path == "/d/ilsvrc-2012-batches"
    assert merged.color_noise == 0.1 and merged.inner_size == 224
    assert merged.test_one == 1 and not merged.is_given("test_one")
    assert saved.num_epochs == 90     # the stored object is not touched


def test_resume_may_not_change_a_set_once_option():
    saved = parse_command_line(IMAGENET)
    merge_for_resume(saved, parse("--load-file x --inner-size 224"))   # same value: fine
    with pytest.raises(OptionError, match=r"^Option --inner-size \(Cropped DP: crop size "
                                          r"\(0 = don't crop\)\) cannot be changed$"):
        merge_for_resume(saved, parse("--load-file x --inner-size 227"))


def test_resume_gives_options_new_in_the_code_their_defaults():
    stored = parse_command_line(IMAGENET).to_dict()
    del stored["values"]["skip_bad_images"]
    merged = merge_for_resume(Options(stored["values"], stored["given"]), parse("--load-file x"))
    assert merged.skip_bad_images == 0


def test_usage_text():
    lines = usage_text().split("\n")
    assert lines[0] == "convnet.py usage:"
    assert lines[1].startswith("    Option ") and lines[1].endswith("Default ")
    body = lines[2:]
    optional, mandatory = body[:-9], body[-9:]
    assert all(line.startswith("    [--") for line in optional)
    assert all(line.startswith("     --") for line in mandatory)
    names = [line.split()[0].strip("[") for line in body]
    assert names[:len(optional)] == sorted(names[:len(optional)])
    assert names[len(optional):] == sorted(names[len(optional):])
    mini = next(line for line in optional if "--mini " in line)
    assert mini.split(" - ")[1].split() == ["Minibatch", "size", "[128]"]
    assert mini.endswith(" ") and "\033" not in usage_text()
    width = len(lines[2])
    assert all(len(line) == width for line in body)
    assert "\033[1m--mini\033[0m <int>" in usage_text(bold=True)


def test_option_listing_matches_the_originals_print_values():
    lines = option_listing(parse_command_line(IMAGENET))
    assert len(lines) == len(options.OPTIONS)
    width = len(options.BY_FLAG["feature-path"].description)
    descriptions = [line[:width].rstrip() for line in lines]
    assert descriptions == sorted(descriptions)
    by_desc = dict(zip(descriptions, lines))
    pad = " " * (width - len("Minibatch size"))
    # Values pad to the longest *defaulted* value, here "auto".
    assert by_desc["Minibatch size"] == "Minibatch size" + pad + ": 128  "
    assert by_desc["Data batch range: testing"].endswith(": 1000-1016 ")
    assert by_desc["Test on one batch at a time?"].endswith(": 1    [DEFAULT]")
    assert by_desc["Subtract this scalar from image (-1 = don't)"].endswith(": -1   [DEFAULT]")
    assert by_desc["Add PCA noise to color channels with given scale"].endswith(": 0.1  ")
    assert by_desc["Save file override"].endswith(":      ")     # excused: no value, no tag


def test_listing_prints_a_single_batch_as_a_range():
    lines = option_listing(parse_command_line(CIFAR))
    testing = [line for line in lines if line.startswith("Data batch range: testing ")]
    assert testing[0].endswith(": 6-6   ")   # padded to the default epochs, 50000; then a space
    opts = parse("--train-range 0-3,7")
    assert options.BY_DEST["train_batch_range"].value_text(opts.train_batch_range) == "0-3,7"


def test_a_drawn_seed_is_listed_without_tag_and_does_not_widen_the_values():
    opts = parse_command_line(CIFAR)
    opts.values["seed"] = 428059697          # what the trainer records when --seed is not given
    lines = {line.split(" ")[0] + line.split(" ")[1]: line for line in option_listing(opts)}
    assert lines["Randomseed"].endswith(": 428059697 ")
    assert lines["Minibatchsize"].endswith(": 128   [DEFAULT]")
