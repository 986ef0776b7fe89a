"""parallel/program.py and backward.py: what each rank of the shipped nets does on each pass,
the same on both ends of every transfer."""

import pytest
from net_helpers import IMAGENET, TINY, shipped

from distconvnet.parallel.plan import Plan, nodes_of
from distconvnet.parallel.program import RankProgram
from distconvnet.parallel.steps import Post, Segment


def programs(name, world_size, ctx=TINY):
    model = shipped(name, ctx)
    plan = Plan(nodes_of(model))
    placement = plan.placement(world_size)
    return plan, [RankProgram(placement, model.reads(), rank) for rank in range(world_size)]


def test_the_two_towers_run_side_by_side():
    """imagenet-2gpu-model on 2 ranks: each tower's convs run as one segment that ends where
    the other rank reads it; its output goes there right after, and the rank that only
    receives it posts the receive ahead of its own tower. Backward, both ranks run their own
    towers' roots in the same round, right after exchanging the gradients they read."""
    _, (zero, one) = programs("imagenet-2gpu-model", 2, IMAGENET)
    steps = [[(type(s).__name__, s.layers[-1] if isinstance(s, Segment) else
               [t.layer for t in s.transfers]) for s in p.forward[0][:3]] for p in (zero, one)]
    assert steps == [[("Segment", "pool2a"), ("Post", ["pool2a"]), ("Post", ["pool2b"])],
                     [("Post", ["pool2a"]), ("Segment", "pool2b"), ("Post", ["pool2b"])]]
    assert zero.forward[0][0].layers[0] == "conv1a" and len(zero.forward[0][0].layers) == 9

    def roots_after(program, layers):
        return [r.roots for r in program.backward[0]
                if sorted(t.layer for t in r.returns) == layers]

    assert roots_after(zero, ["pool3a_neuron", "pool3b_neuron"]) == [("pool3a_neuron",)]
    assert roots_after(one, ["pool3a_neuron", "pool3b_neuron"]) == [("pool3b_neuron",)]
    assert roots_after(zero, ["pool2a", "pool2b"]) == [("pool2a",)]
    assert roots_after(one, ["pool2a", "pool2b"]) == [("pool2b",)]


@pytest.mark.parametrize("name, world_size", [("imagenet-2gpu-hybrid", 2),
                                              ("imagenet-4gpu-data-model", 4)])
def test_the_hybrids_conv_backwards_run_side_by_side(name, world_size):
    """Last pass of a hybrid net: a rank sends the fc gradient that another rank's convs wait
    for before it runs its own conv backward (the pool3_neuron root), so the conv backwards
    run side by side instead of each waiting for the previous rank's."""
    plan, ranks = programs(name, world_size, IMAGENET)
    for program in ranks:
        rounds = program.backward[plan.num_passes - 1]
        conv = [i for i, r in enumerate(rounds) if "pool3_neuron" in r.roots]
        exchanged = [i for i, r in enumerate(rounds)
                     if any(t.layer == "pool3_neuron" for t in r.returns)]
        assert len(conv) == 1 and exchanged and max(exchanged) == conv[0]


def exchanges(program, peer):
    """What `program` moves to or from rank `peer`, step by step: (pass, forward?, transfers)."""
    steps = []
    for p in range(len(program.forward)):
        for forward, batches in ((True, [s.transfers for s in program.forward[p]
                                         if isinstance(s, Post)]),
                                 (False, [r.returns for r in program.backward[p]])):
            for transfers in batches:
                mine = [t for t in transfers if peer in (t.src, t.dst)]
                if mine:
                    steps.append((p, forward, mine))
    return steps


@pytest.mark.parametrize("name, world_size", [
    ("test-2gpu-model", 2), ("test-2gpu-model", 4), ("test-2gpu-hybrid", 2),
    ("test-2gpu-hybrid", 4), ("test-4gpu-data-model", 2), ("test-4gpu-data-model", 4),
    ("test-4gpu-data-model", 8)])
def test_both_ends_of_every_transfer_post_it_at_the_same_step(name, world_size):
    """The walk every rank derives on its own: for each pair of ranks, the same transfers in
    the same steps and order on both sides, each forward once and back once; and each rank's
    segments run exactly the layers it holds on each pass, in file order, each cut layer
    last in its segment."""
    plan, ranks = programs(name, world_size)
    for a, program in enumerate(ranks):
        for b in range(world_size):
            if a != b:
                assert exchanges(program, b) == exchanges(ranks[b], a)
        sent = [t for steps in program.forward for s in steps if isinstance(s, Post)
                for t in s.transfers]
        returned = [t for rounds in program.backward for r in rounds for t in r.returns]
        assert len(sent) == len(set(sent)) == len(returned) and set(sent) == set(returned)
        assert set(sent) == {t for t in program.transfers if a in (t.src, t.dst)}
        for p in range(plan.num_passes):
            segments = [s for s in program.forward[p] if isinstance(s, Segment)]
            assert [n for s in segments for n in s.layers] == [
                n for n in plan.order if not plan.nodes[n].is_data and plan.runs_forward(n, p)
                and program.local(n)]
            assert all(n == s.layers[-1] for s in segments for n in s.layers
                       if n in program.cuts)
