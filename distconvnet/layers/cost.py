"""`softmax` and the costs `cost.logreg`, `cost.crossent`, `cost.bce`, `cost.dce`, `cost.sum2`.

A cost layer's forward returns (objective, values):
  objective  coeff × (the cost summed over the cases), a differentiable scalar that training
             minimises; the optimizer divides gradients by the minibatch size, so no mean here;
  values     the per-batch SUMS the console prints after `output_filter` (usually ÷ cases),
             a detached 1-D tensor computed without any host synchronisation.
`cost_from_probs(labels, probs)` gives the same values from given (e.g. multiview-averaged)
probabilities, for evaluation (spec §6.3).

When a softmax feeds only one logreg/crossent layer, model.py passes that softmax's input as
`logits=`; log-probabilities then come from log_softmax, whose gradient is the original's
combined coeff·(onehot − p) applied to the softmax input (spec §6.3), stable where p underflows.
"""

import math

import torch
import torch.nn.functional as F

from .base import Layer, register


def _wide(x):
    """Costs are summed in at least float32, whatever autocast produced."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def _safelog(x):
    """The original's safelog: log(x) where x > 0, else −50 (a finite gradient-free floor)."""
    return torch.where(x > 0, x.clamp_min(torch.finfo(x.dtype).tiny).log(), -50.0)


@register("softmax")
class SoftmaxLayer(Layer):
    description = "softmax layer"

    def parse(self, sec, inputs, ctx):
        self.outputs = inputs[0].outputs

    def forward(self, x):
        return F.softmax(x.flatten(1), dim=1)   # torch subtracts the per-case max first


class CostLayer(Layer):
    """What every cost shares: coeff, children, the init line, the forward contract."""

    is_cost = True
    allows_neuron = False
    needs_params = True
    num_inputs = 2          # (labels, predictions); sum2 has its one input

    def parse(self, sec, inputs, ctx):
        self.outputs = 0
        self.children_names = [c.strip() for c in sec.str("children", "").split(",")
                               if c.strip()]
        self.probs_input = self.input_names[-1]   # the input multiview averages
        self.coeff = None
        self.warnings = []
        self.check_inputs(sec, inputs, ctx)

    def check_inputs(self, sec, inputs, ctx):
        """Type-specific input constraints (spec §4.3)."""

    def set_params(self, sec):
        self.coeff = sec.float("coeff")

    def init_line(self):
        gpus = ", ".join(str(g) for g in self.gpus)
        return f"Initialized {self.description} '{self.name}' on GPUs {gpus}"

    def forward(self, *xs, logits=None):
        cost, values = self.evaluate(*xs, logits=logits)
        return self.coeff * cost, values.detach()

    def cost_from_probs(self, labels, probs):
        """The values for given probabilities (e.g. averaged over views), without a graph."""
        with torch.no_grad():
            return self.evaluate(labels, probs)[1]

    def evaluate(self, labels, probs, logits=None):
        """(cost summed over cases, values) for one minibatch."""
        raise NotImplementedError

    def output_filter(self, sums, num_cases):
        """The printed numbers from summed values (the original's `outputFilter`)."""
        return [v / num_cases for v in sums]

    def check_softmax_input(self, sec, inputs, ctx):
        probs = inputs[1]
        if probs.type_name != "softmax":
            raise sec.error(f"input 1 '{probs.name}' must be a softmax layer, not a layer of "
                            f"type '{probs.type_name}'", "inputs")
        if ctx.num_classes is not None and probs.outputs != ctx.num_classes:
            raise sec.error(f"softmax input '{probs.name}' produces {probs.outputs} outputs but "
                            f"must produce {ctx.num_classes}, because that is the number of "
                            f"classes in the dataset", "inputs")


@register("cost.logreg")
class LogregCostLayer(CostLayer):
    """Multinomial log-loss with top-1 and top-k errors and the tie rules of spec §6.3."""

    description = "logistic regression cost"

    def check_inputs(self, sec, inputs, ctx):
        labels = inputs[0]
        if labels.outputs != 1:
            raise sec.error(f"input 0 '{labels.name}' (the labels) must have dimensionality 1, "
                            f"not {labels.outputs}", "inputs")
        self.check_softmax_input(sec, inputs, ctx)
        self.num_classes = inputs[1].outputs
        self.topk = 1

    def set_params(self, sec):
        super().set_params(sec)
        self.topk = self.check_range(sec, "topk", sec.int("topk", 1), 1, self.num_classes,
                                     f"between 1 and the number of classes, "
                                     f"{self.num_classes}")

    def evaluate(self, labels, probs, logits=None):
        label_idx = labels.reshape(-1, 1).long()
        probs = _wide(probs.flatten(1))
        if logits is None:
            label_log_probs = probs.gather(1, label_idx).log()   # plain log, as the original
        else:
            label_log_probs = F.log_softmax(_wide(logits.flatten(1)), 1).gather(1, label_idx)
        return -label_log_probs.sum(), self.values(label_idx, probs.detach(),
                                                   label_log_probs.detach())

    def values(self, label_idx, probs, label_log_probs):
        """[Σ −log p_ℓ, N − Σ top-1 credit, N − Σ top-k credit] (spec §6.3)."""
        n, dtype = probs.shape[0], probs.dtype
        p_label = probs.gather(1, label_idx)
        bigger = (probs > p_label).sum(1).to(dtype)   # B: classes strictly more probable
        equal = (probs == p_label).sum(1).to(dtype)   # Q: classes tied with the label, itself too
        is_max = p_label.squeeze(1) == probs.amax(1)
        top1 = torch.where(is_max, 1.0 / equal, 0.0)
        slots = self.topk - bigger                    # k − B places left for the Q tied classes
        topk = torch.where(slots <= 0, 0.0,
                           torch.where(equal <= slots, 1.0, slots / equal))
        return torch.stack([-label_log_probs.sum(), n - top1.sum(), n - topk.sum()])


@register("cost.crossent")
class CrossEntCostLayer(CostLayer):
    """−Σ label·log p over a one-hot or multi-hot label matrix; values [−Σ, #errors]."""

    description = "cross-entropy cost"

    def check_inputs(self, sec, inputs, ctx):
        labels, probs = inputs
        self.check_softmax_input(sec, inputs, ctx)
        if labels.outputs != probs.outputs:
            raise sec.error(f"input 0 '{labels.name}' (the label matrix) has dimensionality "
                            f"{labels.outputs}, but it must equal the number of classes, "
                            f"{probs.outputs}", "inputs")

    def evaluate(self, labels, probs, logits=None):
        targets = _wide(labels.flatten(1))
        probs = _wide(probs.flatten(1))
        if logits is None:
            log_probs = _safelog(probs)
        else:
            log_probs = F.log_softmax(_wide(logits.flatten(1)), 1)
        cross_ent = (targets * log_probs).sum()
        n = probs.shape[0]
        probs, targets = probs.detach(), targets.detach()
        at_max = probs == probs.amax(1, keepdim=True)
        # credit 1/#tied-at-max when any class tied at the max is labelled (the original kernel)
        credit = torch.where((at_max & (targets > 0)).any(1),
                             1.0 / at_max.sum(1).to(probs.dtype), 0.0)
        return -cross_ent, torch.stack([-cross_ent.detach(), n - credit.sum()])


@register("cost.bce")
class BinomialCrossEntCostLayer(CostLayer):
    """−Σ [posWeight·t·log y + (1−t)·log(1−y)] over all outputs (spec §4.3).

    values: [cross-entropy, #wrong outputs / D (thresholded at 0.5), N − Σ softmax-style top-1
    credit]. Children's values are added in like every cost's (spec §4.3); the original printed
    only the cross-entropy for costs with children, whose partial error rates it found
    meaningless. `logits` (passed when preds is a softmax) is not used: the cost is on preds.
    """

    description = "binomial cross-entropy cost"

    def check_inputs(self, sec, inputs, ctx):
        labels, preds = inputs
        if labels.outputs != preds.outputs:
            raise sec.error(f"both inputs must produce the same number of outputs, got "
                            f"{labels.outputs} ('{labels.name}') and {preds.outputs} "
                            f"('{preds.name}')", "inputs")
        neuron = getattr(preds, "neuron_type", None)
        if neuron is None or neuron.name != "logistic":
            self.warnings.append(f"{sec.path}:{sec.line}: layer '{self.name}': input "
                                 f"'{preds.name}' is not logistic, results may not be what you "
                                 f"intend")
        self.pos_weight = 1.0

    def set_params(self, sec):
        super().set_params(sec)
        self.pos_weight = sec.float("posWeight", 1.0)

    def evaluate(self, labels, preds, logits=None):
        targets = _wide(labels.flatten(1))
        preds = _wide(preds.flatten(1))
        cross_ent = (self.pos_weight * targets * _safelog(preds)
                     + (1 - targets) * _safelog(1 - preds)).sum()
        targets, preds = targets.detach(), preds.detach()
        agree = (preds > 0.5).to(preds.dtype) == targets
        wrong = (agree.numel() - agree.sum().to(preds.dtype)) / targets.shape[1]
        return -cross_ent, torch.cat([torch.stack([-cross_ent.detach(), wrong]),
                                      self.more_values(targets, preds, agree)])

    def more_values(self, targets, preds, agree):
        """Top-1 error as if preds were a softmax: credit 1/#tied-at-max times the label."""
        at_max = (preds == preds.amax(1, keepdim=True)).to(preds.dtype)
        credit = (at_max / at_max.sum(1, keepdim=True) * targets).sum()
        return (preds.shape[0] - credit).reshape(1)


@register("cost.dce")
class DetectionCrossEntCostLayer(BinomialCrossEntCostLayer):
    """bce plus per-class counts for precision and recall (no top-1 value).

    values: [cross-entropy, #wrong / D] then, per class, [declared positive (y > 0.5), positive
    (Σ t), true positive]; `output_filter` turns each class's counts into precision and recall.
    """

    description = "detection cross-entropy cost"

    def check_inputs(self, sec, inputs, ctx):
        super().check_inputs(sec, inputs, ctx)
        if ctx.num_classes is not None and inputs[0].outputs != ctx.num_classes:
            raise sec.error(f"input 0 '{inputs[0].name}' (the labels) has dimensionality "
                            f"{inputs[0].outputs}, but it must equal the number of classes, "
                            f"{ctx.num_classes}", "inputs")
        if self.children_names:
            raise sec.error("a cost.dce layer cannot have children (the original engine "
                            "asserts that detection costs are never aggregated)", "children")

    def more_values(self, targets, preds, agree):
        declared = (preds > 0.5).sum(0).to(preds.dtype)
        positive = targets.sum(0)
        true_positive = (agree * targets).sum(0)
        return torch.stack([declared, positive, true_positive], dim=1).flatten()

    def output_filter(self, sums, num_cases):
        per_class = [sums[i:i + 3] for i in range(2, len(sums), 3)]
        ratios = [tp / count if count > 0 else math.inf
                  for declared, positive, tp in per_class for count in (declared, positive)]
        return [sums[0] / num_cases, sums[1] / num_cases] + ratios


@register("cost.sum2")
class SumOfSquaresCostLayer(CostLayer):
    """Σ x² of its single input, e.g. an eltsum difference in an autoencoder."""

    description = "sum-of-squares cost"
    num_inputs = 1

    def evaluate(self, x, logits=None):
        x = _wide(x.flatten(1))
        total = (x * x).sum()
        return total, total.detach().reshape(1)

    def cost_from_probs(self, labels, probs):
        """`labels` is unused: this cost's one input is `probs` (averaged when multiview)."""
        with torch.no_grad():
            return self.evaluate(probs)[1]
