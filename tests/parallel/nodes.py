"""Node agents on this one host, as a cluster would start them: each with its own environment,
writing its console to files of its own. A node fails as a machine does: its agent and all its
workers die at once (torchrun starts each worker in a session of its own, so killing the
agent's process group would leave them running)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dp_helpers import REPO, child_pids, worker_env

PYTHON_DIR = Path(sys.executable).parent        # first on PATH: the scripts call `python`


class Node:
    def __init__(self, name, command, log_dir, env):
        self.name = name
        log_dir = Path(log_dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = log_dir / f"{name}.out", log_dir / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.process = subprocess.Popen(command, cwd=REPO, stdout=out, stderr=err,
                                            stdin=subprocess.DEVNULL, start_new_session=True,
                                            env=env)

    @property
    def out(self):
        return self.out_path.read_text()

    @property
    def err(self):
        return self.err_path.read_text()

    def kill(self):
        """The node fails: its agent and all its workers die at once. They are stopped first,
        so that none of them sees another die and acts on it. An agent that has ended is left
        alone: its id may be another process's by now (and it ended its workers itself)."""
        if self.process.poll() is not None:
            return
        tree = _process_tree(self.process.pid)
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            for pid in tree:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        self.process.wait()

    def wait(self, timeout):
        return self.process.wait(timeout=timeout)

    def __repr__(self):
        return f"--- {self.name} (exit {self.process.poll()})\n{self.out[-2500:]}\n" \
               f"--- {self.name} stderr\n{self.err[-2500:]}"


class Cluster:
    """The nodes a test started; stop() kills whatever is left of them."""

    def __init__(self, log_dir):
        self.log_dir = log_dir
        self.nodes = []

    def start(self, name, command, **env):
        # The launcher's variables come after worker_env, which clears those of this process.
        node = Node(name, command, self.log_dir,
                    {**worker_env(PYTHONUNBUFFERED="1", PATH=path_with(PYTHON_DIR)), **env})
        self.nodes.append(node)
        return node

    def wait(self, nodes, timeout):
        """The exit statuses of `nodes` once all have ended; fails the test after `timeout`."""
        deadline = time.monotonic() + timeout
        for node in nodes:
            try:
                node.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{node.name} still running after {timeout} s\n"
                                     + "\n".join(map(repr, self.nodes))) from None
        return [node.process.returncode for node in nodes]

    def wait_for_line(self, prefix, timeout, count=1):
        """The node whose console showed `count` lines starting with `prefix`."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for node in self.nodes:
                if sum(line.startswith(prefix) for line in node.out.splitlines()) >= count:
                    return node
            time.sleep(0.05)
        raise AssertionError(f"no {prefix!r} line within {timeout} s\n"
                             + "\n".join(map(repr, self.nodes)))

    def stop(self):
        for node in self.nodes:
            node.kill()


def _process_tree(root):
    """`root` and its live descendants."""
    tree, generation = [root], [root]
    while generation:
        generation = [child for pid in generation for child in child_pids(pid)]
        tree += generation
    return tree


def path_with(*directories):
    """PATH with `directories` first."""
    return os.pathsep.join([*map(str, directories), os.environ.get("PATH", "")])
