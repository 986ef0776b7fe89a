"""The ranks that hold each layer of a pass-scheduled net: their process groups, the gradient
sums over them, and the weights shared from them (spec §8, "Weight updates").

Each process builds the whole net and keeps one Ccn2SGD over all of it, so checkpoints and
resumes see one complete optimizer; it trains only the layers it holds (`freeze_remote`), so its
copies of the others go stale while it trains: `share_weights` brings them up to date, weights
and momentum, before anything reads the whole net (a test, which also prints the weight
statistics and saves), never per batch.
"""

import torch
import torch.distributed as dist

from .p2p import flat_views


class Holders:

    def __init__(self, placement, rank):
        self.placement, self.rank = placement, rank
        self.distributed = placement.world_size > 1
        order = placement.plan.order
        self.local = {name: placement.local_replicas(name, rank) for name in order}
        self.holders = {name: placement.holders(name) for name in order}
        self.rank_sets = placement.rank_sets()
        self.groups = {}

    def create_process_groups(self):
        """The rank-set groups; every rank must call this, in the same order. Built by hand,
        not from a DeviceMesh: a layer may be held by any subset of a model group's ranks
        (gpu=0,1 of a 4-GPU net), which no mesh dimension names."""
        if not self.distributed:
            return
        world = tuple(range(self.placement.world_size))
        for holders in self.rank_sets:
            self.groups[holders] = None if holders == world else dist.new_group(list(holders))

    def freeze_remote(self, optimizer):
        """Leave the layers this rank does not hold to their holders. Call after building or
        refreshing the optimizer."""
        optimizer.freeze(name for name, replicas in self.local.items() if not replicas)

    @torch.no_grad()
    def sum_due_gradients(self, optimizer):
        """Sum, over the ranks holding each layer, the gradients of the matrices due for an
        update at the optimizer's next step (the original summed replica gradients before its
        sharded update): one all-reduce per rank set (and dtype), over a flat buffer whose views
        become the gradients."""
        if not self.distributed:
            return
        buckets = {}
        for layer, param, receivers in optimizer.matrices(due_next_step=True):
            holders = self.holders[layer]
            if len(holders) > 1 and self.local[layer]:
                buckets.setdefault(holders, {}).setdefault(param.dtype, []).extend(
                    [param, *receivers])
        for holders in self.rank_sets:
            for params in buckets.get(holders, {}).values():
                flat, views = flat_views(params)
                grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                torch._foreach_copy_(views, grads)
                dist.all_reduce(flat, group=self.groups[holders])
                for view, param in zip(views, params):
                    param.grad = view

    @torch.no_grad()
    def share_weights(self, optimizer):
        """Give every rank the current weights and momentum increments of every layer, from the
        first rank that holds it. One broadcast per owning rank (and dtype); layers every rank
        holds are equal already. Every rank must call this."""
        if not self.distributed:
            return
        buckets = {}
        for layer, param, receivers in optimizer.matrices():
            holders = self.holders[layer]
            if len(holders) < self.placement.world_size:
                buckets.setdefault((holders[0], param.dtype), []).extend(
                    [param, *receivers, optimizer.increment(param)])
        for (owner, _), tensors in buckets.items():
            flat, views = flat_views(tensors)
            if self.rank == owner:
                torch._foreach_copy_(views, tensors)
            dist.broadcast(flat, src=owner)
            if self.rank != owner:
                torch._foreach_copy_(tensors, views)
