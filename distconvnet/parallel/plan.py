"""What `gpu=` means for a net and a world size (spec §8), as pure arithmetic: no torch here.

From the layers' replica lists (inherited from the first input at parse time, spec §4.2) this
module derives and validates, once:

  * replicas: the GPU indices of each layer; data layers take their count from their consumers;
  * the parser's rules of spec §8, each failing with file:line, the layer and the arithmetic;
  * passes: numPasses = maxReplicas / minReplicas; a minibatch is cut into maxReplicas
    microbatches of ceil(mini / maxReplicas) cases;
  * schedule: a layer with R replicas has activePassPeriod R / minReplicas, runs forward on the
    passes p with p % period == 0 and backward on the last pass of its period, and its replica r
    reads input replica r + R·((p / period) % (inputReplicas / R));
  * placement: GPU indices 0..G−1 are the ranks of one *model group*; W processes with W a
    multiple of G form W/G data-parallel copies of it; with W < G several indices share one
    process (and device), which changes where things run but not the arithmetic;
  * one rank's program (RankProgram): the transfers between ranks, the segments of layers it
    runs as one call, and the order of its sends, receives and backward roots on each pass.
"""

from dataclasses import dataclass

from ..errors import ConfigError, OptionError


@dataclass(frozen=True)
class LayerNode:
    """What the plan needs to know about one layer of the net, in file order."""

    name: str
    type_name: str
    gpus: tuple          # the cfg's replica list; () for data layers, which have none of their own
    inputs: tuple        # names of the input layers
    is_data: bool = False
    is_cost: bool = False
    section: object = None   # the layer's cfg section, for file:line in errors (None in tests)

    def error(self, message, key=None):
        if self.section is not None:
            return self.section.error(message, key)
        return ConfigError(message, layer=self.name)


def nodes_of(model):
    """The LayerNodes of a built ConvNet (model.layers in file order)."""
    return [LayerNode(name=layer.name, type_name=layer.type_name,
                      gpus=tuple(layer.gpus or ()), inputs=tuple(layer.input_names),
                      is_data=layer.is_data, is_cost=layer.is_cost, section=layer.section)
            for layer in model.layers.values()]


class Plan:
    """Replicas, passes and schedule of one net (spec §8); build with `Plan(nodes_of(model))`."""

    def __init__(self, nodes):
        self.nodes = {node.name: node for node in nodes}
        self.order = [node.name for node in nodes]
        self.consumers = {name: [] for name in self.order}
        for node in nodes:
            for inp in node.inputs:
                self.consumers[inp].append(node.name)
        self.gpus = {}
        for node in nodes:
            self.gpus[node.name] = self._replica_list(node)
        self._check_rules()
        counts = [len(g) for g in self.gpus.values()]
        self.min_replicas, self.max_replicas = min(counts), max(counts)
        self.num_passes = self.max_replicas // self.min_replicas
        self.active_pass_period = {name: len(self.gpus[name]) // self.min_replicas
                                   for name in self.order}
        self._check_periods()
        self.num_gpus = 1 + max(g for gpus in self.gpus.values() for g in gpus)

    # -- replicas and the parser's rules (spec §8) ------------------------------------------
    def _replica_list(self, node):
        if not node.is_data:
            if len(set(node.gpus)) != len(node.gpus):
                raise node.error(f"gpu={','.join(map(str, node.gpus))}: the replicas of a layer "
                                 f"must run on distinct GPUs", "gpu")
            return tuple(node.gpus)
        # A data layer's replicas are those of its consumers (all equal, checked below); it
        # feeds replica r of each consumer, so it lives where they do.
        users = self.consumers[node.name]
        return tuple(self.nodes[users[0]].gpus) if users else (0,)

    def _check_rules(self):
        for name in self.order:
            node = self.nodes[name]
            self._check_consumers(node)
            if node.is_data:
                continue
            self._check_inputs(node)
            if node.is_cost:
                self._check_cost(node)
            if node.type_name == "pass":
                self._check_pass(node)

    def _check_consumers(self, node):
        users = self.consumers[node.name]
        counts = {len(self.gpus[u]) for u in users}
        if len(counts) > 1:
            listed = ", ".join(f"'{u}' has {len(self.gpus[u])}" for u in users)
            raise node.error(f"all layers that take this layer as input must have equal numbers "
                             f"of replicas ({listed})")

    def _check_inputs(self, node):
        mine = len(self.gpus[node.name])
        counts = {inp: len(self.gpus[inp]) for inp in node.inputs}
        if len(set(counts.values())) > 1:
            listed = ", ".join(f"'{i}' has {n}" for i, n in counts.items())
            raise node.error(f"all input layers must have equal numbers of replicas ({listed})",
                             "inputs")
        for inp, theirs in counts.items():
            if theirs % mine:
                raise node.error(f"its {mine} replicas must divide the replicas of every input, "
                                 f"but input '{inp}' has {theirs} ({theirs} % {mine} = "
                                 f"{theirs % mine})", "gpu")

    def _check_cost(self, node):
        # Cost layers cannot be split across GPUs (spec §8, MultiGPU wiki): the cost runs where
        # its predictions are, replica for replica, never on activations copied in.
        mine = self.gpus[node.name]
        for inp in node.inputs:
            if not self.nodes[inp].is_data and self.gpus[inp] != mine:
                raise node.error(f"a cost layer cannot be split across GPUs: it runs on GPUs "
                                 f"{_listed(mine)}, its input '{inp}' on GPUs "
                                 f"{_listed(self.gpus[inp])}", "gpu")

    def _check_pass(self, node):
        # spec §4.3: two pass layers sharing an input must not run on overlapping GPUs (the
        # original's pass layers alias their inputs' memory on each GPU).
        mine = set(self.gpus[node.name])
        for other_name in self.order[:self.order.index(node.name)]:
            other = self.nodes[other_name]
            if other.type_name != "pass":
                continue
            shared = [i for i in node.inputs if i in other.inputs]
            overlap = mine & set(self.gpus[other_name])
            if shared and overlap:
                raise node.error(f"pass layers '{other_name}' and '{node.name}' both take "
                                 f"'{shared[0]}' as input and both run on GPU(s) "
                                 f"{_listed(sorted(overlap))}", "gpu")

    def _check_periods(self):
        for name in self.order:
            if self.nodes[name].is_data:
                continue               # a data layer's count is its consumers'; blame them
            period = self.active_pass_period[name]
            count = len(self.gpus[name])
            if count % self.min_replicas or self.num_passes % period:
                raise self.nodes[name].error(
                    f"{count} replicas do not fit the net's passes: activePassPeriod = "
                    f"{count}/{self.min_replicas} (replicas / minReplicas) must be a whole "
                    f"number dividing numPasses = {self.max_replicas}/{self.min_replicas}", "gpu")

    # -- passes and microbatches -------------------------------------------------------------
    def replicas(self, name):
        return len(self.gpus[name])

    def microbatch_size(self, cases):
        """ceil(cases / maxReplicas): the original cuts each minibatch into maxReplicas parts."""
        return -(-cases // self.max_replicas)

    def microbatch_bounds(self, cases, index):
        """[start, end) of microbatch `index` of a minibatch of `cases` cases (maybe empty)."""
        size = self.microbatch_size(cases)
        return min(index * size, cases), min((index + 1) * size, cases)

    def runs_forward(self, name, pass_idx):
        return pass_idx % self.active_pass_period[name] == 0

    def runs_backward(self, name, pass_idx):
        """On the last pass of the layer's period (Layer::getBwdActiveInputReplicaIdx)."""
        return (pass_idx + 1) % self.active_pass_period[name] == 0

    def feeding_replica(self, name, inp, replica, pass_idx):
        """The replica of input `inp` that replica `replica` of `name` reads on this pass: the
        original connects replica r to input replicas r, r + R, r + 2R, … (ConvNet::
        connectChildren) and walks them one active pass after the other."""
        mine = self.replicas(name)
        step = (pass_idx // self.active_pass_period[name]) % (self.replicas(inp) // mine)
        return replica + mine * step

    def data_microbatch(self, name, replica, pass_idx):
        """The microbatch that replica `replica` of data layer `name` delivers on this pass
        (DataCopyThread::run): data replica d walks microbatches d·k … d·k + k − 1, where
        k = maxReplicas / replicas. A labels layer read by a 1-replica cost gives microbatch p
        on pass p."""
        per_replica = self.max_replicas // self.replicas(name)
        step = (pass_idx // self.active_pass_period[name]) % per_replica
        return replica * per_replica + step

    def effective_update_period(self, name, update_period):
        """spec §8: max(updatePeriod, activePassPeriod), which must be a multiple of the latter."""
        active = self.active_pass_period[name]
        period = max(update_period, active)
        if period % active:
            raise self.nodes[name].error(
                f"updatePeriod={update_period} must be a multiple of the layer's "
                f"activePassPeriod {active} ({self.replicas(name)} replicas / "
                f"{self.min_replicas})", "gpu")
        return period

    @property
    def is_data_parallel(self):
        """Every layer on the same R GPUs, one pass: plain data parallelism (spec §8)."""
        return len(set(self.gpus.values())) == 1

    # -- placement ----------------------------------------------------------------------------
    def placement(self, world_size):
        return Placement(self, world_size)


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
                         f"{_listed(self.plan.gpus[name])} -> ranks {' | '.join(groups)}")
        return lines


@dataclass(frozen=True)
class Transfer:
    """Rows of one replica's output that a layer on another rank reads: sent right after the
    pass that computes them runs the layer; their gradient goes back on `return_pass`."""

    layer: str
    replica: int
    src: int
    dst: int
    computed_pass: int
    return_pass: int


@dataclass(frozen=True)
class Read:
    """What a segment reads from outside, batched in this order: replicas of a layer's output
    (this rank's own or received), or microbatches of a data layer."""

    layer: str
    sources: tuple      # replicas of `layer`; for a data layer, microbatch indices


@dataclass(frozen=True)
class Segment:
    """Consecutive layers that one rank runs on a pass, all walked by one backward root, with
    no transfer to wait for between them: what runs as one call (one compiled function).
    A cut layer or cost, being a root, always ends its segment."""

    layers: tuple       # names, in file order
    reads: tuple        # Read of each outside input, in order of first use
    args: tuple         # per layer, where each of its inputs is: index into reads + layers
    outputs: tuple      # indices of the layers whose outputs are used after the segment


@dataclass(frozen=True)
class Post:
    """The transfers of one layer's output on one pass that concern this rank (as sender or
    receiver), all posted at once right after the layer runs."""

    transfers: tuple


@dataclass(frozen=True)
class Round:
    """One step of a pass's backward: the gradient returns that concern this rank, then the
    roots whose backward this rank runs next (one call; their graphs are disjoint)."""

    returns: tuple
    roots: tuple


class RankProgram:
    """What one rank does on each pass of a minibatch, worked out once from the plan.

    Every rank of a model group walks the net in file order and derives the same transfers and
    the same steps, so each point-to-point transfer is posted at the same step on both ends.

      * forward[p]: Segment and Post steps. A layer's output goes to the ranks that read it
        right after the layer runs (for every pass that reads it), so that a receiver never
        waits for more of the sender's work than the rows it needs; a rank that only receives
        posts before the segment it is in the middle of (nothing there is waited for, and the
        order of the posts stays that of the walk).
      * backward[p]: Rounds, worked out for every rank of the group together. A round sends
        every gradient return that is complete (all the receiver's roots that read the rows
        have run), then runs every root whose gradient is complete (the roots on its rank that
        read it have run, and every return for it has come in). So each rank sends a gradient
        as soon as it exists and runs a root as soon as it can: no rank waits for more of
        another's backward than the data require.
    """

    def __init__(self, placement, reads, rank):
        self.placement, self.plan, self.reads, self.rank = placement, placement.plan, reads, rank
        self.group = placement.group_of(rank)
        self.ranks = placement.group_ranks(self.group)
        self.roots = placement.backward_roots(reads, rank)
        self.cuts = placement.cut_layers(reads, rank)
        self.consumers = {name: [u for u in self.plan.order if name in reads[u]]
                          for name in self.plan.order}
        self.transfers = self._transfers()
        self.forward = [self._forward(p) for p in range(self.plan.num_passes)]
        self.backward = [self._backward(p) for p in range(self.plan.num_passes)]

    def rank_of(self, name, replica):
        return self.placement.rank_of(self.plan.gpus[name][replica], self.group)

    def local(self, name, rank=None):
        return self.placement.local_replicas(name, self.rank if rank is None else rank)

    def is_data(self, name):
        return self.plan.nodes[name].is_data

    def sources(self, name, inp, replicas, pass_idx):
        """What replicas `replicas` of `name` read of input `inp` on this pass: replicas of
        its output, or for a data layer the microbatches its replicas deliver."""
        plan = self.plan
        feeding = [plan.feeding_replica(name, inp, r, pass_idx) for r in replicas]
        if self.is_data(inp):
            return tuple(plan.data_microbatch(inp, s, pass_idx) for s in feeding)
        return tuple(feeding)

    def rows(self, slices, name, replica, pass_idx):
        """How many cases replica `replica` of `name` computes on pass `pass_idx`, given this
        group's microbatch `slices`: arithmetic every rank can do, so that a receiver sizes
        its buffer without a header."""
        plan = self.plan
        if self.is_data(name):
            start, stop = slices[plan.data_microbatch(name, replica, pass_idx)]
            return stop - start
        inp = self.reads[name][0]
        computed = pass_idx - pass_idx % plan.active_pass_period[inp]
        return self.rows(slices, inp, plan.feeding_replica(name, inp, replica, pass_idx),
                         computed)

    def _transfers(self):
        """Every transfer of this rank's group, in the order the walk first needs them."""
        plan, found = self.plan, {}
        for p in range(plan.num_passes):
            for name in plan.order:
                if self.is_data(name) or not plan.runs_forward(name, p):
                    continue
                for inp in self.reads[name]:
                    if self.is_data(inp):
                        continue
                    computed = p - p % plan.active_pass_period[inp]
                    for replica in range(plan.replicas(name)):
                        source = plan.feeding_replica(name, inp, replica, p)
                        src, dst = self.rank_of(inp, source), self.rank_of(name, replica)
                        key = (inp, source, dst, computed)
                        if src != dst and key not in found:
                            found[key] = Transfer(inp, source, src, dst, computed,
                                                  p + plan.active_pass_period[name] - 1)
        return list(found.values())

    def _forward(self, pass_idx):
        plan, steps, run = self.plan, [], []
        for name in plan.order:
            if self.is_data(name) or not plan.runs_forward(name, pass_idx):
                continue
            mine = self.local(name)
            if mine:
                received = any(self.rank_of(inp, s) != self.rank for inp in self.reads[name]
                               if not self.is_data(inp)
                               for s in self.sources(name, inp, mine, pass_idx))
                if run and (received or self.roots[run[-1]] != self.roots[name]):
                    steps.append(self._segment(run, pass_idx))
                    run = []
                run.append(name)
                if self.roots[name] == name:
                    steps.append(self._segment(run, pass_idx))
                    run = []
            posts = tuple(t for t in self.transfers if t.layer == name and
                          t.computed_pass == pass_idx and self.rank in (t.src, t.dst))
            if posts:
                steps.append(Post(posts))
        if run:
            steps.append(self._segment(run, pass_idx))
        return steps

    def _segment(self, layers, pass_idx):
        order = {name: i for i, name in enumerate(layers)}
        inputs = [[(inp, Read(inp, self.sources(name, inp, self.local(name), pass_idx)))
                   for inp in self.reads[name]] for name in layers]
        reads = list(dict.fromkeys(read for pairs in inputs for inp, read in pairs
                                   if inp not in order))
        args = tuple(tuple(len(reads) + order[inp] if inp in order else reads.index(read)
                           for inp, read in pairs) for pairs in inputs)
        outputs = tuple(i for i, name in enumerate(layers)
                        if self.roots[name] == name or
                        any(u not in order for u in self.consumers[name]))
        return Segment(tuple(layers), tuple(reads), args, outputs)

    def _backward(self, pass_idx):
        plan = self.plan
        # Per rank of the group: its roots on this pass, and the leaves each one's backward
        # reaches: (cut layer, None) for the rank's own output of it, (layer, replica) for
        # rows it received.
        roots, reads = {}, {}
        for rank in self.ranks:
            roots[rank] = [name for name in reversed(plan.order)
                           if self.roots.get(name) == name and self.local(name, rank)
                           and plan.runs_backward(name, pass_idx)]
            reads[rank] = {root: set() for root in roots[rank]}
            for name in plan.order:
                mine = () if self.is_data(name) else self.local(name, rank)
                if not mine or self.roots[name] not in reads[rank] or \
                        not plan.runs_backward(name, pass_idx):
                    continue
                forward_pass = pass_idx - plan.active_pass_period[name] + 1
                for inp in self.reads[name]:
                    if inp not in self.cuts:
                        continue
                    for s in self.sources(name, inp, mine, forward_pass):
                        leaf = (inp, None) if self.rank_of(inp, s) == rank else (inp, s)
                        reads[rank][self.roots[name]].add(leaf)
        returns = [t for t in self.transfers if t.return_pass == pass_idx]
        done, rounds = set(), []

        def complete(rank, leaf):
            return all((rank, root) in done for root in roots[rank]
                       if leaf in reads[rank][root])

        def reached(rank, root):
            """The leaves the gradient of `root` flows to, through the rank's own cut layers."""
            found, todo = set(), [root]
            while todo:
                for leaf in reads[rank][todo.pop()] - found:
                    found.add(leaf)
                    if leaf[1] is None and leaf[0] in reads[rank]:
                        todo.append(leaf[0])
            return found
        reaches = {rank: {root: reached(rank, root) for root in roots[rank]} for rank in roots}

        while returns or any((rank, root) not in done for rank in roots
                             for root in roots[rank]):
            now = [t for t in returns if complete(t.dst, (t.layer, t.replica))]
            returns = [t for t in returns if t not in now]
            ready = {rank: [root for root in roots[rank] if (rank, root) not in done
                            and complete(rank, (root, None))
                            and not any(t.layer == root and t.src == rank for t in returns)]
                     for rank in roots}
            if not now and not any(ready.values()):
                raise RuntimeError(f"internal error: the backward of pass {pass_idx} is stuck")
            # A rank that still owes another rank gradients runs only the roots they come
            # from, and the rest once it owes nothing (or nothing else can run anywhere). In
            # the hybrid net, the fc layers' gradient for the other rank's convs would
            # otherwise wait for this rank's conv backward, and the two conv backwards would
            # take turns instead of running side by side.
            owing = {rank: [(t.layer, t.replica) for t in returns if t.dst == rank]
                     for rank in roots}
            first = {rank: [root for root in ready[rank]
                            if reaches[rank][root].intersection(owing[rank])] if owing[rank]
                     else ready[rank] for rank in roots}
            if now or any(first.values()):
                ready = first
            done.update((rank, root) for rank in ready for root in ready[rank])
            mine = Round(tuple(t for t in now if self.rank in (t.src, t.dst)),
                         tuple(ready[self.rank]))
            if mine.returns or mine.roots:
                rounds.append(mine)
        return rounds


def _listed(values):
    return ", ".join(str(v) for v in values)
