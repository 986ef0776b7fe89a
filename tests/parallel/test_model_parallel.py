"""parallel/model_parallel.py: the pass semantics of spec §8 on one process, and SPMD over gloo
processes giving the same losses and weights as one process (the trainer on these nets:
test_model_parallel_trainer.py)."""

import contextlib
import math
import os

import pytest
import torch
from net_helpers import LAYERS, TINY, cfg_text, no_dropout, with_update_period

from distconvnet import fastpath
from distconvnet.model import ConvNet
from distconvnet.optim import Ccn2SGD
from distconvnet.parallel.model_parallel import PassSchedule
from distconvnet.parallel.plan import Plan, nodes_of


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny nets on a shared 2-core machine: several torch threads only fight each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def build(name, seed=0, params=None, layer_def=None):
    """A net from layers/, with initial weights fixed by `seed`; texts may replace the files."""
    torch.manual_seed(seed)
    model = ConvNet(os.path.join(LAYERS, f"layers-{name}.cfg"),
                    os.path.join(LAYERS, f"layer-params-{name}.cfg"), TINY,
                    layer_def_text=layer_def, layer_params_text=params)
    return model.train()


def minibatches(count, cases, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(cases, 3, 8, 8, generator=generator),
             torch.randint(0, 10, (cases,), generator=generator).float()]
            for _ in range(count)]


def total_costs(schedule, sums):
    """The whole net's cost sums of a minibatch: this rank's folded sums, summed over ranks."""
    costs = schedule.folded_costs(sums)
    if schedule.distributed:
        flat = torch.cat(list(costs.values()))
        torch.distributed.all_reduce(flat)
        costs = dict(zip(costs, flat.split([len(v) for v in costs.values()])))
    return costs


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same(a, b, exact=True):
    assert a.keys() == b.keys()
    for k in a:
        if exact:
            assert torch.equal(a[k], b[k]), k
        else:
            torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


# -- the hand-written reference: the passes of spec §8, written out with the model's layers ---

def run_layers(model, names, acts, mats):
    objective, costs = 0, {}
    for name in names:
        layer = model.layers[name]
        if layer.is_data:
            acts[name] = layer(mats)
            continue
        xs = [acts[i] for i in layer.input_names]
        if layer.is_cost:
            logits = model.logits_for.get(name)
            obj, values = layer(*xs, logits=acts[logits]) if logits else layer(*xs)
            objective, costs[name] = objective + obj, values
        else:
            acts[name] = layer(*xs)
    return objective, costs


def reference_minibatch(model, optimizer, mats, passes, boundary):
    """The wide layers (file order up to `boundary`) once over the whole minibatch; then, per
    pass p, the narrow layers on microbatch p of ceil(cases/passes) rows (labels likewise),
    backward, and — on the last pass — one backward through the wide layers with the gradient
    accumulated at `boundary` over the passes; the optimizer steps after every pass."""
    names = list(model.layers)
    cut = names.index(boundary)
    wide = [n for n in names[:cut + 1] if n != "labels"]
    narrow = names[cut + 1:]
    acts = {}
    run_layers(model, wide, acts, mats)
    out = acts[boundary]
    leaf = out.detach().requires_grad_()
    cases = mats[0].shape[0]
    size = -(-cases // passes)
    totals = {}
    for p in range(passes):
        rows = slice(min(p * size, cases), min((p + 1) * size, cases))
        pass_acts = {boundary: leaf[rows], "labels": mats[1][rows]}
        objective, costs = run_layers(model, narrow, pass_acts, None)
        objective.backward()
        if p == passes - 1:
            out.backward(leaf.grad)
        optimizer.step()
        for k, v in costs.items():
            totals[k] = v if k not in totals else totals[k] + v
    return totals


def optimizer_for(model, passes, periods):
    return Ccn2SGD(model.weight_layers(), 16, num_passes=passes, active_pass_period=periods)


HYBRIDS = {"test-4gpu-data-model": (4, "pool3_neuron"), "test-2gpu-hybrid": (2, "pool2")}


@pytest.mark.parametrize("net", sorted(HYBRIDS))
@pytest.mark.parametrize("update_period", [1, None, "passes"])
@pytest.mark.parametrize("cases", [16, 13, 3])
def test_hybrid_single_process_equals_the_step_by_step_reference(net, update_period, cases):
    passes, boundary = HYBRIDS[net]
    period = passes if update_period == "passes" else update_period
    params = with_update_period(cfg_text(net, "params"), period)
    ours, ref = build(net, params=params), build(net, params=params)
    plan = Plan(nodes_of(ours))
    assert plan.num_passes == passes
    schedule = PassSchedule(ours, plan)
    ours_opt = optimizer_for(ours, passes, plan.active_pass_period)
    wide = {n: passes for n, layer in ref.layers.items() if layer.gpus and len(layer.gpus) > 1}
    ref_opt = optimizer_for(ref, passes, wide)
    batches = minibatches(2, cases)
    torch.manual_seed(5)         # the dropout masks: drawn in the same order by both
    got = [total_costs(schedule, schedule.train_minibatch(mats, ours_opt)) for mats in batches]
    torch.manual_seed(5)
    expected = [reference_minibatch(ref, ref_opt, mats, passes, boundary) for mats in batches]
    for g, e in zip(got, expected):
        assert torch.equal(g["logprob"], e["logprob"].float())
    assert_same(weights(ours), weights(ref))


def test_conv_updates_once_per_minibatch_and_fc_after_every_pass():
    model = build("test-4gpu-data-model")
    plan = Plan(nodes_of(model))
    schedule = PassSchedule(model, plan)
    optimizer = optimizer_for(model, 4, plan.active_pass_period)
    seen = ("conv1", "fc8a")
    steps = []
    optimizer.register_step_pre_hook(lambda *_: steps.append(
        {k: model.layers[k].weights[0].detach().clone() for k in seen}))
    schedule.train_minibatch(minibatches(1, 16)[0], optimizer)
    after = {k: model.layers[k].weights[0].detach() for k in seen}
    snapshots = steps + [after]
    changed = {k: [not torch.equal(a[k], b[k]) for a, b in zip(snapshots, snapshots[1:])]
               for k in seen}
    assert changed == {"conv1": [False, False, False, True], "fc8a": [True] * 4}


def data_parallel_text(name):
    """The tiny net with every layer on GPUs 0 and 1 (spec §14.3's change to the 1-GPU net)."""
    return cfg_text(name, "def").replace("gpu=0\n", "gpu=0,1\n")


@pytest.mark.parametrize("net, layer_def", [
    ("tiny", data_parallel_text("tiny")),        # pure data parallel: 2 replicas, 1 pass
    ("test-2gpu-model", None),                   # model parallel in one process: 1 pass
])
def test_one_pass_nets_equal_the_plain_forward_exactly(net, layer_def):
    ours, ref = build(net, layer_def=layer_def), build(net, layer_def=layer_def)
    plan = Plan(nodes_of(ours))
    assert plan.num_passes == 1
    schedule = PassSchedule(ours, plan)
    ours_opt, ref_opt = optimizer_for(ours, 1, None), optimizer_for(ref, 1, None)
    batches = minibatches(3, 16)
    torch.manual_seed(7)
    got = [total_costs(schedule, schedule.train_minibatch(m, ours_opt)) for m in batches]
    torch.manual_seed(7)
    expected = []
    for mats in batches:
        out = ref(mats)
        out.objective.backward()
        ref_opt.step()
        expected.append(out.costs)
    for g, e in zip(got, expected):
        assert torch.equal(g["logprob"], e["logprob"].float())
    assert_same(weights(ours), weights(ref))


def test_costs_of_all_passes_add_up_to_every_case_once():
    model = build("test-4gpu-data-model", params=cfg_text("test-4gpu-data-model", "params")
                  .replace("enable=true", "enable=false"))
    plan = Plan(nodes_of(model))
    schedule = PassSchedule(model, plan)
    mats = minibatches(1, 13)[0]
    with torch.no_grad():
        plain = model(mats).costs["logprob"]
    optimizer = optimizer_for(model, 4, plan.active_pass_period)
    optimizer.param_groups.clear()      # no update: the first pass's weights serve all four
    sums = schedule.train_minibatch(mats, optimizer)
    assert sums["logprob"][1:].tolist() == plain[1:].tolist()     # errors: counts, exactly
    assert math.isclose(sums["logprob"][0], plain[0], rel_tol=1e-5)


def train_compiled(net, compile_layers, graph_break, monkeypatch):
    """Costs and weights after one minibatch of 3 cases on one process (2 passes of 2 and 1)."""
    model = build(net, params=no_dropout(cfg_text(net, "params")))
    if graph_break and compile_layers:
        layer = model.layers["fc8ba"]
        monkeypatch.setattr(layer, "forward", lambda x, forward=layer.forward: (
            torch._dynamo.graph_break(), forward(x))[1])
    plan = Plan(nodes_of(model))
    schedule = PassSchedule(model, plan, compile_layers=compile_layers)
    assert len(schedule.calls) == 2
    optimizer = optimizer_for(model, plan.num_passes, plan.active_pass_period)
    costs = [total_costs(schedule, schedule.train_minibatch(mats, optimizer))
             for mats in minibatches(1, 3)]
    return costs, weights(model)


@pytest.mark.parametrize("graph_break", [False, True], ids=["whole", "graph break"])
def test_compiled_segments_train_as_the_plain_ones(monkeypatch, graph_break):
    """--compile: each segment — here the conv stack and the fc stack of the hybrid net on one
    process — runs through torch.compile as one function (its graphs run eagerly here; inductor
    would take minutes on the CPU); none is left uncompiled by dynamo's recompile limit (here
    1, below the entries a segment needs for the two microbatch sizes) nor by a layer dynamo
    cannot trace, which splits its segment's graph instead; and the numbers do not change but
    for rounding (compiled, the response norms run their formula instead of the hand-written
    gradient: layers/norm.py)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(fastpath, "forward_fn", lambda module, compile_model: torch.compile(
        module, backend="eager", dynamic=False) if compile_model else module)
    config = torch._dynamo.config
    limit = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    net = "test-2gpu-hybrid"
    torch._dynamo.reset()
    counters.clear()
    # config.patch, not monkeypatch: undoing a monkeypatch deletes a dynamo setting
    with config.patch({limit: 1}):
        results = [train_compiled(net, compile_layers, graph_break, monkeypatch)
                   for compile_layers in (False, True)]
    frames, graphs = dict(counters["frames"]), counters["stats"]["unique_graphs"]
    torch._dynamo.reset()
    assert frames["total"] > 0 and frames["ok"] == frames["total"]
    # one graph per segment and microbatch size (the conv stack meets one, the fc stack two);
    # the graph break cuts the fc stack's into more
    assert graphs > 3 if graph_break else graphs == 3
    (plain, plain_weights), (compiled, compiled_weights) = results
    for a, b in zip(plain, compiled):
        torch.testing.assert_close(a["logprob"], b["logprob"], rtol=1e-5, atol=1e-6)
    assert_same(plain_weights, compiled_weights, exact=False)


# -- SPMD: one process per GPU index, gloo on the CPU -----------------------------------------

def bf16():
    return torch.autocast("cpu", dtype=torch.bfloat16)


# The 2-GPU hybrid whose conv2 reads pool1 twice, its second matrix taken from its first
# (weightSource): a data-parallel layer whose receiving copy's gradient the ranks sum too.
SHARED = "test-2gpu-hybrid-shared"


def net_files(net):
    """(the net of layers/ that `net` is, its layer-definition text or None for the file)."""
    if net != SHARED:
        return net, None
    text = cfg_text("test-2gpu-hybrid", "def")
    edited = text.replace("[conv2]\ntype=conv\ninputs=pool1\n",
                          "[conv2]\ntype=conv\ninputs=pool1,pool1\nweightSource=,conv2\n")
    assert edited != text
    return "test-2gpu-hybrid", edited


def train_net(job, world_size=1, rank=0):
    """Train `count` minibatches of `cases` of a test net (under bf16 autocast if the job says
    so); the costs, weights and increments, and what this rank saw of its transfers and of
    the layers it does not hold."""
    net, period, count, cases, *precision = job
    net, layer_def = net_files(net)
    autocast = bf16 if precision == ["bf16"] else contextlib.nullcontext
    if period == "passes":
        period = HYBRIDS[net][0] if net in HYBRIDS else 1
    model = build(net, params=no_dropout(with_update_period(cfg_text(net, "params"), period)),
                  layer_def=layer_def)
    initial = weights(model)
    plan = Plan(nodes_of(model))
    schedule = PassSchedule(model, plan, world_size=world_size, rank=rank)
    schedule.create_process_groups()
    optimizer = Ccn2SGD(model.weight_layers(), cases, num_passes=plan.num_passes,
                        active_pass_period=plan.active_pass_period)
    schedule.freeze_remote_layers(optimizer)
    part = -(-cases // world_size)         # rank k's shard: rows [k·part, (k+1)·part)
    costs, layouts = [], []
    for mats in minibatches(count, cases):
        costs.append(total_costs(schedule, schedule.train_minibatch(
            [m[rank * part:(rank + 1) * part] for m in mats], optimizer, autocast, cases)))
        layouts.append(len(schedule._layouts))
    remote = [k for k in initial if not schedule.local[k.split(".")[1]]]
    untouched = all(torch.equal(model.state_dict()[k], initial[k]) for k in remote)
    schedule.share_weights(optimizer)
    increments = {f"{name}.{kind}": inc.detach().clone()
                  for name, incs in optimizer.increments().items()
                  for kind, inc in [("biases", incs["biases"])] +
                  [(f"weights{i}", w) for i, w in enumerate(incs["weights"])]}
    return {"costs": costs, "weights": weights(model), "increments": increments,
            "layouts": layouts, "remote": len(remote), "remote_untouched": untouched}


def spmd_worker(rank, world_size, port, jobs, out_dir):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world_size)
    try:
        for index, job in enumerate(jobs):
            result = train_net(job, world_size, rank)
            if rank == 0:
                torch.save(result, os.path.join(out_dir, f"{index}.pt"))
    finally:
        dist.destroy_process_group()


def run_spmd(world_size, jobs, out_dir):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(spmd_worker, args=(world_size, port, jobs, str(out_dir)),
                       nprocs=world_size, start_method="fork")
    return [torch.load(os.path.join(out_dir, f"{i}.pt")) for i in range(len(jobs))]


# (net, updatePeriod of the fc layers, minibatches, cases per minibatch[, "bf16"]) per world
# size: 2 processes run the two-tower net and the 2-GPU hybrid one per GPU (once under bf16
# autocast), and the 4-GPU hybrid with two GPU indices per process; 4 processes run the 4-GPU
# hybrid one per GPU, and the 2-GPU nets as 2 (model) × 2 (data) — each with updatePeriod=1
# and with the default.
SPMD_JOBS = {
    2: [("test-2gpu-model", None, 3, 16), ("test-2gpu-hybrid", 1, 3, 16),
        ("test-2gpu-hybrid", None, 3, 13), ("test-4gpu-data-model", 1, 2, 16),
        ("test-4gpu-data-model", None, 2, 3), ("test-2gpu-hybrid", 1, 2, 16, "bf16"),
        (SHARED, 1, 2, 16)],
    4: [("test-4gpu-data-model", 1, 3, 16), ("test-4gpu-data-model", None, 3, 13),
        ("test-4gpu-data-model", "passes", 2, 16), ("test-2gpu-model", None, 3, 16),
        ("test-2gpu-hybrid", 1, 3, 16), ("test-2gpu-hybrid", None, 2, 13)],
}


@pytest.fixture(scope="module")
def spmd_results(tmp_path_factory):
    return {world: run_spmd(world, jobs, tmp_path_factory.mktemp(f"spmd{world}"))
            for world, jobs in SPMD_JOBS.items()}


@pytest.mark.parametrize("world_size, index", [(w, i) for w, jobs in SPMD_JOBS.items()
                                               for i in range(len(jobs))])
def test_spmd_equals_one_process(spmd_results, world_size, index):
    job = SPMD_JOBS[world_size][index]
    got, expected = spmd_results[world_size][index], train_net(job)
    # bf16: one process batches the replicas that SPMD runs apart, which rounds differently
    rtol, atol = (2e-2, 1e-2) if job[-1] == "bf16" else (1e-5, 1e-4)
    for g, e in zip(got["costs"], expected["costs"]):
        torch.testing.assert_close(g["logprob"], e["logprob"], rtol=rtol, atol=atol)
    for name in ("weights", "increments"):
        assert got[name].keys() == expected[name].keys()
        for k in got[name]:
            torch.testing.assert_close(got[name][k], expected[name][k], rtol=rtol,
                                       atol=atol * 1e-2, msg=k)
    # Rank 0 trained without ever touching the layers it does not hold (weights are shared
    # only when asked, before a test or a save) ...
    assert got["remote"] > 0 and got["remote_untouched"]
    # ... and its transfers sent their shapes ahead on the first minibatch only.
    assert got["layouts"][0] > 0 and len(set(got["layouts"])) == 1
