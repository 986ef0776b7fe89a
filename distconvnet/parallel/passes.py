"""Strategy: the pass schedule of spec §8 (model_parallel.PassSchedule), for nets with several
passes per minibatch (hybrid) or layers spread over several processes (model parallel)."""

from ..errors import OptionError
from .model_parallel import PassSchedule
from .strategy import Ranked


class PassScheduleStrategy(Ranked):
    # Layers update pass by pass (updatePeriod, activePassPeriod), never all at one step.
    fuses_update = False

    @classmethod
    def fits(cls, plan, ranks):
        """Several passes per minibatch, or layers on different GPUs spread over several
        processes; one pass on one process, or a data-parallel net on several (DDP or MPI),
        runs the plain forward."""
        return not (plan.num_passes == 1 and (ranks.world_size == 1 or plan.is_data_parallel))

    def __init__(self, ranks, plan, model, device, compile_model):
        if ranks.world_size > 1 and ranks.backend == "mpi":
            raise OptionError("--dist-backend mpi syncs data-parallel nets only; this net "
                              "places layers on different GPUs (gpu=): use gloo or nccl")
        super().__init__(ranks)
        self.schedule = PassSchedule(model, plan, world_size=ranks.world_size, rank=ranks.rank,
                                     compile_layers=compile_model)
        self.schedule.create_process_groups()
        self.optimizer = self.autocast = None

    def attach(self, optimizer, autocast):
        self.optimizer, self.autocast = optimizer, autocast
        self.schedule.freeze_remote_layers(optimizer)

    def train_minibatch(self, mats, cases):
        return self.schedule.train_minibatch(mats, self.optimizer, self.autocast, cases)

    def batch_costs(self, sums):
        return self.schedule.folded_costs(sums)

    def before_test(self):
        """Ranks train only the layers they hold; a test runs the whole net on every rank, and
        the statistics and checkpoint read it all, so every copy is made current here, the
        only time training needs it (not per batch)."""
        self.schedule.share_weights(self.optimizer)

    def drop_groups(self):
        self.schedule = None
