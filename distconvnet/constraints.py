"""The post-update constraints of ConvLayer/FCLayer/LocalUnsharedLayer (spec §5.2): wball
and wcNormMax/wcNormMin, applied by Ccn2SGD after each update of a constrained matrix."""

import math

import torch

# How a constraint sees "columns" (spec §5.2) in our torch layouts. cuda-convnet2 normalises
# columns of its (rows, cols) matrices (spec §4.5); here: the dims that span one column, and
# whether wball sets the norm exactly (FCLayer/ConvLayer::_constrainWeights) or caps it
# (LocalUnsharedLayer uses normalizeLocalWeights: per module and filter, only when above).
#   fc    (outputs, inputs): one output unit is a row
#   sfc   (parts, inputs/parts, outputs per part): one output index across all parts, as the
#         original's (inputs, outputs per part) matrix has it
#   conv  (filters·groups, channels/groups, k, k): one filter
#   local (M², groups, k²·channels/groups, filters): one filter at one module
COLUMNS = {
    "fc": ((1,), True),
    "sfc": ((0, 1), True),
    "conv": ((1, 2, 3), True),
    "local": ((2,), False),
}


def constrain(group):
    """The post-update constraints of ConvLayer/FCLayer/LocalUnsharedLayer (spec §5.2)."""
    if group["wball"] <= 0 and group["wc_norm_max"] <= 0:
        return
    w = group["params"][0]
    dims, sets_norm = COLUMNS[group["layer_type"]]
    if group["wc_norm_max"] > 0:
        # The original's measure, read from its WeightContrastNormOperator:
        # spread = sqrt(Σ (w − mean)²) / n over a filter's n weights (that is std/√n, not
        # the std its comment names). The filter itself (not its centred copy) is scaled
        # by lo/spread or hi/spread when the spread leaves [wcNormMin, wcNormMax].
        n = math.prod(w.shape[d] for d in dims)
        centred = w - w.mean(dim=dims, keepdim=True)
        spread = centred.square().sum(dim=dims, keepdim=True).sqrt() / n
        lo, hi = group["wc_norm_min"], group["wc_norm_max"]
        factor = torch.where(spread < lo, lo / spread,
                             torch.where(spread > hi, hi / spread, torch.ones_like(spread)))
        # A constant filter has no spread to rescale; the original would divide by 0.
        w.mul_(torch.where(spread > 0, factor, torch.ones_like(factor)))
    if group["wball"] > 0:
        norm = w.square().sum(dim=dims, keepdim=True).sqrt()
        factor = group["wball"] / norm
        if not sets_norm:
            factor = factor.clamp(max=1.0)
        # An all-zero column keeps its zeros instead of becoming NaN.
        w.mul_(torch.where(norm > 0, factor, torch.ones_like(factor)))
