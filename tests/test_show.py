"""shownet: each plot rendered from a real short run of the tiny net, and its PNG checked."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from distconvnet import checkpoint, cli, show, show_preds
from distconvnet.errors import CheckpointError, OptionError
from distconvnet.options import Options
from distconvnet.providers import ProviderOptions, make_provider
from trainer_fixtures import REPO, TinyRun, write_digit_cifar

TRUE_BAR, OTHER_BAR = (0xff, 0xaa, 0xaa), (0xaa, 0xaa, 0xff)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("show")
    data = write_digit_cifar(root / "data")
    return TinyRun.train(data, root / "save")


def render(run, tmp_path, *argv):
    args = show.parse_args(["--load-file", run.run_dir, "--save-dir", str(tmp_path), *argv])
    return show.render(args)


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


def count_color(image, rgb, tolerance=2):
    return int((np.abs(image - np.array(rgb)).max(axis=2) <= tolerance).sum())


def assert_not_blank(image):
    assert image.std() > 20, "the picture is (almost) one colour"


# -- cost curves ------------------------------------------------------------------------------

def test_default_plots_every_value_of_every_cost(run, tmp_path):
    [path] = render(run, tmp_path)
    assert path == str(tmp_path / "cost-logprob.png")
    image = pixels(path)
    assert image.shape == (60 + 260 * 3, 800, 3)           # one panel per logprob value
    assert_not_blank(image)
    assert count_color(image, (0, 0, 0)) > 500              # the black training curve
    assert count_color(image, (255, 0, 0), tolerance=40) > 300   # the red test curve


def test_one_value_of_a_cost(run, tmp_path):
    [path] = render(run, tmp_path, "--show-cost", "logprob", "--cost-idx", "1")
    assert path.endswith("cost-logprob-1.png")
    image = pixels(path)
    assert image.shape == (320, 800, 3)
    assert count_color(image, (255, 0, 0), tolerance=40) > 100


def test_a_logreg_costs_panels_are_named_by_what_they_show(run, tmp_path):
    ckpt = checkpoint.load(run.run_dir)
    assert show.value_names(ckpt, "logprob", 3) == ["logprob", "top-1 error", "top-1 error"]
    ckpt["layer_params"] = ckpt["layer_params"].replace("topk=1", "topk=5")
    assert show.value_names(ckpt, "logprob", 3) == ["logprob", "top-1 error", "top-5 error"]


def test_test_values_are_held_over_the_batches_they_follow():
    values = np.array([1.0, 2.0, 3.0])
    # events after batches 2 and 4, and the final test after batch 5
    assert show.per_batch_test_values(values, 5, 2).tolist() == [1, 1, 2, 2, 3]


def test_smoothing_is_case_weighted_over_the_window():
    history = [({"c": [10.0]}, 10), ({"c": [30.0]}, 30), ({"c": [0.0]}, 10)]
    assert show.smoothed_test_values(history, "c", 0, 1).tolist() == [1.0, 1.0, 0.0]
    assert show.smoothed_test_values(history, "c", 0, 2).tolist() == [1.0, 1.0, 0.75]


def test_bad_cost_options_name_what_exists(run, tmp_path):
    with pytest.raises(OptionError, match=r"no cost 'nope'.*\(costs: logprob\)"):
        render(run, tmp_path, "--show-cost", "nope")
    with pytest.raises(OptionError, match=r"--cost-idx 3: cost 'logprob' has 3 values \(0-2\)"):
        render(run, tmp_path, "--show-cost", "logprob", "--cost-idx", "3")


# -- filters ----------------------------------------------------------------------------------

def test_conv_filters_as_an_rgb_grid(run, tmp_path):
    [path] = render(run, tmp_path, "--show-filters", "conv1")
    assert path.endswith("filters-conv1.png")
    # 16 filters of 3x3: one row of 16 cells of 3 pixels plus 1-pixel separators: 5 x 65,
    # drawn at 12 screen pixels per filter pixel under a 30-pixel title band.
    image = pixels(path)
    assert image.shape == (30 + 5 * 12, 65 * 12, 3)
    grid = image[30:]
    for k in range(17):                                     # every separator column is black
        assert grid[:, k * 4 * 12 + 6].max() == 0
    for k in range(16):                                     # every filter has some contrast
        cell = grid[12:48, k * 48 + 12:k * 48 + 48]
        assert cell.std() > 0
    assert grid[:, :, 0].astype(float).std() != grid[:, :, 2].astype(float).std()   # colour


def test_filter_grid_shapes():
    filters = np.random.default_rng(0).random((3, 25, 400))
    picture, shown = show.filter_grid(filters, 16, combine_channels=True)
    assert shown == 16 * 24 and picture.shape == (24 * 6 + 1, 16 * 6 + 1, 3)
    picture, shown = show.filter_grid(filters[:, :, :16], 16, combine_channels=False)
    # gray: 3 tiles side by side per filter, ceil(16 / 3) = 6 filters per row, 3 rows
    assert shown == 16 and picture.shape == (3 * 6 + 1, 6 * 16 + 1, 3)
    assert (picture[:, :, 0] == picture[:, :, 2]).all()


def test_no_rgb_draws_channels_side_by_side(run, tmp_path):
    [path] = render(run, tmp_path, "--show-filters", "conv1", "--no-rgb", "1",
                    "--norm-filters", "1")
    image = pixels(path)
    assert image.shape == (30 + 13 * 13, 61 * 13, 3)       # 3 rows of 6 filters, 13x zoom
    assert (image[30:, :, 0] == image[30:, :, 1]).all()     # gray
    assert_not_blank(image[30:])


def test_local_plane_and_fc_filters(run):
    ckpt = checkpoint.load(run.run_dir)
    args = show.parse_args(["--load-file", run.run_dir, "--show-filters", "local2",
                            "--local-plane", "3"])
    filters, per_row = show.filter_matrix(ckpt, args)
    assert filters.shape == (16, 9, 16) and per_row == 4     # 16 channels, 3x3, 4x4 positions
    local = ckpt["weights"]["local2"]["weights"][0]          # (modules, groups, c*k*k, filters)
    assert np.allclose(filters[:, :, 5].reshape(-1), local[5, 0, :, 3])
    args = show.parse_args(["--load-file", run.run_dir, "--show-filters", "fc10",
                            "--channels", "16"])
    filters, per_row = show.filter_matrix(ckpt, args)
    assert filters.shape == (16, 16, 10) and per_row == 16   # 10 outputs of 16 x 4x4
    with pytest.raises(OptionError, match=r"fc layer 'fc10' reads 256 values"):
        show.filter_matrix(ckpt, show.parse_args(["--load-file", run.run_dir,
                                                  "--show-filters", "fc10", "--channels", "5"]))


def test_bad_filter_layers(run, tmp_path):
    with pytest.raises(OptionError, match=r"no layer 'conv9'.*conv1, local2, fc10"):
        render(run, tmp_path, "--show-filters", "conv9")
    with pytest.raises(OptionError, match=r"layer 'pool1' \(pool\) has no filters"):
        render(run, tmp_path, "--show-filters", "pool1")
    with pytest.raises(OptionError, match=r"--local-plane 16: layer 'local2' has 16 filters"):
        render(run, tmp_path, "--show-filters", "local2", "--local-plane", "16")


# -- predictions ------------------------------------------------------------------------------

def test_random_predictions(run, tmp_path):
    [path] = render(run, tmp_path, "--show-preds", "probs")
    assert path.endswith("preds-probs.png")
    image = pixels(path)
    assert image.shape == (820, 1000, 3)
    assert_not_blank(image)
    assert count_color(image, TRUE_BAR) > 0 and count_color(image, OTHER_BAR) > 0


def test_only_errors_shows_misclassified_images(run, tmp_path):
    [path] = render(run, tmp_path, "--show-preds", "probs", "--only-errors", "1")
    assert path.endswith("errors-probs.png")
    assert_not_blank(pixels(path))
    ckpt = checkpoint.load(run.run_dir)
    opts = Options.from_dict(ckpt["options"])
    provider = make_provider("cifar", opts.data_path, [6], test=True,
                             options=ProviderOptions(inner_size=8))
    net = show_preds.build_net(ckpt, provider, torch.device("cpu"))
    batch = provider.get_next_batch()
    labels = batch.mats[1].long().numpy()
    rows, probs = show_preds.pick_cases(net, batch.mats, "probs", labels, True, 6)
    assert 0 < len(rows) <= 8
    assert (probs.argmax(axis=1) != labels[rows]).all()


def test_mean_is_added_back(run):
    data_path = Options.from_dict(checkpoint.load(run.run_dir)["options"]).data_path
    provider = make_provider("cifar", data_path, [6], test=True,
                             options=ProviderOptions(inner_size=8))
    restored = show_preds.restore_pixels(provider, provider.get_next_batch().mats[0])
    images, _ = provider._load(6)                           # the raw uint8 10x10 images
    raw = images[:, :, 1:9, 1:9].permute(0, 2, 3, 1).numpy() / 255
    assert np.abs(restored - raw).max() < 1e-5


def test_show_preds_needs_a_softmax_layer(run, tmp_path):
    with pytest.raises(OptionError, match=r"'fc10' is not a softmax layer.*\(softmax layers: "
                                          r"probs\)"):
        render(run, tmp_path, "--show-preds", "fc10")


# -- the command ------------------------------------------------------------------------------

def test_command_errors_are_one_line_and_exit_1(run, tmp_path, capsys):
    assert cli.main(["show", "--load-file", str(tmp_path / "none")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err
    assert cli.main(["show", "--load-file", run.run_dir, "--show-filters", "pool1"]) == 1
    assert capsys.readouterr().err.startswith("error: --show-filters: layer 'pool1'")
    assert cli.main(["show"]) == 1
    assert "--load-file is required" in capsys.readouterr().err
    with pytest.raises(CheckpointError):
        show.render(show.parse_args(["--load-file", str(tmp_path)]))


def test_show_without_a_display_only_writes_files(run, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    assert cli.main(["show", "--load-file", run.run_dir, "--save-dir", str(tmp_path),
                     "--show-cost", "logprob", "--cost-idx", "0", "--show", "1"]) == 0
    out = capsys.readouterr().out
    assert f"Wrote {tmp_path / 'cost-logprob-0.png'}" in out and "No display" in out


def test_shownet_shim_writes_into_the_checkpoint_directory(run):
    done = subprocess.run([sys.executable, str(REPO / "shownet.py"), "--load-file", run.run_dir,
                           "--show-filters", "conv1"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout == f"Wrote {run.run_dir}/filters-conv1.png\n"
