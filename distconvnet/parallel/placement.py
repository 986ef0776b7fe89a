"""Where the replicas of a plan (plan.py) run with W processes, one device each (spec §8).

GPU indices 0..G−1 are the ranks of one *model group*; W processes with W a multiple of G form
W/G data-parallel copies of it; with W < G several indices share one process (and device),
which changes where things run but not the arithmetic. Also here, per rank: where backward
starts (the roots and cut layers) and which microbatches of the data each rank reads.
"""

from ..errors import OptionError


class Placement:
    """Where the replicas of a plan run with `world_size` processes (one device each).

    GPU index g of data-parallel group d runs on rank d·G + g when W is a multiple of G; with
    W < G, index g runs on rank ⌊g·W/G⌋ (contiguous indices share a process).
    """

    def __init__(self, plan, world_size):
        gpus = plan.num_gpus
        if world_size < 1:
            raise OptionError(f"world size must be at least 1, got {world_size}")
        if world_size > gpus and world_size % gpus:
            raise OptionError(f"{world_size} processes cannot run a net on {gpus} GPUs: the "
                              f"number of processes must divide {gpus} or be a multiple of it "
                              f"({world_size} % {gpus} = {world_size % gpus})")
        self.plan, self.world_size, self.num_gpus = plan, world_size, gpus
        self.data_groups = max(world_size // gpus, 1)
        self.group_size = min(world_size, gpus)

    def rank_of(self, gpu, group=0):
        if self.world_size >= self.num_gpus:
            return group * self.num_gpus + gpu
        return gpu * self.world_size // self.num_gpus

    def group_of(self, rank):
        return rank // self.group_size

    def gpus_of(self, rank):
        """The GPU indices this rank runs, in order."""
        group = self.group_of(rank)
        return tuple(g for g in range(self.num_gpus) if self.rank_of(g, group) == rank)

    def replica_ranks(self, name, group=0):
        """The rank of each replica of layer `name` in data-parallel group `group`."""
        return tuple(self.rank_of(g, group) for g in self.plan.gpus[name])

    def local_replicas(self, name, rank):
        """Indices of the replicas of `name` that `rank` runs."""
        group = self.group_of(rank)
        return tuple(r for r, g in enumerate(self.plan.gpus[name])
                     if self.rank_of(g, group) == rank)

    def holders(self, name):
        """Every rank that holds a copy of the layer's weights, over all data-parallel groups:
        the ranks whose gradients for it must be summed (spec §8, "Weight updates")."""
        return tuple(sorted({self.rank_of(g, d) for d in range(self.data_groups)
                             for g in self.plan.gpus[name]}))

    def group_ranks(self, group):
        """The ranks of data-parallel group `group`, in order."""
        return sorted({self.rank_of(g, group) for g in range(self.num_gpus)})

    def microbatch_slices(self, cases, group):
        """[start, stop) of each microbatch of data-parallel group `group`: part `group` of
        every microbatch of the whole minibatch, so that pass p over all groups sees exactly
        the cases one process would (spec §8 with W/G copies of the model group)."""
        out = []
        for index in range(self.plan.max_replicas):
            start, stop = self.plan.microbatch_bounds(cases, index)
            part = -(-(stop - start) // self.data_groups)
            out.append((min(start + group * part, stop), min(start + (group + 1) * part, stop)))
        return out

    def rank_sets(self):
        """Every rank set that holds a layer replicated over several ranks, in one global order
        (file order of first use), so that all ranks issue their collectives in the same order."""
        seen = []
        for name in self.plan.order:
            holders = self.holders(name)
            if len(holders) > 1 and holders not in seen:
                seen.append(holders)
        return seen

    def backward_roots(self, reads, rank):
        """{layer: the root whose backward call walks it} for every layer but the data layers
        (None for one that leads to no cost). `reads` maps each layer to the layers it reads,
        hidden ones included. The roots are the cost layers and the *cut layers*, whose outputs
        the pass schedule detaches for their consumers and which then run backward from that
        leaf's accumulated gradient: outputs read by layers with fewer replicas (spec §8: wide
        layers run backward once, with the gradient of every pass) or by another rank.

        Backward then runs from several roots (costs, cut layers) at different steps, so a
        layer whose consumers lead to more than one root becomes a root too: every part of the
        graph is walked by exactly one backward call."""
        plan, group = self.plan, self.group_of(rank)
        consumers = {name: [u for u in plan.order if name in reads[u]] for name in plan.order}

        def rank_of(name, replica):
            return self.rank_of(plan.gpus[name][replica], group)

        cuts = set()
        for name in plan.order:
            users = consumers[name]
            narrowing = any(plan.replicas(u) < plan.replicas(name) for u in users)
            remote = any(rank_of(name, plan.feeding_replica(u, name, r, p)) != rank_of(u, r)
                         for u in users for p in range(plan.num_passes)
                         if plan.runs_forward(u, p) for r in range(plan.replicas(u)))
            if not plan.nodes[name].is_data and (narrowing or remote):
                cuts.add(name)
        roots = {}
        for name in reversed(plan.order):
            node = plan.nodes[name]
            if node.is_cost or name in cuts:
                roots[name] = {name}
                continue
            roots[name] = set().union(*(roots[u] for u in consumers[name]))
            if len(roots[name]) > 1 and not node.is_data:
                roots[name] = {name}
        return {name: next(iter(roots[name]), None) for name in plan.order
                if not plan.nodes[name].is_data}

    def cut_layers(self, reads, rank):
        """The layers other than costs that are roots of their own (`backward_roots`)."""
        return {name for name, root in self.backward_roots(reads, rank).items()
                if root == name and not self.plan.nodes[name].is_cost}

    def data_needs(self, reads):
        """{data layer: {rank: indices of the microbatches its layers read}}, all groups."""
        plan, needs = self.plan, {}
        for name in plan.order:
            for inp in reads[name]:
                if not plan.nodes[inp].is_data:
                    continue
                for group in range(self.data_groups):
                    for r, gpu in enumerate(plan.gpus[name]):
                        indices = needs.setdefault(inp, {}).setdefault(
                            self.rank_of(gpu, group), set())
                        indices.update(plan.data_microbatch(inp, r, p)
                                       for p in range(plan.num_passes)
                                       if plan.runs_forward(name, p))
        return needs

    def describe(self):
        """One line per layer: its replicas' GPU indices and the ranks that run them."""
        lines = []
        for name in self.plan.order:
            groups = [", ".join(str(r) for r in self.replica_ranks(name, d))
                      for d in range(self.data_groups)]
            lines.append(f"Layer '{name}': {self.plan.replicas(name)} replica(s) on GPUs "
                         f"{listed(self.plan.gpus[name])} -> ranks {' | '.join(groups)}")
        return lines


def listed(values):
    return ", ".join(str(v) for v in values)
