"""Launch detection (torchrun, mpirun, spawn, none), device choice, the spawn decision, where a
restarted job resumes, and how a lost peer reads: pure functions of the environment."""

import pytest
import torch

from distconvnet import checkpoint, options, runplan
from distconvnet.errors import OptionError
from distconvnet.parallel import launch
from distconvnet.parallel.launch import DistributedError, LaunchInfo, launch_info
from distconvnet.parallel.spawn import WorkerFailed, workers_to_spawn


class FakeComm:
    """An mpi4py communicator as one rank sees it: bcast hands out rank 0's value."""

    def __init__(self, rank, size, node_rank=None, node_size=None, root_value=None):
        self.rank, self.size = rank, size
        self.node_rank = rank if node_rank is None else node_rank
        self.node_size = size if node_size is None else node_size
        self.root_value = root_value

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def bcast(self, value, root=0):
        return value if self.rank == root else self.root_value


@pytest.fixture
def fake_node(monkeypatch):
    monkeypatch.setattr(launch, "_mpi_node",
                        lambda comm: FakeComm(comm.node_rank, comm.node_size))


def test_no_launcher_is_one_process():
    assert launch_info({}) == LaunchInfo(0, 0, 1, "single")
    assert launch.rank_and_world_size({}) == (0, 1)
    assert not launch.started_by_launcher({})


def test_torchrun_environment():
    env = {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "MASTER_ADDR": "node0",
           "MASTER_PORT": "29400", "TORCHELASTIC_RESTART_COUNT": "2"}
    assert launch_info(env) == LaunchInfo(3, 1, 4, "torchrun", "node0", 29400)
    assert launch.rank_and_world_size(env) == (3, 4)
    assert launch.started_by_launcher(env)


def test_our_spawned_workers_say_so():
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "5000", launch.SPAWNED_BY: "42"}
    assert launch_info(env).launcher == "spawn"


def test_rank_without_local_rank_is_refused():
    with pytest.raises(DistributedError, match="LOCAL_RANK is not"):
        launch_info({"RANK": "0", "WORLD_SIZE": "2"})
    with pytest.raises(DistributedError, match=r"RANK='x': expected an integer"):
        launch_info({"RANK": "x", "LOCAL_RANK": "0", "WORLD_SIZE": "2"})


def test_open_mpi_rank_zero_picks_the_rendezvous(fake_node):
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    info = launch_info(env, FakeComm(0, 2))
    assert (info.rank, info.local_rank, info.world_size, info.launcher) == (0, 0, 2, "mpirun")
    assert info.master_addr == "127.0.0.1" and 0 < info.master_port < 65536


def test_open_mpi_other_ranks_take_rank_zeros_address(fake_node):
    env = {"OMPI_COMM_WORLD_RANK": "5", "OMPI_COMM_WORLD_SIZE": "8",
           "OMPI_COMM_WORLD_LOCAL_RANK": "1"}
    info = launch_info(env, FakeComm(5, 8, node_size=4, root_value=("node0.cluster", 4711)))
    assert info == LaunchInfo(5, 1, 8, "mpirun", "node0.cluster", 4711)


def test_several_hosts_rendezvous_at_rank_zeros_host_name(fake_node, monkeypatch):
    monkeypatch.setattr(launch.socket, "getfqdn", lambda: "gpu17.cluster")
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "4",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    assert launch_info(env, FakeComm(0, 4, node_size=2)).master_addr == "gpu17.cluster"


def test_mpich_without_a_local_rank_asks_the_node(fake_node):
    env = {"PMI_RANK": "3", "PMI_SIZE": "4"}
    info = launch_info(env, FakeComm(3, 4, node_rank=1, node_size=2,
                                     root_value=("head", 1234)))
    assert (info.rank, info.local_rank, info.world_size) == (3, 1, 4)
    assert launch.rank_and_world_size(env) == (3, 4)


def test_master_variables_win_under_mpirun(fake_node):
    env = {"PMI_RANK": "0", "PMI_SIZE": "2", "MPI_LOCALRANKID": "0", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "6000"}
    info = launch_info(env, FakeComm(0, 2))
    assert (info.master_addr, info.master_port) == ("10.0.0.1", 6000)


def test_mpirun_with_one_process_needs_no_rendezvous():
    info = launch_info({"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "1"})
    assert info == LaunchInfo(0, 0, 1, "mpirun")


# -- devices -----------------------------------------------------------------------------------

def test_the_cpu_when_asked_or_without_cuda(monkeypatch):
    one = LaunchInfo(0, 0, 1, "single")
    assert launch.pick_device("cpu", [0], one) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert launch.pick_device("auto", [3], one) == torch.device("cpu")
    with pytest.raises(OptionError, match="no CUDA device"):
        launch.pick_device("cuda", [0], one)


@pytest.mark.parametrize("gpus, local_rank, world, expected", [
    ([3], 0, 1, 3),              # one process: --gpu's first entry, as before
    ([2, 3], 1, 2, 3),           # --gpu 2,3 on two ranks: the local rank's entry
    ([0], 1, 2, 1),              # torchrun --nproc-per-node 2 ... --gpu 0: the local rank
])
def test_which_gpu_a_rank_uses(monkeypatch, gpus, local_rank, world, expected):
    chosen = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    info = LaunchInfo(local_rank, local_rank, world, "torchrun")
    assert launch.pick_device("auto", gpus, info) == torch.device("cuda", expected)
    assert chosen == [expected]


def test_a_gpu_list_shorter_than_the_local_ranks_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    with pytest.raises(OptionError, match="lists 2 GPUs, but this machine runs local rank 2"):
        launch.pick_device("cuda", [0, 1], LaunchInfo(2, 2, 4, "torchrun"))


def test_collective_timeout_from_the_environment():
    assert launch.timeout_seconds({}) == launch.DEFAULT_TIMEOUT_S < 60
    assert launch.timeout_seconds({launch.TIMEOUT_VAR: "10"}) == 10
    with pytest.raises(DistributedError, match="positive"):
        launch.timeout_seconds({launch.TIMEOUT_VAR: "0"})


# -- spawning ------------------------------------------------------------------------------------

def cli(*argv):
    return options.parse_command_line(list(argv))


def test_a_gpu_list_spawns_one_worker_per_entry_without_a_launcher():
    assert workers_to_spawn(cli("--gpu", "0,1", "--device", "cpu"), env={}) == 2
    assert workers_to_spawn(cli("--gpu", "0", "--device", "cpu"), env={}) == 1
    assert workers_to_spawn(cli("--device", "cpu"), env={}) == 1
    torchrun = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    assert workers_to_spawn(cli("--gpu", "0,1", "--device", "cpu"), env=torchrun) == 1
    assert workers_to_spawn(cli("--gpu", "0,1", "--device", "cpu", "--check-grads", "1"),
                            env={}) == 1


def test_spawning_for_missing_gpus_is_refused_once(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(OptionError, match="--gpu 0,1,2,3: this machine has 2 CUDA device"):
        workers_to_spawn(cli("--gpu", "0,1,2,3"), env={})


def test_a_failed_worker_reads_as_one_line_with_its_status():
    killed = WorkerFailed(1, -9)
    assert str(killed) == "worker rank 1 was killed by SIGKILL; the other workers were stopped"
    assert killed.exit_code == 137
    assert WorkerFailed(0, 2).exit_code == 2


# -- restarts ------------------------------------------------------------------------------------

def save_run(save_path, name, with_checkpoint=True):
    run = save_path / name
    run.mkdir(parents=True)
    if with_checkpoint:
        checkpoint.save(str(run), 1, 2, {"epoch": 1, "batchnum": 2})
    return str(run)


def test_a_first_start_resumes_nothing_by_itself(tmp_path):
    save_run(tmp_path, "ConvNet__2026-01-01_00.00.00")
    assert runplan.restart_checkpoint(cli("--save-path", str(tmp_path)), env={}) is None


def test_a_restart_resumes_the_newest_run_of_the_save_path(tmp_path):
    restart = {"TORCHELASTIC_RESTART_COUNT": "1"}
    save_run(tmp_path, "ConvNet__2026-01-01_00.00.00")
    newest = save_run(tmp_path, "ConvNet__2026-01-02_00.00.00")
    assert runplan.restart_checkpoint(cli("--save-path", str(tmp_path)), env=restart) == newest
    # This job's own directory without a checkpoint yet: start afresh, not an older run.
    save_run(tmp_path, "ConvNet__2026-01-03_00.00.00", with_checkpoint=False)
    assert runplan.restart_checkpoint(cli("--save-path", str(tmp_path)), env=restart) is None


def test_a_restart_resumes_the_directory_of_a_loaded_file(tmp_path):
    restart = {"TORCHELASTIC_RESTART_COUNT": "2"}
    run = save_run(tmp_path, "ConvNet__x")
    assert runplan.restart_checkpoint(cli("--load-file", f"{run}/1.2"), env=restart) == run
    assert runplan.restart_checkpoint(cli("--load-file", run), env=restart) == run
    # --save-file resumes by itself (spec §3.2)
    assert runplan.restart_checkpoint(cli("--save-file", run), env=restart) is None


def test_a_node_that_joins_a_restarted_job_resumes_with_it(tmp_path):
    """A replacement node's agent has restarted nothing; the job it joins has (build_run asks
    the ranks), and its workers resume the same checkpoint."""
    newest = save_run(tmp_path, "ConvNet__2026-01-02_00.00.00")
    first_start = {"TORCHELASTIC_RESTART_COUNT": "0"}
    assert not launch.agent_restarted(first_start)
    assert runplan.restart_checkpoint(cli("--save-path", str(tmp_path)), env=first_start) is None
    assert runplan.restart_checkpoint(cli("--save-path", str(tmp_path)), env=first_start,
                                      job_restarted=True) == newest


# -- lost peers ------------------------------------------------------------------------------------

def test_a_collective_that_lost_its_peer_reads_as_one_line():
    gloo = RuntimeError("[/__w/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read "
                        "error [127.0.0.1]:45478: Connection reset by peer. This is typically "
                        "caused by a remote worker hanging")
    with pytest.raises(DistributedError) as caught:
        with launch.peer_failures_reported():
            raise gloo
    assert str(caught.value) == ("lost contact with another rank (Read error "
                                 "[127.0.0.1]:45478: Connection reset by peer); that rank's own "
                                 "messages say why")
    with pytest.raises(RuntimeError, match="shape mismatch"):
        with launch.peer_failures_reported():
            raise RuntimeError("shape mismatch")
