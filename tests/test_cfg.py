"""The INI reader: original-style files, line numbers in errors, typed getters."""

import pytest

from distconvnet.cfg import read_cfg
from distconvnet.errors import ConfigError
from test_train_errors import assert_one_error_line
from trainer_fixtures import TINY_DEF, run_in_process, tiny_args

ORIGINAL_STYLE = """\
# a comment in the original's style
[data]
type=data
dataIdx=0

[conv1]
type=conv
inputs=data
Channels=3
filters=64
initW=0.01,0.02
randSparse=0
; another comment
sharedBiases=true
padding=two
"""


def write(tmp_path, text, name="net.cfg"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_sections_in_file_order_with_lines(tmp_path):
    cfg = read_cfg(write(tmp_path, ORIGINAL_STYLE))
    assert [s.name for s in cfg.sections] == ["data", "conv1"]
    conv = cfg.get("conv1")
    assert conv.line == 6
    assert conv.int("channels") == 3           # keys are case-insensitive, as in ConfigParser
    assert conv.bool("sharedBiases") is True
    assert conv.list("initW", 2, float) == [0.01, 0.02]
    assert conv.list("filters", 3, int) == [64, 64, 64]    # one value broadcasts
    assert set(conv.unused_keys()) == {"type", "inputs", "randsparse", "padding"}


def test_errors_name_file_line_and_layer(tmp_path):
    path = write(tmp_path, ORIGINAL_STYLE)
    conv = read_cfg(path).get("conv1")
    with pytest.raises(ConfigError, match=rf"^{path}:11: layer 'conv1': initW='0.01,0.02': "
                                          r"expected 1 or 3"):
        conv.list("initW", 3, float)
    with pytest.raises(ConfigError, match=rf"^{path}:6: layer 'conv1': missing required key "
                                          r"'stride'"):
        conv.int("stride")
    with pytest.raises(ConfigError, match=rf"^{path}:15: layer 'conv1': padding='two': "
                                          r"expected an integer"):
        conv.int("padding")
    with pytest.raises(ConfigError, match=rf"^{path}:10: .*filters='64': expected a boolean"):
        conv.bool("filters")


@pytest.mark.parametrize("text, line, words", [
    ("type=data\n", 1, "expected a section header"),
    ("[a]\ntype=data\n[a]\ntype=data\n", 3, "defined twice"),
    ("[a]\ntype=data\ntype=conv\n", 3, "'type' is given twice"),
    ("[a]\ntype=data\nthis line has no equals sign\n", 3, "cannot parse"),
    ("  [a]\n  type=data\n", 1, "indented line '\\[a\\]' continues no value"),
    ("# net\n\n   [a]\n   type=data\n", 3, "indented line '\\[a\\]' continues no value"),
    ("[a]\n  type=data\n", 2, "indented line 'type=data' continues no value"),
    ("[a]\ntype=data\n\n  [b]\n  type=data\n", 4, "indented line '\\[b\\]'"),
    ("[a]\ntype=data\n# comment\n  dataIdx=0\n", 4, "indented line 'dataIdx=0'"),
])
def test_syntax_errors(tmp_path, text, line, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError, match=rf"^{path}:{line}: .*{words}"):
        read_cfg(path)


def test_indented_lines_continue_a_value(tmp_path):
    cfg = read_cfg(write(tmp_path, "[a]\ntype=conv\ninputs=x,\n   y\n"))
    assert cfg.get("a").str("inputs") == "x,\ny"


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_cfg(str(tmp_path / "nope.cfg"))


def test_an_all_indented_layer_file_is_one_error_line(digit_cifar, tmp_path):
    text = TINY_DEF.read_text()
    layer_def = tmp_path / "indented.cfg"
    layer_def.write_text("".join(f"    {line}\n" for line in text.splitlines()))
    first = next(n for n, line in enumerate(text.splitlines(), start=1)
                 if line and not line.startswith("#"))
    result = run_in_process(tiny_args(digit_cifar, tmp_path / "save", layer_def=layer_def))
    assert_one_error_line(*result, f"{layer_def}:{first}:", "indented line '[data]'")


def test_a_missing_key_is_named_as_the_docs_spell_it(tmp_path):
    """Keys match in any case, but the error says 'momW', not 'momw'."""
    path = write(tmp_path, "[conv1]\nepsW=0.01\nMOMB=0.9\n")
    conv = read_cfg(path).get("conv1")
    assert conv.float("momB") == 0.9
    with pytest.raises(ConfigError, match=rf"^{path}:1: layer 'conv1': missing required key "
                                          r"'momW'$"):
        conv.float("momW")
