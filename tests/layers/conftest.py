"""Helpers to build one layer from a cfg snippet, as the parser would, without a whole net."""

import textwrap

import pytest

from distconvnet.cfg import read_cfg
from distconvnet.layers import REGISTRY, BuildContext


@pytest.fixture
def make_layer(tmp_path):
    """make_layer(def_text, inputs, params_text=None, ctx=None) -> built layer.

    `def_text` and `params_text` are cfg sections (dedented); the first section of each is used.
    Returns the layer with set_params already applied when params_text is given.
    """
    counter = iter(range(10**6))

    def build(def_text, inputs=(), params_text=None, ctx=None):
        k = next(counter)
        def_path = tmp_path / f"def{k}.cfg"
        def_path.write_text(textwrap.dedent(def_text))
        sec = read_cfg(str(def_path)).sections[0]
        ctx = ctx or BuildContext(lambda idx: {0: 3 * 8 * 8, 1: 1, 2: 10}[idx], num_classes=10)
        layer = REGISTRY[sec.str("type")](sec, list(inputs), ctx)
        if params_text is not None:
            params_path = tmp_path / f"params{k}.cfg"
            params_path.write_text(textwrap.dedent(params_text))
            layer.set_params(read_cfg(str(params_path)).sections[0])
        return layer

    return build
