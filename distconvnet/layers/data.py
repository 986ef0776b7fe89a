"""The `data` layer: one matrix of the data provider's output, or a row range of it."""

from .base import Layer, register


@register("data")
class DataLayer(Layer):
    description = "data layer"
    num_inputs = 0
    is_data = True

    def parse(self, sec, inputs, ctx):
        self.data_idx = self.check_range(sec, "dataIdx", sec.int("dataIdx"), 0)
        try:
            dims = ctx.data_dims(self.data_idx)
        except (KeyError, IndexError):
            raise sec.error(f"dataIdx={self.data_idx}: the data provider has no matrix "
                            f"{self.data_idx}", "dataIdx") from None
        self.start = self.check_range(sec, "start", sec.int("start", 0), 0, dims)
        self.end = self.check_range(sec, "end", sec.int("end", dims), self.start + 1, dims)
        self.full = (self.start, self.end) == (0, dims)
        self.outputs = self.end - self.start

    def init_line(self):
        return f"Initialized data layer '{self.name}', producing {self.outputs} outputs"

    def forward(self, mats):
        x = mats[self.data_idx]
        return x if self.full else x.flatten(1)[:, self.start:self.end]
