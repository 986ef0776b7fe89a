"""Learning-rate schedules against hand-computed values (spec §5.1)."""

import pytest

from distconvnet.schedule import parse_schedule


def test_dexp_imagenet_levels_and_switch_points():
    s = parse_schedule("dexp[base=0.01;tgtFactor=250;numSteps=4]")
    # levels 0.01 · 250^(−i/3): 0.01, 0.0015874, 0.00025198, then base/tgtFactor = 4e-5
    assert s(0.0) == pytest.approx(0.01)
    assert s(0.25) == pytest.approx(0.01)              # level i applies while p <= (i+1)/4
    assert s(0.2501) == pytest.approx(0.0015874011, rel=1e-7)
    assert s(0.5) == pytest.approx(0.0015874011, rel=1e-7)
    assert s(0.6) == pytest.approx(0.00025198421, rel=1e-7)
    assert s(0.76) == pytest.approx(4e-5)
    assert s(1.0) == pytest.approx(4e-5)


def test_dexp_two_steps():
    s = parse_schedule("dexp[base=0.02;tgtFactor=10;numSteps=2]")
    assert [s(0.5), s(0.51)] == pytest.approx([0.02, 0.002])


def test_linear_exp_const():
    assert parse_schedule("linear[base=0.1;tgtFactor=10]")(0.5) == pytest.approx(0.055)
    assert parse_schedule("exp[base=0.1;tgtFactor=100]")(0.5) == pytest.approx(0.01)
    assert parse_schedule("const[base=0.3]")(0.9) == 0.3
    assert parse_schedule("0.001")(0.7) == 0.001


def test_any_order_scientific_and_case():
    a = parse_schedule("dexp[base=0.01;numSteps=4;tgtFactor=1000]")   # the wiki's order
    b = parse_schedule("DEXP[TGTFACTOR=1e3;base=1e-2;numsteps=4]")
    assert a == b and a(0.9) == pytest.approx(1e-5)
    assert parse_schedule("1e-3")(0) == 0.001


@pytest.mark.parametrize("text, words", [
    ("dexp[base=0.01;tgtFactor=;numSteps=4]", "tgtFactor='' is not a number"),
    ("dexp[base=0.01;tgtFactor=10]", "missing numSteps"),
    ("dexp[base=0.01;tgtFactor=10;numSteps=2.5]", "numSteps='2.5' is not an integer"),
    ("linear[base=0.01;speed=3]", "unknown parameter 'speed=3'"),
    ("step[base=0.01]", "unknown schedule type 'step'"),
    ("fast", "cannot parse schedule 'fast'"),
    ("exp[base=1;tgtFactor=0]", "tgtFactor must not be 0"),
    ("const[base=1;base=2]", "base given twice"),
])
def test_bad_schedules(text, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[")):
        parse_schedule(text)
