"""The shipped nets of layers/ for the plan and program tests."""

import os

from distconvnet.layers import BuildContext
from distconvnet.model import ConvNet

LAYERS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__)))), "layers")
IMAGENET = BuildContext({0: 224 * 224 * 3, 1: 1}.__getitem__, 1000)
TINY = BuildContext({0: 3 * 8 * 8, 1: 1}.__getitem__, 10)


def shipped(name, ctx=IMAGENET):
    return ConvNet(os.path.join(LAYERS, f"layers-{name}.cfg"),
                   os.path.join(LAYERS, f"layer-params-{name}.cfg"), ctx)


def cfg_text(name, kind):
    prefix = "layers" if kind == "def" else "layer-params"
    with open(os.path.join(LAYERS, f"{prefix}-{name}.cfg")) as f:
        return f.read()


def with_update_period(text, period):
    """The params text with every `updatePeriod=1` replaced (None: removed, the default 0)."""
    return text.replace("updatePeriod=1\n", "" if period is None else f"updatePeriod={period}\n")


def no_dropout(text):
    """Dropout masks are drawn per process; with them off, SPMD and one process must agree."""
    return text.replace("enable=true", "enable=false")
