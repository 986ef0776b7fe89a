"""A rank's program (program.RankProgram) for one minibatch size: every row count and slice
worked out, as the typed steps of steps.py that PassSchedule runs. Built on the first
minibatch of that size and kept; a minibatch then only walks it.
"""

from . import sharding
from .steps import (BackwardRound, Joined, KeepRows, Pieces, Post, ReceiveRows, Received, Rows,
                    RunSegment, SegmentOutput, SendOutputs, SendRows, Whole)


def call_key(segment):
    """What a segment's function depends on: segments of different passes that run the same
    layers the same way share it (and its compiled entries), wherever their rows come from."""
    return segment.layers, segment.args, segment.outputs


class MinibatchProgram:
    """data_moves: the data exchange at the start of a minibatch; forward[p], backward[p]: the
    steps of pass p. `calls` maps call_key(segment) to the function that runs it."""

    def __init__(self, program, calls, cases):
        self.program, self.calls = program, calls
        placement = program.placement
        self.shard_start, shard_stop = sharding.shard_bounds(cases, program.rank,
                                                             placement.world_size)
        self.shard = shard_stop - self.shard_start
        self.cases = cases
        self.slices = [placement.microbatch_slices(cases, g)
                       for g in range(placement.data_groups)]
        self._row_ranges = {}     # output_rows, by (layer, pass)
        self.data_moves = self._data_moves()
        self.forward = [[self._step(step, p) for step in steps]
                        for p, steps in enumerate(program.forward)]
        self.backward = [[BackwardRound(self._with_rows(r.returns), r.roots) for r in rounds]
                         for rounds in program.backward]

    def rows(self, name, replica, pass_idx):
        return self.program.rows(self.slices[self.program.group], name, replica, pass_idx)

    def _with_rows(self, transfers):
        return tuple((t, self.rows(t.layer, t.replica, t.computed_pass)) for t in transfers)

    def output_rows(self, name, pass_idx):
        """{replica: (start, stop)} of this rank's replicas of `name`, computed on `pass_idx`,
        in their batched output."""
        key = (name, pass_idx)
        if key not in self._row_ranges:
            rows, start = {}, 0
            for replica in self.program.local(name):
                count = self.rows(name, replica, pass_idx)
                rows[replica] = (start, start + count)
                start += count
            self._row_ranges[key] = rows
        return self._row_ranges[key]

    def _step(self, step, pass_idx):
        if isinstance(step, Post):
            return SendOutputs(self._with_rows(step.transfers))
        nodes = self.program.plan.nodes
        outputs = tuple(SegmentOutput(name, None if nodes[name].is_cost else
                                      self.output_rows(name, pass_idx),
                                      name in self.program.cuts)
                        for name in (step.layers[index] for index in step.outputs))
        return RunSegment(self.calls[call_key(step)],
                          tuple(self._read(read, pass_idx) for read in step.reads), outputs)

    def _read(self, read, pass_idx):
        """How to build what a segment reads (steps.py)."""
        program, name = self.program, read.layer
        if program.is_data(name):
            bounds = [self.slices[program.group][i] for i in read.sources]
            start, stop = bounds[0][0], bounds[-1][1]
            contiguous = all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
            if contiguous and self.shard_start <= start and \
                    stop <= self.shard_start + self.shard:
                return Rows(name, start - self.shard_start, stop - self.shard_start)
            return Pieces(name, read.sources)
        computed = pass_idx - pass_idx % program.plan.active_pass_period[name]
        if read.sources == program.local(name):
            return Whole(name)
        rows = self.output_rows(name, computed)
        return Joined(tuple(Rows(name, *rows[s]) if s in rows else Received(name, s)
                            for s in read.sources))

    def _data_moves(self):
        """The data exchange at the start of a minibatch, in the order every rank walks it:
        rows of this rank's shard sent to the ranks that read them, and the pieces of each
        (data layer, microbatch) this rank reads, kept from its shard or received."""
        program, moves = self.program, []
        placement, me = program.placement, program.rank
        for name, needs in program.data_needs.items():
            for rank in sorted(needs):
                for index in sorted(needs[rank]):
                    start, stop = self.slices[placement.group_of(rank)][index]
                    for owner, lo, hi in sharding.owners(start, stop, self.cases,
                                                         placement.world_size):
                        if owner == me and rank == me:
                            moves.append(KeepRows(name, index, lo - self.shard_start,
                                                  hi - self.shard_start))
                        elif owner == me:
                            moves.append(SendRows(name, lo - self.shard_start,
                                                  hi - self.shard_start, rank))
                        elif rank == me:
                            moves.append(ReceiveRows(name, index, hi - lo, owner))
        return moves
