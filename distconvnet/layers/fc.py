"""`fc` (fully connected) and `sfc` (split fully connected: block-diagonal weights).

Both flatten each input to its channel-major per-case vector, keep one weight matrix per input,
sum the per-input products and add one bias row (spec §4.5).

Weight layouts (ours ↔ the original's (rows, cols) matrices of spec §4.5):
  fc   torch (outputs, inputs), as F.linear wants        ↔ (inputs, outputs), Fortran order
  sfc  torch (parts, inputs/parts, outputs per part)     ↔ (inputs, outputs per part): the
       diagonal blocks stacked by rows, as the original's splitRows(parts) cuts them
Biases are (outputs,) ↔ (1, outputs) (sfc: outputs = outputs per part · parts).
"""

import numpy as np
import torch
import torch.nn.functional as F

from .base import WeightLayer, register


@register("fc")
class FullyConnectedLayer(WeightLayer):
    description = "fully-connected layer"
    num_inputs = None

    def parse(self, sec, inputs, ctx):
        self.outputs = self.check_range(sec, "outputs", sec.int("outputs"), 1)
        self.make_weights(sec, ctx, [(self.outputs, inp.outputs) for inp in inputs],
                          (self.outputs,))

    def forward(self, *xs):
        out = F.linear(xs[0].flatten(1), self.weights[0], self.biases)
        # index, not slice: a ParameterList slice re-wraps its tensors as new Parameters,
        # which would cut them out of the graph under torch.func.functional_call
        for i in range(1, len(xs)):
            out = out.addmm(xs[i].flatten(1), self.weights[i].t())
        return out

    def ccn2_shape(self, i, torch_shape):
        outputs, inputs = torch_shape
        return (inputs, outputs)

    def to_ccn2(self, i, tensor):
        # The transpose of a C-ordered (outputs, inputs) array is the Fortran-ordered matrix;
        # copied, so a checkpoint never aliases live weights.
        return np.array(tensor.detach().cpu().numpy().T, dtype=np.float32, order="F")

    def from_ccn2(self, i, array, torch_shape):
        return torch.tensor(np.asarray(array, dtype=np.float32).T).reshape(torch_shape)


@register("sfc")
class SplitFullyConnectedLayer(WeightLayer):
    description = "split fully-connected layer"
    num_inputs = None       # any number, one matrix per input, as fc

    def parse(self, sec, inputs, ctx):
        self.parts = self.check_range(sec, "parts", sec.int("parts"), 1)
        self.outputs_per_part = self.check_range(sec, "outputs", sec.int("outputs"), 1)
        self.outputs = self.outputs_per_part * self.parts
        for inp in inputs:
            if inp.outputs % self.parts:
                raise sec.error(f"input '{inp.name}' has {inp.outputs} outputs per case, which "
                                f"is not divisible by parts={self.parts}", "parts")
        self.make_weights(sec, ctx, [(self.parts, inp.outputs // self.parts,
                                      self.outputs_per_part) for inp in inputs],
                          (self.outputs,))

    def output_words(self):
        return f"{self.outputs} outputs in {self.parts} parts"

    def forward(self, *xs):
        n = xs[0].shape[0]
        # (parts, N, outputs per part), starting from the bias so baddbmm fuses its add
        out = self.biases.reshape(self.parts, 1, self.outputs_per_part)
        for x, weight in zip(xs, self.weights):
            blocks = x.reshape(n, self.parts, -1).transpose(0, 1)   # (parts, N, inputs/parts)
            out = torch.baddbmm(out, blocks, weight)
        return out.transpose(0, 1).reshape(n, self.outputs)

    def ccn2_shape(self, i, torch_shape):
        parts, rows_per_part, outputs_per_part = torch_shape
        return (parts * rows_per_part, outputs_per_part)

    def to_ccn2(self, i, tensor):
        parts, rows_per_part, outputs_per_part = tensor.shape
        matrix = tensor.detach().cpu().reshape(parts * rows_per_part, outputs_per_part)
        return np.array(matrix.numpy(), dtype=np.float32, order="F")

    def from_ccn2(self, i, array, torch_shape):
        return torch.tensor(np.ascontiguousarray(array, dtype=np.float32)).reshape(torch_shape)
