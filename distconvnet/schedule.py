"""Learning-rate schedules of the layer-params file (spec §5.1), evaluated from training progress.

Deliberate differences from cuda-convnet2: parameters may come in any order, and numbers may be
written in any float syntax (`1e-3`). Everything the original accepted still parses the same.
"""

import math
import re

_SPEC_RE = re.compile(r"^\s*(?P<type>[A-Za-z]\w*)\s*\[(?P<params>[^]]*)\]\s*$")


class Schedule:
    """A learning rate as a function of progress p in [0, 1]."""

    type_name = ""
    param_names = ()

    def __init__(self, **params):
        self.params = params

    def __call__(self, progress):
        raise NotImplementedError

    def to_dict(self):
        return {"type": self.type_name, "params": dict(self.params)}

    def __eq__(self, other):
        return isinstance(other, Schedule) and self.to_dict() == other.to_dict()

    def __repr__(self):
        inner = ";".join(f"{k}={v:g}" for k, v in self.params.items())
        return f"{self.type_name}[{inner}]"


class Const(Schedule):
    type_name, param_names = "const", ("base",)

    def __call__(self, progress):
        return self.params["base"]


class Linear(Schedule):
    type_name, param_names = "linear", ("base", "tgtFactor")

    def __call__(self, progress):
        base, tgt = self.params["base"], self.params["tgtFactor"]
        return base * (1 - progress) + (base / tgt) * progress


class Exp(Schedule):
    type_name, param_names = "exp", ("base", "tgtFactor")

    def __call__(self, progress):
        return self.params["base"] * (1.0 / self.params["tgtFactor"]) ** progress


class DiscreteExp(Schedule):
    type_name, param_names = "dexp", ("base", "tgtFactor", "numSteps")

    def __call__(self, progress):
        base, tgt, steps = self.params["base"], self.params["tgtFactor"], self.params["numSteps"]
        for level in range(steps - 1):
            if progress <= (level + 1) / steps:
                return base * (1.0 / tgt) ** (level / (steps - 1))
        return base / tgt


SCHEDULES = {cls.type_name: cls for cls in (Const, Linear, Exp, DiscreteExp)}


def parse_schedule(text):
    """`dexp[base=0.01;tgtFactor=250;numSteps=4]` or a bare number -> Schedule.

    Raises ValueError with a message that says what was expected.
    """
    text = text.strip()
    try:
        base = float(text)
    except ValueError:
        base = None
    if base is not None:
        if not math.isfinite(base):
            raise ValueError(f"learning rate {text!r} is not a finite number")
        return Const(base=base)
    m = _SPEC_RE.match(text)
    expected = ", ".join(f"{c.type_name}[{';'.join(p + '=…' for p in c.param_names)}]"
                         for c in SCHEDULES.values())
    if not m:
        raise ValueError(f"cannot parse schedule {text!r}; expected a number or one of {expected}")
    cls = SCHEDULES.get(m.group("type").lower())
    if cls is None:
        raise ValueError(f"unknown schedule type {m.group('type')!r}; expected one of {expected}")
    by_lower = {p.lower(): p for p in cls.param_names}
    params = {}
    for item in filter(None, (s.strip() for s in m.group("params").split(";"))):
        name, sep, value = item.partition("=")
        canonical = by_lower.get(name.strip().lower())
        if not sep or canonical is None:
            raise ValueError(f"schedule {text!r}: unknown parameter {item!r}; "
                             f"{cls.type_name} takes {', '.join(cls.param_names)}")
        if canonical in params:
            raise ValueError(f"schedule {text!r}: parameter {canonical} given twice")
        try:
            params[canonical] = int(value) if canonical == "numSteps" else float(value)
        except ValueError:
            kind = "an integer" if canonical == "numSteps" else "a number"
            raise ValueError(f"schedule {text!r}: {canonical}={value.strip()!r} is not {kind}") \
                from None
    infinite = [p for p, v in params.items() if not math.isfinite(v)]
    if infinite:
        raise ValueError(f"schedule {text!r}: {infinite[0]} is not a finite number")
    missing = [p for p in cls.param_names if p not in params]
    if missing:
        raise ValueError(f"schedule {text!r}: missing {', '.join(missing)}")
    if "tgtFactor" in params and params["tgtFactor"] == 0:
        raise ValueError(f"schedule {text!r}: tgtFactor must not be 0")
    if "numSteps" in params and params["numSteps"] < 2:
        raise ValueError(f"schedule {text!r}: numSteps must be at least 2")
    return cls(**params)
