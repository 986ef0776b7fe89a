"""Several machines, for real, on this one (issue 18): node agents started as a cluster starts
them, each with its own environment, through the scripts in launch/ (torchrun.sh, slurm.sbatch
under stand-ins for srun and scontrol, mpirun.sh with a hostfile of two hosts), on the CPU over
gloo. Their runs train like one process; a node that dies ends the job in time or, with
restarts, the job resumes and ends like the run never stopped; a broken rendezvous says so in
one line. Run them alone with `pytest -m multinode`."""

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dp_helpers import (REPO, assert_same_history, assert_same_weights, check_like_one_process,
                        newest_checkpoint, run_ok, tiny_args)
from nodes import PYTHON_DIR, Cluster, path_with
from trainer_fixtures import run_in_process

from distconvnet.parallel.launch import free_port

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

TORCHRUN = ["bash", str(REPO / "launch" / "torchrun.sh")]
STANDINS = Path(__file__).parent / "standins"
# The collective and rendezvous timeout of these runs (DISTCONVNET_TIMEOUT, seconds).
TIMEOUT = 10
# A node's agent says it is alive every second, so that a dead node is noticed in 3 s (torch:
# 15 s).
HEARTBEAT = "keep_alive_interval=1"
# Only node0 serves the rendezvous, as on a cluster, where no other node has MASTER_ADDR's
# address (here all have).
CLIENT = HEARTBEAT + ",is_host=false"


@pytest.fixture
def cluster(tmp_path):
    nodes = Cluster(tmp_path / "nodes")
    yield nodes
    nodes.stop()


@pytest.fixture(scope="module")
def two_epochs_in_one_process(demo_data, tmp_path_factory):
    """The checkpoint of the uninterrupted run that the restarted jobs must end with."""
    save = tmp_path_factory.mktemp("two-epochs")
    status, _, err = run_in_process(tiny_args(demo_data, save, "--epochs", "2"))
    assert status == 0, err
    return newest_checkpoint(save)


def job_env(port=None, timeout=TIMEOUT, **env):
    return {"NNODES": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port or free_port()),
            "DISTCONVNET_TIMEOUT": str(timeout), "NGPU": "1", **env}


def start_node(cluster, name, args, env, rank):
    return cluster.start(name, TORCHRUN + args, RDZV_CONF=CLIENT if rank else HEARTBEAT, **env)


def two_nodes(cluster, args, nprocs=(1, 1), **env):
    """Two torchrun.sh agents of one job, as on two machines; node0 serves the rendezvous."""
    env = job_env(**env)
    return [start_node(cluster, f"node{rank}", args, {**env, "NGPU": str(n)}, rank)
            for rank, n in enumerate(nprocs)]


def printing_node(nodes):
    """The one node whose console shows the run (global rank 0's); the others print nothing."""
    printing = [node for node in nodes if node.out]
    assert len(printing) == 1, nodes
    return printing[0]


def error_lines(text):
    return [line for line in text.splitlines() if re.match(r"^(rank \d+: )?error: ", line)]


def first_batch_of_each_start(stdout):
    return [re.search(r"^(\d\.\d) \(", start, re.M).group(1)
            for start in stdout.split("Training ConvNet")[1:]]


def test_two_torchrun_nodes_train_like_one_process(one_process, demo_data, tmp_path, cluster):
    """1 + 2 processes: the one-process weights, history and console, printed by one node."""
    nodes = two_nodes(cluster, tiny_args(demo_data, tmp_path / "save"), nprocs=(1, 2))
    assert cluster.wait(nodes, 120) == [0, 0], nodes
    check_like_one_process(one_process, printing_node(nodes).out,
                           "".join(node.err for node in nodes), tmp_path / "save", "cpu")


def test_slurm_batch_script_under_a_stand_in_srun(one_process, demo_data, tmp_path):
    """launch/slurm.sbatch as it is, with the variables of a 2-node allocation of one GPU a
    node; srun and scontrol are stand-ins that run every node's task here."""
    allocation = {"SLURM_JOB_ID": "4242", "SLURM_NNODES": "2", "SLURM_JOB_NUM_NODES": "2",
                  "SLURM_JOB_NODELIST": "localhost,127.0.0.1", "SLURM_SUBMIT_DIR": str(REPO),
                  "SLURM_GPUS_ON_NODE": "1", "SLURM_NTASKS": "2", "MASTER_PORT": str(free_port()),
                  "PATH": path_with(STANDINS, PYTHON_DIR)}
    out, err = run_ok(["bash", str(REPO / "launch" / "slurm.sbatch"),
                       *tiny_args(demo_data, tmp_path)], timeout=120, **allocation)
    check_like_one_process(one_process, out, err, tmp_path, "cpu")


def two_open_mpi_hosts(tmp_path):
    """A hostfile of two hosts, and the mpirun arguments that reach them. Open MPI takes every
    name of this machine (localhost, 127.0.0.1, its host name) for one node, and refuses a
    hostfile that lists it twice; so the hosts get names of their own, and mpirun reaches them
    through an ssh stand-in that starts their daemons here, in a login's bare environment."""
    done = subprocess.run(["mpirun", "--version"], capture_output=True, text=True)
    if "Open MPI" not in done.stdout + done.stderr:
        pytest.skip("the two-host launch uses Open MPI's ssh launcher; this mpirun is not "
                    "Open MPI")
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node-a slots=1\nnode-b slots=1\n")
    return {"NGPU": "2", "HOSTFILE": str(hostfile), "SSH_STANDIN_LOG": str(tmp_path / "ssh.log"),
            "MPI_ARGS": f"--mca plm_rsh_agent {STANDINS / 'ssh'}", "PATH": path_with(PYTHON_DIR)}


@pytest.mark.mpi
def test_mpirun_starts_a_rank_on_each_host_with_the_settings_it_passes(tmp_path, cluster):
    """launch/mpirun.sh with HOSTFILE: a daemon per host, one rank on each (local rank 0 of
    its host), convnet.py's command line intact, and the settings a user makes on the first
    host (timeouts, network interfaces, the rendezvous) on the other; what it does not pass
    does not get there. The ranks are stand-ins for python that report what they got."""
    settings = {"DISTCONVNET_TIMEOUT": "17", "GLOO_SOCKET_IFNAME": "lo",
                "NCCL_SOCKET_IFNAME": "lo", "MASTER_ADDR": "node-a", "MASTER_PORT": "29411"}
    hosts = two_open_mpi_hosts(tmp_path)
    args = ["--save-path", str(tmp_path), "--mini", "13"]
    job = cluster.start("mpirun", ["bash", str(REPO / "launch" / "mpirun.sh"), *args],
                        PYTHON=str(STANDINS / "rank-report"), NOT_PASSED="1", **settings,
                        **hosts)
    assert cluster.wait([job], 60) == [0], job
    assert sorted(Path(hosts["SSH_STANDIN_LOG"]).read_text().split()) == ["node-a", "node-b"]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        env = report["env"]
        assert report["argv"] == [str(REPO / "launch" / ".." / "convnet.py"), *args]
        assert (env["OMPI_COMM_WORLD_LOCAL_RANK"], env["OMPI_COMM_WORLD_LOCAL_SIZE"]) == \
            ("0", "1")
        assert {name: env.get(name) for name in settings} == settings
        assert env["NCCL_NVLS_ENABLE"] == "0" and env["OMP_NUM_THREADS"] == "1"
        assert env["PATH"].startswith(str(PYTHON_DIR)) and "NOT_PASSED" not in env


@pytest.mark.mpi
def test_mpirun_over_two_hosts_trains_like_one_process(one_process_on, demo_data, tmp_path,
                                                       cluster):
    """Where Open MPI can carry messages between the two hosts (a probe says), the same
    launch trains; the one-process run is made only then."""
    hosts = two_open_mpi_hosts(tmp_path)
    probe = cluster.start("mpi-probe", [
        "mpirun", "-np", "2", "--hostfile", hosts["HOSTFILE"], "--bind-to", "none",
        *hosts["MPI_ARGS"].split(), sys.executable, "-c",
        "from mpi4py import MPI; MPI.COMM_WORLD.allgather(0)"],
        OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    try:
        cluster.wait([probe], 4)
    except AssertionError:
        pytest.skip("Open MPI carries no message between two hosts that are one machine: "
                    "under two names of their own (an ssh stand-in starts their daemons "
                    "here), its shared-memory transport will not join them and its TCP "
                    "transport hangs at the first message (Open MPI 5.0, seen in a gVisor "
                    "sandbox); the launch itself is tested above")
    out, err = run_ok(["bash", str(REPO / "launch" / "mpirun.sh"),
                       *tiny_args(demo_data, tmp_path / "save")], timeout=120, **hosts)
    check_like_one_process(one_process_on("cpu"), out, err, tmp_path / "save", "cpu")


def test_a_node_that_dies_ends_the_job_in_time_and_the_checkpoint_stays_whole(
        demo_data, tmp_path, cluster):
    """No restarts: node0 (rank 0, the rendezvous's server) dies a batch after a checkpoint;
    node1 ends within a minute, non-zero, with one line from its agent."""
    args = tiny_args(demo_data, tmp_path / "save", "--train-range", "1-5", "--epochs", "1000")
    node0, node1 = two_nodes(cluster, args)
    assert cluster.wait_for_line("Saved checkpoint", 120) is node0
    time.sleep(0.2)
    node0.kill()
    started = time.monotonic()
    assert cluster.wait([node1], 60) == [1], node1
    assert time.monotonic() - started < 60
    # its worker's line, and its agent's
    worker, agent = error_lines(node1.err)
    assert worker.startswith("rank 1: error: lost contact with another rank")
    # Which the agent notices first, the rendezvous gone or its worker's exit, is a race.
    assert agent.startswith(("error: no connection to the rendezvous 'distconvnet' at "
                             "127.0.0.1:", "error: worker rank 1 exited with status 1 and no "
                             "restart is left")), node1
    assert "Traceback" not in node1.err
    saved = newest_checkpoint(tmp_path / "save")
    assert saved["batchnum"] % 2 == 0                       # a test event's checkpoint, whole


def restarted_job_checks(out, save, expected):
    # the first start, and the start that went on with the batch after the checkpoint of 1.2
    assert first_batch_of_each_start(out) == ["1.1", "2.1"]
    assert len(list(save.glob("ConvNet__*"))) == 1
    final = newest_checkpoint(save)
    assert len(final["train_outputs"]) == 4                  # no batch lost, none counted twice
    assert_same_weights(final, expected)
    assert_same_history(final, expected)


def test_a_dead_node_replaced_resumes_the_job_which_ends_like_one_process(
        two_epochs_in_one_process, demo_data, tmp_path, cluster):
    """MAX_RESTARTS=1, --nnodes 2: node1 dies a batch after the first checkpoint, and a new
    node1 joins (as a scheduler would start one); node0's agent restarts its worker and both
    resume the checkpoint, though the new node's agent has never restarted anything."""
    args = tiny_args(demo_data, tmp_path / "save", "--epochs", "2")     # saves 1.2 and 2.2
    env = job_env(MAX_RESTARTS="1")
    node0 = start_node(cluster, "node0", args, env, 0)
    node1 = start_node(cluster, "node1", args, env, 1)
    cluster.wait_for_line("Saved checkpoint", 120)
    time.sleep(0.2)
    node1.kill()
    replacement = start_node(cluster, "node1-new", args, env, 1)
    assert cluster.wait([node0, replacement], 120) == [0, 0], cluster.nodes
    restarted_job_checks(node0.out, tmp_path / "save", two_epochs_in_one_process)


def test_an_elastic_job_goes_on_without_a_dead_node_and_ends_like_one_process(
        two_epochs_in_one_process, demo_data, tmp_path, cluster):
    """MAX_RESTARTS=1, --nnodes 1:2: node1 dies a batch after the first checkpoint; node0
    goes on alone from it, with half the ranks, to the same weights."""
    args = tiny_args(demo_data, tmp_path / "save", "--epochs", "2")
    node0, node1 = two_nodes(cluster, args, NNODES="1:2", MAX_RESTARTS="1", timeout=15)
    cluster.wait_for_line("Saved checkpoint", 120)
    time.sleep(0.2)
    node1.kill()
    assert cluster.wait([node0], 120) == [0], cluster.nodes
    restarted_job_checks(node0.out, tmp_path / "save", two_epochs_in_one_process)


def test_a_node_at_the_wrong_port_fails_in_one_line_within_the_timeout(demo_data, tmp_path,
                                                                       cluster):
    """node1's MASTER_PORT is not node0's: both say so in one line once the rendezvous timeout
    (DISTCONVNET_TIMEOUT) has passed, and neither trains."""
    args = tiny_args(demo_data, tmp_path / "save")
    port, wrong_port = free_port(), free_port()
    assert port != wrong_port
    started = time.monotonic()
    node0 = start_node(cluster, "node0", args, job_env(port, timeout=3), 0)
    node1 = start_node(cluster, "node1", args, job_env(wrong_port, timeout=3), 1)
    assert cluster.wait([node0, node1], 60) == [1, 1], cluster.nodes
    assert time.monotonic() - started < 40
    for node in (node0, node1):
        assert "Traceback" not in node.err and node.out == "", node
    assert error_lines(node0.err) == [
        f"error: the rendezvous 'distconvnet' at 127.0.0.1:{port} timed out (join_timeout=3 s) "
        f"before 2 node(s) joined: every node must be given the same MASTER_ADDR, MASTER_PORT "
        f"and RDZV_ID, and reach MASTER_ADDR:MASTER_PORT"]
    [line] = error_lines(node1.err)
    assert line.startswith(f"error: no connection to the rendezvous 'distconvnet' at "
                           f"127.0.0.1:{wrong_port}, which the agent of the node at MASTER_ADDR "
                           f"serves ("), line
