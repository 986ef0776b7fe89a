"""A rank's program for the pass schedule (spec §8), as data: typed, frozen steps that the
program builders produce and PassSchedule runs with `match`.

Two levels:
  * what a rank does on each pass, whatever the minibatch's size (program.RankProgram):
    Segment and Post steps forward, Round steps backward, over Transfers and Reads;
  * the same with every row count worked out for one minibatch size (minibatch.py): each
    forward step a RunSegment or SendOutputs, each backward step a BackwardRound, what a
    segment reads Rows, Pieces, Whole or Joined, and the data exchange at the start of a
    minibatch SendRows, ReceiveRows and KeepRows moves.
"""

from dataclasses import dataclass


# -- what a rank does on each pass --------------------------------------------------------------

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


# -- the same for one minibatch size, rows worked out --------------------------------------------
# What a segment reads: Rows, Pieces, Whole, or Joined (of Rows and Received).

@dataclass(frozen=True)
class Rows:
    """Rows [start, stop) this rank holds: of its shard of a data layer (a view; for one
    process, the minibatch as it came), or of its output of another layer."""

    layer: str
    start: int
    stop: int


@dataclass(frozen=True)
class Pieces:
    layer: str              # a data layer
    microbatches: tuple     # gathered from the ranks' shards at the minibatch's start


@dataclass(frozen=True)
class Whole:
    """This rank's output of a layer, as it is."""

    layer: str


@dataclass(frozen=True)
class Received:
    layer: str
    replica: int            # whose rows another rank sent


@dataclass(frozen=True)
class Joined:
    parts: tuple            # Rows and Received, concatenated in this order


# The data exchange at the start of a minibatch: SendRows, ReceiveRows, KeepRows.

@dataclass(frozen=True)
class SendRows:
    """Rows [start, stop) of this rank's shard of a data layer, to `rank`."""

    layer: str
    start: int
    stop: int
    rank: int


@dataclass(frozen=True)
class ReceiveRows:
    layer: str
    microbatch: int
    rows: int               # of the microbatch, from `rank`
    rank: int


@dataclass(frozen=True)
class KeepRows:
    """Rows [start, stop) of this rank's own shard: its piece of `microbatch`."""

    layer: str
    microbatch: int
    start: int
    stop: int


# The steps of a pass: RunSegment and SendOutputs forward, BackwardRound backward.

@dataclass(frozen=True)
class SegmentOutput:
    """A layer whose output a segment hands on: `rows` {replica: (start, stop)} in its batched
    output (None for a cost, which yields (objective, values)), `is_cut` if its consumers read
    a detached leaf."""

    layer: str
    rows: object
    is_cut: bool


@dataclass(frozen=True)
class RunSegment:
    call: object        # the segment's function, compiled or not
    reads: tuple        # what each argument is (Rows, Pieces, Whole or Joined)
    outputs: tuple      # SegmentOutput


@dataclass(frozen=True)
class SendOutputs:
    moves: tuple        # a Post's transfers, each with its rows: ((Transfer, rows), ...)


@dataclass(frozen=True)
class BackwardRound:
    """A Round with each return's rows."""

    returns: tuple      # (Transfer, rows)
    roots: tuple
