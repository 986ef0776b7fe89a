"""parallel/plan.py and placement.py: every rule of spec §8, and the pass arithmetic of the
shipped nets."""

import os

import pytest
from net_helpers import IMAGENET, LAYERS, TINY, shipped

from distconvnet.errors import ConfigError, OptionError
from distconvnet.model import ConvNet
from distconvnet.parallel.plan import LayerNode, Plan, nodes_of


def plan_of(name, ctx=IMAGENET):
    return Plan(nodes_of(shipped(name, ctx)))


@pytest.fixture(scope="module")
def hybrid():
    return plan_of("imagenet-4gpu-data-model")


# -- the shipped nets -------------------------------------------------------------------------

def test_2gpu_data_is_two_replicas_everywhere_in_one_pass():
    plan = plan_of("imagenet-2gpu-data")
    assert {plan.replicas(n) for n in plan.order} == {2}
    assert (plan.min_replicas, plan.max_replicas, plan.num_passes) == (2, 2, 1)
    assert set(plan.active_pass_period.values()) == {1}
    assert plan.is_data_parallel
    assert plan.microbatch_size(256) == 128
    assert [plan.data_microbatch("data", r, 0) for r in (0, 1)] == [0, 1]


def test_4gpu_hybrid_pass_arithmetic(hybrid):
    assert (hybrid.min_replicas, hybrid.max_replicas, hybrid.num_passes) == (1, 4, 4)
    assert hybrid.microbatch_size(512) == 128
    assert hybrid.microbatch_bounds(512, 3) == (384, 512)
    for name in ("conv1", "pool1_neuron", "pool3", "data"):
        assert hybrid.replicas(name) == 4 and hybrid.active_pass_period[name] == 4
    for name in ("fc1024a", "pass1b", "fc1024bd", "pass2a", "fc1000", "logprob", "labvec"):
        assert hybrid.replicas(name) == 1 and hybrid.active_pass_period[name] == 1
    assert not hybrid.is_data_parallel


def test_4gpu_hybrid_schedule(hybrid):
    # conv runs forward on pass 0 only and backward on pass 3; the fc layers on every pass
    assert [hybrid.runs_forward("conv1", p) for p in range(4)] == [True, False, False, False]
    assert [hybrid.runs_backward("conv1", p) for p in range(4)] == [False, False, False, True]
    assert all(hybrid.runs_forward("fc1024c", p) and hybrid.runs_backward("fc1024c", p)
               for p in range(4))
    # fc1024x reads pool3 replica p on pass p; the labels deliver microbatch p on pass p
    for fc in ("fc1024a", "fc1024b", "fc1024c", "fc1024d"):
        assert [hybrid.feeding_replica(fc, "pool3_neuron", 0, p) for p in range(4)] == \
            [0, 1, 2, 3]
    assert [hybrid.data_microbatch("labvec", 0, p) for p in range(4)] == [0, 1, 2, 3]
    assert [hybrid.data_microbatch("data", r, 0) for r in range(4)] == [0, 1, 2, 3]
    # conv replica r reads its own data replica
    assert [hybrid.feeding_replica("conv1", "data", r, 0) for r in range(4)] == [0, 1, 2, 3]


def test_update_periods_of_the_hybrid(hybrid):
    assert hybrid.effective_update_period("conv1", 0) == 4     # once per 512 cases
    assert hybrid.effective_update_period("fc1024a", 1) == 1   # after every 128-case pass
    assert hybrid.effective_update_period("fc1024a", 0) == 1
    assert hybrid.effective_update_period("conv1", 8) == 8
    with pytest.raises(ConfigError, match=r"updatePeriod=6 must be a multiple of the layer's "
                                          r"activePassPeriod 4 \(4 replicas / 1\)"):
        hybrid.effective_update_period("conv2", 6)


def test_2gpu_model_is_one_pass_on_two_gpus():
    plan = plan_of("imagenet-2gpu-model")
    assert plan.num_passes == 1 and plan.num_gpus == 2
    assert plan.gpus["conv3b"] == (1,) and plan.gpus["fc1000"] == (0,)
    assert plan.gpus["data"] == (0,)      # a data layer lives where its first consumer does


def test_a_wide_to_narrow_step_of_two_walks_strided_replicas():
    """A 2-replica layer over a 4-replica input: replica r reads r, then r + 2 (the original's
    connectChildren), on passes 0 and 2 of 4; passes 1 and 3 are its backward passes."""
    nodes = [LayerNode("data", "data", (), (), is_data=True),
             LayerNode("wide", "fc", (0, 1, 2, 3), ("data",)),
             LayerNode("mid", "fc", (0, 1), ("wide",)),
             LayerNode("top", "fc", (0,), ("mid",)),
             LayerNode("labels", "data", (), (), is_data=True),
             LayerNode("cost", "cost.sum2", (0,), ("top",), is_cost=True)]
    plan = Plan(nodes)
    assert plan.num_passes == 4 and plan.active_pass_period["mid"] == 2
    assert [plan.runs_forward("mid", p) for p in range(4)] == [True, False, True, False]
    assert [plan.runs_backward("mid", p) for p in range(4)] == [False, True, False, True]
    assert [plan.feeding_replica("mid", "wide", r, 0) for r in (0, 1)] == [0, 1]
    assert [plan.feeding_replica("mid", "wide", r, 2) for r in (0, 1)] == [2, 3]
    assert [plan.feeding_replica("top", "mid", 0, p) for p in range(4)] == [0, 1, 0, 1]


def test_short_minibatch_microbatches_may_be_empty():
    plan = Plan([LayerNode("data", "data", (), (), is_data=True),
                 LayerNode("x", "fc", (0, 1, 2, 3), ("data",)),
                 LayerNode("c", "cost.sum2", (0, 1, 2, 3), ("x",), is_cost=True)])
    assert plan.microbatch_size(7) == 2
    assert [plan.microbatch_bounds(5, i) for i in range(4)] == [(0, 2), (2, 4), (4, 5), (5, 5)]


# -- placement --------------------------------------------------------------------------------

def test_placement_model_group_and_data_parallel_copies(hybrid):
    one = hybrid.placement(4)
    assert (one.data_groups, one.group_size) == (1, 4)
    assert one.replica_ranks("conv1") == (0, 1, 2, 3) and one.replica_ranks("fc1024c") == (2,)
    assert one.holders("conv1") == (0, 1, 2, 3) and one.holders("fc1024b") == (1,)
    two = hybrid.placement(8)
    assert two.data_groups == 2
    assert two.replica_ranks("fc1024c", group=1) == (6,)
    assert two.holders("fc1024c") == (2, 6)
    assert two.gpus_of(5) == (1,) and two.group_of(5) == 1


def test_fewer_processes_than_gpus_share_them(hybrid):
    two = hybrid.placement(2)
    assert two.replica_ranks("conv1") == (0, 0, 1, 1)
    assert two.gpus_of(0) == (0, 1) and two.gpus_of(1) == (2, 3)
    assert two.local_replicas("conv1", 1) == (2, 3)
    assert two.local_replicas("fc1024b", 0) == (0,) and two.local_replicas("fc1024c", 0) == ()
    single = hybrid.placement(1)
    assert single.local_replicas("conv1", 0) == (0, 1, 2, 3) and single.holders("conv1") == (0,)


def test_world_size_that_fits_neither_way(hybrid):
    with pytest.raises(OptionError, match=r"6 processes cannot run a net on 4 GPUs.*6 % 4 = 2"):
        hybrid.placement(6)


def test_describe_lists_ranks_per_data_parallel_group():
    plan = plan_of("imagenet-2gpu-model")
    lines = plan.placement(4).describe()
    assert "Layer 'conv1a': 1 replica(s) on GPUs 0 -> ranks 0 | 2" in lines
    assert "Layer 'conv3b': 1 replica(s) on GPUs 1 -> ranks 1 | 3" in lines


# -- the parser's rules, each with file:line, layer and arithmetic ----------------------------

HEAD = """[data]
type=data
dataIdx=0

[labels]
type=data
dataIdx=1
"""


def fc(name, inputs, gpu=None, outputs=10):
    return (f"\n[{name}]\ntype=fc\ninputs={inputs}\noutputs={outputs}\ninitW=0.1\n" +
            (f"gpu={gpu}\n" if gpu is not None else ""))


def tail(probs_input, cost_gpu=None, probs_gpu=None):
    return (f"\n[probs]\ntype=softmax\ninputs={probs_input}\n" +
            (f"gpu={probs_gpu}\n" if probs_gpu else "") +
            "\n[logprob]\ntype=cost.logreg\ninputs=labels,probs\n" +
            (f"gpu={cost_gpu}\n" if cost_gpu is not None else ""))


def plan_text(layer_text, tmp_path):
    path = tmp_path / "layers-rules.cfg"
    path.write_text(layer_text)
    names = [line.strip("[]\n") for line in layer_text.splitlines() if line.startswith("[")]
    params = "".join(f"[{n}]\nepsW=0.1\nepsB=0.1\nmomW=0\nmomB=0\n\n" for n in names
                     if n.startswith("fc") or n.startswith("x"))
    params += "[logprob]\ncoeff=1\n"
    model = ConvNet(str(path), "params.cfg", TINY, layer_params_text=params)
    return Plan(nodes_of(model))


def line_of(text, section):
    return text.splitlines().index(f"[{section}]") + 1


def test_inputs_with_unequal_replica_counts(tmp_path):
    text = HEAD + fc("fc1", "data", "0,1") + fc("fc2", "data", "0,1") + fc("fc3", "fc1", "0") + \
        fc("fcj", "fc2,fc3", "0") + tail("fcj")
    with pytest.raises(ConfigError) as e:
        plan_text(text, tmp_path)
    assert f"layers-rules.cfg:{line_of(text, 'fcj') + 2}: layer 'fcj': all input layers must " \
           f"have equal numbers of replicas ('fc2' has 2, 'fc3' has 1)" in str(e.value)


def test_consumers_with_unequal_replica_counts(tmp_path):
    text = HEAD + fc("fc1", "data", "0,1") + fc("fc2", "fc1", "0") + fc("fc3", "fc1") + \
        fc("fcj", "fc2,fc3", "0") + tail("fcj")
    with pytest.raises(ConfigError) as e:
        plan_text(text, tmp_path)
    assert f"layers-rules.cfg:{line_of(text, 'fc1')}: layer 'fc1': all layers that take this " \
           f"layer as input must have equal numbers of replicas ('fc2' has 1, 'fc3' has 2)" \
        in str(e.value)


def test_data_layer_consumers_must_agree(tmp_path):
    text = HEAD + fc("fc1", "data", "0,1") + fc("fc2", "data", "0") + \
        fc("fcj", "fc1", "0") + fc("fck", "fcj,fc2") + tail("fck")
    with pytest.raises(ConfigError, match=r"layer 'data': all layers that take this layer as "
                                          r"input must have equal numbers of replicas "
                                          r"\('fc1' has 2, 'fc2' has 1\)"):
        plan_text(text, tmp_path)


def test_replicas_must_divide_the_inputs(tmp_path):
    text = HEAD + fc("fc1", "data", "0,1,2") + fc("fc2", "fc1", "0,1") + \
        fc("fc3", "fc2", "0") + tail("fc3")
    with pytest.raises(ConfigError) as e:
        plan_text(text, tmp_path)
    assert f":{line_of(text, 'fc2') + 5}: layer 'fc2': its 2 replicas must divide the " \
           f"replicas of every input, but input 'fc1' has 3 (3 % 2 = 1)" in str(e.value)


def test_replicas_on_distinct_gpus():
    with pytest.raises(ConfigError, match=r"layer 'x': gpu=0,0: the replicas of a layer must "
                                          r"run on distinct GPUs"):
        Plan([LayerNode("data", "data", (), (), is_data=True),
              LayerNode("x", "fc", (0, 0), ("data",))])


def test_cost_layers_are_not_split(tmp_path):
    text = HEAD + fc("fc1", "data", "1") + tail("fc1", cost_gpu="0")
    with pytest.raises(ConfigError, match=r"layer 'logprob': a cost layer cannot be split "
                                          r"across GPUs: it runs on GPUs 0, its input 'probs' "
                                          r"on GPUs 1"):
        plan_text(text, tmp_path)


def test_pass_layers_sharing_an_input_on_overlapping_gpus(tmp_path):
    body = fc("fc1", "data", "0") + fc("fc2", "data", "1") + \
        "\n[pa]\ntype=pass\ninputs=fc1,fc2\ngpu=0\n" + \
        "\n[pb]\ntype=pass\ninputs=fc2,fc1\ngpu={gpu}\n" + fc("fcj", "pa,pb", "0")
    plan_text(HEAD + body.format(gpu=1) + tail("fcj"), tmp_path)      # disjoint: fine
    with pytest.raises(ConfigError, match=r"layer 'pb': pass layers 'pa' and 'pb' both take "
                                          r"'fc2' as input and both run on GPU\(s\) 0"):
        plan_text(HEAD + body.format(gpu=0) + tail("fcj"), tmp_path)


def test_active_pass_periods_must_divide_the_passes():
    nodes = [LayerNode("data", "data", (), (), is_data=True),
             LayerNode("data2", "data", (), (), is_data=True),
             LayerNode("three", "fc", (0, 1, 2), ("data",)),
             LayerNode("two", "fc", (0, 1), ("data2",)),
             LayerNode("x", "fc", (0,), ("three",)),
             LayerNode("y", "fc", (1,), ("two",))]
    with pytest.raises(ConfigError, match=r"layer 'two': 2 replicas do not fit the net's passes: "
                                          r"activePassPeriod = 2/1 .* dividing numPasses = 3/1"):
        Plan(nodes)


def test_summary_shows_replicas_and_ranks_for_a_world_size(capsys):
    from distconvnet import cli
    net = "test-2gpu-hybrid"
    status = cli.main(["summary", "--layer-def", os.path.join(LAYERS, f"layers-{net}.cfg"),
                       "--layer-params", os.path.join(LAYERS, f"layer-params-{net}.cfg"),
                       "--inner-size", "8", "--world-size", "4"])
    lines = capsys.readouterr().out.splitlines()
    assert status == 0
    assert "Passes per minibatch: 2 (replicas: 1 to 2); 4 process(es) = 2 data-parallel " \
           "group(s) of 2" in lines
    assert "Layer 'conv1': 2 replica(s) on GPUs 0, 1 -> ranks 0, 1 | 2, 3" in lines
    assert "Layer 'fc8b': 1 replica(s) on GPUs 1 -> ranks 1 | 3" in lines


# -- what the pass schedule derives from the placement -----------------------------------------

def test_cut_layers_of_the_hybrid(hybrid):
    model = shipped("imagenet-4gpu-data-model")
    reads = model.reads()
    # one process: only the wide -> narrow step is cut
    assert hybrid.placement(1).cut_layers(reads, 0) == {"pool3_neuron"}
    # one per GPU: every layer read on another rank too; the dropouts feed four pass layers
    cuts = hybrid.placement(4).cut_layers(reads, 0)
    assert {"pool3_neuron", "dropout1a", "dropout1d", "dropout2b"} <= cuts
    assert not {"conv1", "fc1024a", "pass1a", "fc1000", "probs"} & cuts


def test_a_layer_leading_to_two_roots_is_cut():
    """x feeds a cost and a cut layer (read by a narrower one): two backward calls would walk
    x's graph twice, so x is a root of its own."""
    nodes = [LayerNode("data", "data", (), (), is_data=True),
             LayerNode("x", "fc", (0, 1), ("data",)),
             LayerNode("cost1", "cost.sum2", (0, 1), ("x",), is_cost=True),
             LayerNode("wide", "fc", (0, 1), ("x",)),
             LayerNode("narrow", "fc", (0,), ("wide",)),
             LayerNode("cost2", "cost.sum2", (0,), ("narrow",), is_cost=True)]
    plan = Plan(nodes)
    reads = {n.name: list(n.inputs) for n in nodes}
    assert plan.placement(1).cut_layers(reads, 0) == {"wide", "x"}


def test_data_needs_and_rank_sets(hybrid):
    reads = shipped("imagenet-4gpu-data-model").reads()
    four = hybrid.placement(4)
    # conv1 replica r (rank r) reads microbatch r; the logreg on rank 0 every microbatch
    assert four.data_needs(reads) == {"data": {0: {0}, 1: {1}, 2: {2}, 3: {3}},
                                      "labvec": {0: {0, 1, 2, 3}}}
    assert four.rank_sets() == [(0, 1, 2, 3)]
    assert hybrid.placement(8).rank_sets() == [tuple(range(8)), (0, 4), (1, 5), (2, 6), (3, 7)]
