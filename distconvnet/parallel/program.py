"""What one rank does on each pass of a minibatch (spec §8), worked out once from the plan,
as typed steps (steps.py) that can be printed: `summary --world-size N --program`.
"""

from . import backward
from .placement import listed
from .steps import Post, Read, Segment, Transfer


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
        self.backward = [backward.rounds(backward.needs(self, p), rank, p)
                         for p in range(self.plan.num_passes)]
        self.data_needs = placement.data_needs(reads)

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

    # -- the program as text ---------------------------------------------------------------------
    def describe(self):
        """This rank's program, a few lines per pass: `x[r]` is replica r of layer x's output,
        `data[m]` microbatch m of a data layer."""
        lines = [f"Rank {self.rank}: GPU index(es) {listed(self.placement.gpus_of(self.rank))} "
                 f"of model group {self.group} (ranks {listed(self.ranks)})"]
        fetched = [f"{name}[{listed(sorted(needs[self.rank]))}]"
                   for name, needs in self.data_needs.items() if self.rank in needs]
        lines.append(f"  each minibatch: fetch {', '.join(fetched) or 'no data'}")
        shared = [holders for holders in self.placement.rank_sets() if self.rank in holders]
        update = "; ".join(f"sum the due gradients of the layers ranks {listed(holders)} hold"
                           for holders in shared)
        for p in range(self.plan.num_passes):
            lines.append(f"  pass {p}:")
            lines += [f"    {self._step_text(step)}" for step in self.forward[p]]
            lines += [f"    {self._round_text(step)}" for step in self.backward[p]]
            lines.append(f"    update: {update + '; ' if update else ''}step the optimizer")
        return lines

    def _step_text(self, step):
        if isinstance(step, Post):
            return self._moves_text(step.transfers, "")
        layers = step.layers[0] if len(step.layers) == 1 else \
            f"{step.layers[0]} … {step.layers[-1]} ({len(step.layers)} layers)"
        reads = ", ".join(f"{read.layer}[{listed(read.sources)}]" for read in step.reads)
        return f"forward {layers} on {reads}"

    def _round_text(self, step):
        """A round's returns go back against their transfers: the receiver of the rows sends
        their gradient."""
        parts = [self._moves_text(step.returns, "the gradient of ", back=True)] \
            if step.returns else []
        if step.roots:
            parts.append(f"backward from {', '.join(step.roots)}")
        return "; ".join(parts)

    def _moves_text(self, transfers, what, back=False):
        """"send a[0], b[0] to rank 1; receive c[1] from rank 1", in order of first mention."""
        moves = {}
        for t in transfers:
            sender, receiver = (t.dst, t.src) if back else (t.src, t.dst)
            key = ("send", "to", receiver) if sender == self.rank else ("receive", "from", sender)
            moves.setdefault(key, []).append(f"{t.layer}[{t.replica}]")
        return "; ".join(f"{verb} {what}{', '.join(items)} {word} rank {peer}"
                         for (verb, word, peer), items in moves.items())
