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
  * placement (placement.py): which process runs each replica, for a world size;
  * one rank's program (program.py): the transfers between ranks, the segments of layers it
    runs as one call, and the order of its sends, receives and backward roots on each pass.
"""

from dataclasses import dataclass

from ..errors import ConfigError
from .placement import Placement, listed as _listed


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
