"""`python -m distconvnet summary`: the input size comes from --inner-size or the data's
batches.meta, is printed, and is never guessed."""

import contextlib
import io
import pickle
import subprocess
import sys

from distconvnet import cli
from trainer_fixtures import REPO, subprocess_env

CIFAR_NET = ["--layer-def", "layers/layers-cifar10-11pct.cfg",
             "--layer-params", "layers/layer-params-cifar10-11pct.cfg"]


def summary(argv, monkeypatch):
    monkeypatch.chdir(REPO)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main(["summary", *argv])
    return status, out.getvalue().splitlines(), err.getvalue()


def write_meta(folder, **meta):
    """batches.meta as the original's tools wrote it: a protocol-2 pickle of a plain dict."""
    folder.mkdir()
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)
    return folder


def test_without_an_input_size_it_refuses_to_guess():
    done = subprocess.run([sys.executable, "-m", "distconvnet", "summary", *CIFAR_NET],
                          cwd=REPO, capture_output=True, text=True, env=subprocess_env())
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == ("error: summary needs the input size: give --inner-size N (224 for "
                           "the ImageNet nets, 24 for CIFAR) or --data-path DIR (its "
                           "batches.meta)\n")


def test_the_input_size_of_inner_size_is_printed_and_used(monkeypatch):
    status, lines, _ = summary([*CIFAR_NET, "--inner-size", "24"], monkeypatch)
    assert status == 0
    assert lines[0] == "Input: 24x24 3-channel images (from --inner-size)"
    assert "Initialized data layer 'data', producing 1728 outputs" in lines
    assert "Initialized convolutional layer 'conv1' on GPUs 0, producing 24x24 64-channel " \
           "output" in lines


def test_the_input_size_comes_from_the_data_paths_meta(tmp_path, monkeypatch):
    """The original's CIFAR meta has num_vis but no img_size; 32x32 is what the trainer feeds
    with --inner-size 0."""
    data = write_meta(tmp_path / "cifar", num_vis=3072, label_names=[f"c{i}" for i in range(10)],
                      num_cases_per_batch=10000)
    status, lines, _ = summary([*CIFAR_NET, "--data-path", str(data)], monkeypatch)
    assert status == 0
    assert lines[0] == f"Input: 32x32 3-channel images (from {data}/batches.meta)"
    assert "Initialized data layer 'data', producing 3072 outputs" in lines
    assert "Initialized convolutional layer 'conv1' on GPUs 0, producing 32x32 64-channel " \
           "output" in lines


def test_the_metas_img_size_and_classes_are_used(tmp_path, monkeypatch):
    data = write_meta(tmp_path / "five", num_vis=3 * 28 * 28, img_size=28,
                      label_names=[f"c{i}" for i in range(5)])
    status, lines, err = summary([*CIFAR_NET, "--data-path", str(data)], monkeypatch)
    assert status == 1
    assert lines == [f"Input: 28x28 3-channel images (from {data}/batches.meta)"]
    # the meta's 5 classes are checked against the net's 10-way softmax
    assert err.startswith("error: ") and "produces 10 outputs but must produce 5" in err


HYBRID = ["--layer-def", "layers/layers-imagenet-2gpu-hybrid.cfg",
          "--layer-params", "layers/layer-params-imagenet-2gpu-hybrid.cfg"]


def test_each_ranks_program_prints_without_an_input_size(monkeypatch):
    """The issue's command: the programs do not depend on the input size, so none is needed;
    each rank's program is a few dozen lines, and each transfer shows at both of its ends."""
    status, lines, err = summary([*HYBRID, "--world-size", "2", "--program"], monkeypatch)
    assert (status, err) == (0, "")
    assert lines[0].startswith("Input: none given; the ranks' programs do not depend on it")
    assert not any(line.startswith("Initialized") for line in lines)    # no sizes are made up
    starts = [lines.index(f"Rank {rank}: GPU index(es) {rank} of model group 0 (ranks 0, 1)")
              for rank in (0, 1)]
    zero, one = lines[starts[0]:starts[1]], lines[starts[1]:]
    assert all(10 <= len(program) <= 60 for program in (zero, one))
    assert zero[1:4] == ["  each minibatch: fetch data[0], labvec[0, 1]", "  pass 0:",
                         "    forward conv1 … pool3_neuron (15 layers) on data[0]"]
    assert one[3] == "    forward conv1 … pool3_neuron (15 layers) on data[1]"
    assert "    send dropout1a[0] to rank 1" in zero
    assert "    receive dropout1a[0] from rank 0" in one
    assert "    send the gradient of dropout1a[0] to rank 0; backward from dropout1b" in one
    assert "    receive the gradient of dropout1a[0] from rank 1; backward from dropout1a" in zero
    assert sum(line == "    update: sum the due gradients of the layers ranks 0, 1 hold; step "
               "the optimizer" for line in zero) == 2


def test_a_program_needs_a_world_size(monkeypatch):
    status, lines, err = summary([*HYBRID, "--program"], monkeypatch)
    assert (status, lines) == (1, [])
    assert err == "error: --program shows the ranks' programs: give --world-size N\n"
