"""softmax and the cost layers against float64 references written from spec §4.3 and §6.3:
objectives, printed sums (with the top-1/top-k tie rules), the logits path, multiview values,
gradients, and every cfg / layer-params error."""

import math

import numpy as np
import pytest
import torch

from distconvnet.errors import ConfigError
from distconvnet.layers import BuildContext
from distconvnet.layers.neuron import NEURON_TYPES
from distconvnet.model import ConvNet
from layer_helpers import FakeInput, check_error

CLASSES = 10


def cost_cfg(type_name, inputs="labels,probs", **keys):
    lines = ["[logprob]", f"type={type_name}", f"inputs={inputs}"]
    return "\n".join(lines + [f"{k}={v}" for k, v in keys.items()]) + "\n"


def logreg_inputs(classes=CLASSES):
    return [FakeInput("labels", outputs=1), FakeInput("probs", outputs=classes,
                                                      type_name="softmax")]


def softmax64(x):
    e = np.exp(x - x.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def random_case(n=6, classes=CLASSES):
    logits = torch.randn(n, classes, dtype=torch.float64) * 2
    labels = torch.randint(0, classes, (n, 1)).double()
    return labels, logits


# -- softmax ---------------------------------------------------------------------------------

def test_softmax_matches_the_formula_and_is_stable(make_layer):
    layer = make_layer("[probs]\ntype=softmax\ninputs=fc\n", [FakeInput("fc", outputs=CLASSES)])
    assert layer.init_line() == "Initialized softmax layer 'probs' on GPUs 0, producing 10 outputs"
    x = torch.randn(4, CLASSES, dtype=torch.float64) * 3 + 1000
    np.testing.assert_allclose(layer(x).numpy(), softmax64(x.numpy()), rtol=1e-12)
    assert torch.autograd.gradcheck(layer, (torch.randn(3, 5, dtype=torch.float64,
                                                        requires_grad=True),))
    image = make_layer("[probs]\ntype=softmax\ninputs=c\n", [FakeInput("c", channels=2, size=2)])
    x = torch.randn(3, 2, 2, 2, dtype=torch.float64)     # over the whole case vector
    np.testing.assert_allclose(image(x).numpy(), softmax64(x.reshape(3, 8).numpy()), rtol=1e-12)


# -- logreg ----------------------------------------------------------------------------------

def logreg_reference(labels, probs, topk):
    """spec §6.3, case by case: [Σ −log p_ℓ, N − Σ top-1 credit, N − Σ top-k credit]."""
    nll = top1 = top_k = 0.0
    for label, p in zip(labels.reshape(-1).astype(int), probs):
        p_label = p[label]
        nll -= math.log(p_label)
        bigger = sum(q > p_label for q in p)
        tied = sum(q == p_label for q in p)
        top1 += 1 / tied if p_label == p.max() else 0
        left = topk - bigger
        top_k += 0 if left <= 0 else 1 if tied <= left else left / tied
    return [nll, len(probs) - top1, len(probs) - top_k]


TIED_PROBS = [[0.25, 0.25, 0.25, 0.25],    # label 2: top-1 1/4; top-2 2/4
              [0.4, 0.2, 0.2, 0.2],        # label 1: top-1 0; B=1, Q=3 -> 1/3
              [0.1, 0.2, 0.3, 0.4],        # label 0: B=3 -> nothing
              [0.5, 0.5, 0.0, 0.0],        # label 1: top-1 1/2; top-2 1
              [0.7, 0.1, 0.1, 0.1]]        # label 0: 1 and 1
TIED_LABELS = [2, 1, 0, 1, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logreg_tie_rules(make_layer, dtype):
    layer = make_layer(cost_cfg("cost.logreg"), logreg_inputs(4), "[logprob]\ncoeff=1\ntopk=2\n",
                       BuildContext(lambda idx: 1, num_classes=4))
    probs = torch.tensor(TIED_PROBS, dtype=dtype)
    labels = torch.tensor(TIED_LABELS, dtype=torch.float32)
    nll = -sum(math.log(TIED_PROBS[i][c]) for i, c in enumerate(TIED_LABELS))
    expected = [nll, 5 - (0.25 + 0.5 + 1), 5 - (0.5 + 1 / 3 + 1 + 1)]
    np.testing.assert_allclose(layer.cost_from_probs(labels, probs).tolist(), expected, rtol=1e-6)
    reference = logreg_reference(np.array(TIED_LABELS), np.array(TIED_PROBS), 2)
    np.testing.assert_allclose(expected, reference, rtol=1e-12)


@pytest.mark.parametrize("topk", [1, 5])
def test_logreg_values_and_objective(make_layer, topk):
    layer = make_layer(cost_cfg("cost.logreg"), logreg_inputs(),
                       f"[logprob]\ncoeff=0.5\ntopk={topk}\n")
    labels, logits = random_case()
    probs = torch.softmax(logits, 1)
    objective, values = layer(labels, probs)
    reference = logreg_reference(labels.numpy(), probs.numpy(), topk)
    np.testing.assert_allclose(values.numpy(), reference, rtol=1e-12)
    assert math.isclose(objective.item(), 0.5 * reference[0], rel_tol=1e-12)
    assert not values.requires_grad and values.shape == (3,)
    if topk == 1:
        assert values[1] == values[2]


def test_logreg_with_logits_gives_the_same_values_and_gradients(make_layer):
    layer = make_layer(cost_cfg("cost.logreg"), logreg_inputs(), "[logprob]\ncoeff=2\ntopk=3\n")
    labels, logits = random_case(n=8)
    grads, outputs = [], []
    for use_logits in (False, True):
        x = logits.clone().requires_grad_()
        probs = torch.softmax(x, 1)
        objective, values = layer(labels.reshape(-1), probs, logits=x if use_logits else None)
        objective.backward()
        grads.append(x.grad)
        outputs.append((objective.item(), values))
    assert math.isclose(outputs[0][0], outputs[1][0], rel_tol=1e-12)
    torch.testing.assert_close(outputs[0][1], outputs[1][1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-10, atol=1e-12)
    onehot = np.eye(CLASSES)[labels.reshape(-1).long().numpy()]
    # spec §6.3's combined gradient (a descent direction): coeff·(onehot − p) = −∂objective
    np.testing.assert_allclose(-grads[1].numpy(), 2 * (onehot - softmax64(logits.numpy())),
                               atol=1e-12)


def test_a_net_passes_the_softmax_input_as_logits(tmp_path):
    (tmp_path / "def.cfg").write_text(
        "[data]\ntype=data\ndataIdx=0\n[labels]\ntype=data\ndataIdx=1\n"
        "[probs]\ntype=softmax\ninputs=data\n[logprob]\ntype=cost.logreg\ninputs=labels,probs\n")
    (tmp_path / "params.cfg").write_text("[logprob]\ncoeff=1\n")
    net = ConvNet(str(tmp_path / "def.cfg"), str(tmp_path / "params.cfg"),
                  BuildContext(lambda idx: [CLASSES, 1][idx], num_classes=CLASSES))
    assert net.logits_for == {"logprob": "data"}
    labels, logits = random_case()
    out = net([logits, labels])
    log_probs = np.log(softmax64(logits.numpy()))[np.arange(6), labels.long().reshape(-1)]
    assert math.isclose(out.objective.item(), -log_probs.sum(), rel_tol=1e-12)


def test_logreg_gradcheck_through_the_probabilities(make_layer):
    layer = make_layer(cost_cfg("cost.logreg"), logreg_inputs(), "[logprob]\ncoeff=1\n")
    labels, logits = random_case(n=3)
    probs = torch.softmax(logits, 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: layer(labels, p)[0], (probs,))


def test_multiview_costs_the_averaged_probabilities_once_per_image(make_layer):
    layer = make_layer(cost_cfg("cost.logreg"), logreg_inputs(), "[logprob]\ncoeff=1\ntopk=2\n")
    labels, _ = random_case(n=5)
    views = [torch.softmax(torch.randn(5, CLASSES, dtype=torch.float64), 1) for _ in range(3)]
    average = sum(views) / 3
    values = layer.cost_from_probs(labels, average)
    np.testing.assert_allclose(values.numpy(), logreg_reference(labels.numpy(), average.numpy(), 2),
                               rtol=1e-12)


def test_logreg_definition(make_layer):
    layer = make_layer(cost_cfg("cost.logreg", children="other, third"), logreg_inputs(),
                       "[logprob]\ncoeff=1\n")
    assert layer.init_line() == "Initialized logistic regression cost 'logprob' on GPUs 0"
    assert (layer.is_cost, layer.needs_params, layer.allows_neuron) == (True, True, False)
    assert layer.children_names == ["other", "third"]
    assert layer.probs_input == "probs"
    assert (layer.coeff, layer.topk) == (1.0, 1)
    assert layer.output_filter([6.0, 3.0, 1.5], 3) == [2.0, 1.0, 0.5]


def test_logreg_class_count_is_unchecked_when_unknown(make_layer):
    layer = make_layer(cost_cfg("cost.logreg"), logreg_inputs(7), "[logprob]\ncoeff=1\ntopk=7\n",
                       BuildContext(lambda idx: 1, num_classes=None))
    assert layer.topk == 7


@pytest.mark.parametrize("inputs, line, words", [
    ([FakeInput("labels", outputs=1)], 3, "takes 2 input(s), got 1"),
    ([FakeInput("labels", outputs=2), FakeInput("probs", outputs=CLASSES, type_name="softmax")],
     3, "input 0 'labels' (the labels) must have dimensionality 1, not 2"),
    ([FakeInput("labels", outputs=1), FakeInput("probs", outputs=CLASSES, type_name="fc")],
     3, "input 1 'probs' must be a softmax layer, not a layer of type 'fc'"),
    ([FakeInput("labels", outputs=1), FakeInput("probs", outputs=12, type_name="softmax")],
     3, "produces 12 outputs but must produce 10, because that is the number of classes"),
])
def test_logreg_input_errors(make_layer, inputs, line, words):
    names = ",".join(inp.name for inp in inputs)
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg("cost.logreg", names), inputs)
    check_error(excinfo, line, "logprob", words)


@pytest.mark.parametrize("params, line, words", [
    ("[logprob]\ncoeff=1\ntopk=11\n", 3, "topk=11: expected between 1 and the number of "
                                         "classes, 10"),
    ("[logprob]\ncoeff=1\ntopk=0\n", 3, "topk=0: expected between 1"),
    ("[logprob]\ntopk=5\n", 1, "missing required key 'coeff'"),
    ("[logprob]\ncoeff=one\n", 2, "coeff='one': expected a number"),
])
def test_logreg_params_errors(make_layer, params, line, words):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg("cost.logreg"), logreg_inputs(), params)
    check_error(excinfo, line, "logprob", words)


@pytest.mark.parametrize("type_name", ["cost.logreg", "cost.crossent", "cost.bce", "cost.dce",
                                       "cost.sum2"])
def test_every_cost_needs_its_params_section_and_takes_no_neuron(make_layer, type_name):
    labels = FakeInput("labels", outputs=1 if type_name == "cost.logreg" else CLASSES)
    inputs = [labels, FakeInput("probs", outputs=CLASSES, type_name="softmax")]
    names, inputs = ("probs", inputs[1:]) if type_name == "cost.sum2" else ("labels,probs", inputs)
    layer = make_layer(cost_cfg(type_name, names), inputs)
    with pytest.raises(ConfigError, match="layer 'logprob': .*requires extra parameters"):
        layer.read_params(None, "params.cfg")
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg(type_name, names, neuron="relu"), inputs)
    check_error(excinfo, 4, "logprob", "neuron= is not allowed")


# -- crossent --------------------------------------------------------------------------------

def safelog(x):
    return math.log(x) if x > 0 else -50.0


def crossent_reference(targets, probs):
    total = errors = 0.0
    for t, p in zip(targets, probs):
        total += sum(tj * safelog(pj) for tj, pj in zip(t, p))
        at_max = [j for j, pj in enumerate(p) if pj == p.max()]
        errors += 1 - (1 / len(at_max) if any(t[j] > 0 for j in at_max) else 0)
    return [-total, errors]


def crossent_layer(make_layer, coeff=1):
    inputs = [FakeInput("labmat", outputs=CLASSES),
              FakeInput("probs", outputs=CLASSES, type_name="softmax")]
    return make_layer(cost_cfg("cost.crossent", "labmat,probs"), inputs,
                      f"[logprob]\ncoeff={coeff}\n")


def test_crossent_values_objective_and_ties(make_layer):
    layer = crossent_layer(make_layer, coeff=3)
    assert layer.init_line() == "Initialized cross-entropy cost 'logprob' on GPUs 0"
    probs = torch.softmax(torch.randn(4, CLASSES, dtype=torch.float64), 1)
    probs[0] = torch.tensor([0.5, 0.5] + [0.0] * 8)      # tie at the max, labelled class 1
    probs[1] = torch.tensor([0.0, 0.5, 0.5] + [0.0] * 7)  # label on a zero: safelog gives −50
    targets = torch.zeros(4, CLASSES, dtype=torch.float64)
    targets[0, 1] = targets[1, 0] = 1
    targets[2, [3, 7]] = 0.5                              # multi-hot
    targets[3, 4] = 1
    objective, values = layer(targets, probs)
    reference = crossent_reference(targets.numpy(), probs.numpy())
    np.testing.assert_allclose(values.numpy(), reference, rtol=1e-12)
    assert math.isclose(objective.item(), 3 * reference[0], rel_tol=1e-12)


def test_crossent_with_logits_matches_and_gradchecks(make_layer):
    layer = crossent_layer(make_layer)
    logits = torch.randn(3, CLASSES, dtype=torch.float64, requires_grad=True)
    targets = torch.eye(CLASSES, dtype=torch.float64)[torch.randint(0, CLASSES, (3,))]
    probs = torch.softmax(logits, 1)
    plain, with_logits = layer(targets, probs), layer(targets, probs, logits=logits)
    torch.testing.assert_close(plain[1], with_logits[1], rtol=1e-12, atol=1e-12)
    assert math.isclose(plain[0].item(), with_logits[0].item(), rel_tol=1e-12)
    assert torch.autograd.gradcheck(lambda x: layer(targets, torch.softmax(x, 1), logits=x)[0],
                                    (logits,))
    assert torch.autograd.gradcheck(lambda p: layer(targets, p)[0], (probs.detach().clone()
                                                                     .requires_grad_(),))


@pytest.mark.parametrize("inputs, words", [
    ([FakeInput("labmat", outputs=CLASSES), FakeInput("probs", outputs=CLASSES)],
     "must be a softmax layer"),
    ([FakeInput("labmat", outputs=1), FakeInput("probs", outputs=CLASSES, type_name="softmax")],
     "(the label matrix) has dimensionality 1, but it must equal the number of classes, 10"),
])
def test_crossent_input_errors(make_layer, inputs, words):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg("cost.crossent", "labmat,probs"), inputs)
    check_error(excinfo, 3, "logprob", words)


# -- bce and dce -----------------------------------------------------------------------------

def bce_reference(targets, preds, pos_weight):
    ce = wrong = credit = 0.0
    for t, y in zip(targets, preds):
        ce += sum(pos_weight * tj * safelog(yj) + (1 - tj) * safelog(1 - yj)
                  for tj, yj in zip(t, y))
        wrong += sum((yj > 0.5) != tj for tj, yj in zip(t, y)) / len(t)
        at_max = [j for j, yj in enumerate(y) if yj == y.max()]
        credit += sum(t[j] for j in at_max) / len(at_max)
    return -ce, wrong, len(preds) - credit


def bce_case(n=5, d=6):
    preds = torch.rand(n, d, dtype=torch.float64) * 0.9 + 0.05
    targets = (torch.rand(n, d) < 0.4).double()
    return targets, preds


def test_bce_with_pos_weight(make_layer):
    logistic = FakeInput("preds", outputs=6)
    logistic.neuron_type = NEURON_TYPES["logistic"]
    layer = make_layer(cost_cfg("cost.bce", "labels,preds"),
                       [FakeInput("labels", outputs=6), logistic],
                       "[logprob]\ncoeff=0.5\nposWeight=3\n")
    assert layer.init_line() == "Initialized binomial cross-entropy cost 'logprob' on GPUs 0"
    assert layer.warnings == []
    targets, preds = bce_case()
    preds[0, :2] = 0.8                                    # a tie at the max
    objective, values = layer(targets, preds)
    reference = bce_reference(targets.numpy(), preds.numpy(), 3.0)
    np.testing.assert_allclose(values.numpy(), reference, rtol=1e-12)
    assert math.isclose(objective.item(), 0.5 * reference[0], rel_tol=1e-12)
    assert torch.autograd.gradcheck(lambda y: layer(targets, y)[0],
                                    (preds.clone().requires_grad_(),))


def test_bce_warns_when_its_input_is_not_logistic(make_layer):
    layer = make_layer(cost_cfg("cost.bce", "labels,preds"),
                       [FakeInput("labels", outputs=6), FakeInput("preds", outputs=6)],
                       "[logprob]\ncoeff=1\n")
    assert layer.pos_weight == 1.0
    assert len(layer.warnings) == 1
    assert layer.warnings[0].endswith("layer 'logprob': input 'preds' is not logistic, results "
                                      "may not be what you intend")


def test_bce_inputs_must_match(make_layer):
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg("cost.bce", "labels,preds"),
                   [FakeInput("labels", outputs=6), FakeInput("preds", outputs=5)])
    check_error(excinfo, 3, "logprob", "both inputs must produce the same number of outputs")


def dce_layer(make_layer, **keys):
    return make_layer(cost_cfg("cost.dce", "labels,preds", **keys),
                      [FakeInput("labels", outputs=CLASSES), FakeInput("preds", outputs=CLASSES)],
                      "[logprob]\ncoeff=1\nposWeight=2\n")


def test_dce_counts_per_class(make_layer):
    layer = dce_layer(make_layer)
    assert layer.init_line() == "Initialized detection cross-entropy cost 'logprob' on GPUs 0"
    targets, preds = bce_case(n=7, d=CLASSES)
    _, values = layer(targets, preds)
    ce, wrong, _ = bce_reference(targets.numpy(), preds.numpy(), 2.0)
    t, y = targets.numpy(), preds.numpy()
    per_class = [[(y[:, c] > 0.5).sum(), t[:, c].sum(), ((y[:, c] > 0.5) & (t[:, c] == 1)).sum()]
                 for c in range(CLASSES)]
    np.testing.assert_allclose(values.numpy(), [ce, wrong] + sum(per_class, []), rtol=1e-12)


def test_dce_prints_precision_and_recall(make_layer):
    layer = dce_layer(make_layer)
    sums = [8.0, 2.0, 4.0, 5.0, 2.0, 0.0, 3.0, 0.0]      # class 0: 4 declared, 5 positive, 2 hit
    assert layer.output_filter(sums, 4) == [2.0, 0.5, 0.5, 0.4, math.inf, 0.0]


@pytest.mark.parametrize("keys, inputs, line, words", [
    ({"children": "other"}, None, 4, "cannot have children"),
    ({}, [FakeInput("labels", outputs=4), FakeInput("preds", outputs=4)], 3,
     "has dimensionality 4, but it must equal the number of classes, 10"),
])
def test_dce_errors(make_layer, keys, inputs, line, words):
    inputs = inputs or [FakeInput("labels", outputs=CLASSES), FakeInput("preds", outputs=CLASSES)]
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg("cost.dce", "labels,preds", **keys), inputs)
    check_error(excinfo, line, "logprob", words)


# -- sum2 ------------------------------------------------------------------------------------

def test_sum2(make_layer):
    layer = make_layer(cost_cfg("cost.sum2", "diff"), [FakeInput("diff", channels=2, size=3)],
                       "[logprob]\ncoeff=0.25\n")
    assert layer.init_line() == "Initialized sum-of-squares cost 'logprob' on GPUs 0"
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64, requires_grad=True)
    objective, values = layer(x)
    squares = (x.detach().numpy() ** 2).sum()
    np.testing.assert_allclose(values.numpy(), [squares], rtol=1e-12)
    assert math.isclose(objective.item(), 0.25 * squares, rel_tol=1e-12)
    objective.backward()
    np.testing.assert_allclose(x.grad.numpy(), 0.5 * x.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(layer.cost_from_probs(None, x.detach()).numpy(), [squares],
                               rtol=1e-12)
    with pytest.raises(ConfigError) as excinfo:
        make_layer(cost_cfg("cost.sum2", "a,b"), [FakeInput("a", outputs=2),
                                                  FakeInput("b", outputs=2)])
    check_error(excinfo, 3, "logprob", "takes 1 input(s), got 2")
