"""The backward of one pass of the pass schedule, in two parts: what depends on what
(`needs`), and the order we pick (`rounds`).

Backward runs from *roots* (costs and cut layers: placement.backward_roots), one call per root,
on the rank that holds it. A root may run once its gradient is complete: every root of its rank
that reads rows of it has run, and every gradient that other ranks return for it has come in.
A rank returns the gradient of rows it received once every root of its own that reads them has
run. Every rank of a model group works the rounds out for all of them, so each return is
posted at the same round on both ends.
"""

from dataclasses import dataclass

from .steps import Round


@dataclass(frozen=True)
class Needs:
    """What depends on what on one pass, for every rank of the model group.

    roots: {rank: the roots it runs backward from on this pass, last layer first}
    reads: {rank: {root: the leaves that root's backward reaches directly}}, a leaf being
        (cut layer, None) for the rank's own output of it, (layer, replica) for rows received
    reaches: {rank: {root: the leaves it reaches, also through the rank's own cut layers}}
    returns: the transfers whose gradient goes back on this pass
    """

    roots: dict
    reads: dict
    reaches: dict
    returns: tuple

    def complete(self, rank, leaf, done):
        """Whether every root of `rank` that reads `leaf` has run (`done`: (rank, root))."""
        return all((rank, root) in done for root in self.roots[rank]
                   if leaf in self.reads[rank][root])


def needs(program, pass_idx):
    """The Needs of pass `pass_idx` of a RankProgram's model group."""
    plan = program.plan
    roots, reads = {}, {}
    for rank in program.ranks:
        roots[rank] = [name for name in reversed(plan.order)
                       if program.roots.get(name) == name and program.local(name, rank)
                       and plan.runs_backward(name, pass_idx)]
        reads[rank] = {root: set() for root in roots[rank]}
        for name in plan.order:
            mine = () if program.is_data(name) else program.local(name, rank)
            if not mine or program.roots[name] not in reads[rank] or \
                    not plan.runs_backward(name, pass_idx):
                continue
            forward_pass = pass_idx - plan.active_pass_period[name] + 1
            for inp in program.reads[name]:
                if inp not in program.cuts:
                    continue
                for s in program.sources(name, inp, mine, forward_pass):
                    leaf = (inp, None) if program.rank_of(inp, s) == rank else (inp, s)
                    reads[rank][program.roots[name]].add(leaf)
    reaches = {rank: {root: _reached(reads[rank], root) for root in roots[rank]}
               for rank in roots}
    returns = tuple(t for t in program.transfers if t.return_pass == pass_idx)
    return Needs(roots, reads, reaches, returns)


def _reached(reads, root):
    """The leaves the gradient of `root` flows to, through the rank's own cut layers."""
    found, todo = set(), [root]
    while todo:
        for leaf in reads[todo.pop()] - found:
            found.add(leaf)
            if leaf[1] is None and leaf[0] in reads:
                todo.append(leaf[0])
    return found


def rounds(needs, rank, pass_idx):
    """`rank`'s Rounds: each sends every gradient return that is complete, then runs every root
    whose gradient is complete, so each rank sends a gradient as soon as it exists and runs a
    root as soon as it can: no rank waits for more of another's backward than the data require.

    A rank that still owes another rank gradients runs only the roots they come from, and the
    rest once it owes nothing (or nothing else can run anywhere). In the hybrid net, the fc
    layers' gradient for the other rank's convs would otherwise wait for this rank's conv
    backward, and the two conv backwards would take turns instead of running side by side."""
    returns, done, picked = list(needs.returns), set(), []
    while returns or any((r, root) not in done for r in needs.roots for root in needs.roots[r]):
        now = [t for t in returns if needs.complete(t.dst, (t.layer, t.replica), done)]
        returns = [t for t in returns if t not in now]
        ready = {r: [root for root in needs.roots[r] if (r, root) not in done
                     and needs.complete(r, (root, None), done)
                     and not any(t.layer == root and t.src == r for t in returns)]
                 for r in needs.roots}
        if not now and not any(ready.values()):
            raise RuntimeError(f"internal error: the backward of pass {pass_idx} is stuck")
        owing = {r: [(t.layer, t.replica) for t in returns if t.dst == r] for r in needs.roots}
        first = {r: [root for root in ready[r] if needs.reaches[r][root].intersection(owing[r])]
                 if owing[r] else ready[r] for r in needs.roots}
        if now or any(first.values()):
            ready = first
        done.update((r, root) for r in ready for root in ready[r])
        mine = Round(tuple(t for t in now if rank in (t.src, t.dst)), tuple(ready[rank]))
        if mine.returns or mine.roots:
            picked.append(mine)
    return picked
