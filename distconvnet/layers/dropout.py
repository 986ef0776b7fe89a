"""`dropout` ("inverted": rescaled in training) and `dropout2` (AlexNet's: rescaled at test time).

Both read `enable` (true) and `keep` (0.5) from the layer-params file (spec §5), so a resumed run
can change them. Training mode is the module's `self.training` (the original's PASS_TRAIN); the
masks come from the torch RNG.
"""

import torch
import torch.nn.functional as F

from .base import Layer, register


@register("dropout")
class DropoutLayer(Layer):
    description = "dropout layer"
    needs_params = True

    def parse(self, sec, inputs, ctx):
        inp = inputs[0]
        self.channels, self.img_size, self.outputs = inp.channels, inp.img_size, inp.outputs
        self.enable, self.keep = True, 0.5

    def set_params(self, sec):
        self.enable = sec.bool("enable", True)
        self.keep = sec.float("keep", 0.5)
        if not 0 < self.keep <= 1:
            raise sec.error(f"keep={self.keep:g}: expected a probability in (0, 1]", "keep")

    def output_words(self):
        return f"{self.outputs} outputs"     # the original prints dropout layers flat

    def forward(self, x):
        # mask = Bernoulli(keep) / keep in training; the identity otherwise (spec §4.3)
        if self.enable and self.training:
            return F.dropout(x, p=1.0 - self.keep, training=True)
        return x


@register("dropout2")
class Dropout2Layer(DropoutLayer):
    description = "dropout2 layer"

    def forward(self, x):
        if self.enable and self.training:
            return x * torch.empty_like(x).bernoulli_(self.keep)
        # Test time, and also training with enable=false: always keep·x (spec §4.3's quirk)
        return x * self.keep
