"""Strategy: one process, one pass per minibatch (every layer on one device, or a cfg whose
`gpu=` lists all share this process's device without needing passes)."""

from .. import fastpath
from .strategy import Ranked


class SingleProcess(Ranked):

    @classmethod
    def fits(cls, plan, ranks):
        return ranks.world_size == 1

    def __init__(self, ranks, plan, model, device, compile_model):
        super().__init__(ranks)
        self.forward = fastpath.forward_fn(model, compile_model)
        self.step = None

    def attach(self, optimizer, autocast):
        # The step as one CUDA graph needs the fused update at every step (fastpath.py).
        self.step = fastpath.train_step(self.forward, optimizer, autocast,
                                        graphs=optimizer.fused and optimizer.updates_every_step())

    def train_minibatch(self, mats, cases):
        return self.step(mats)

    def take_warnings(self):
        return self.step.take_warnings() if hasattr(self.step, "take_warnings") else []
