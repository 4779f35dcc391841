"""Where a rank runs under torchrun: the process-group backend and device follow the backend's
device (gloo on the CPU, nccl on cuda:LOCAL_RANK, hccl on npu:LOCAL_RANK), chosen once by
`parallel.place`; a mismatch is an error naming the setting. nccl and hccl cannot run on this
CPU-only torch: their choice is checked here as the pure function it is, and the refusal of a
backend this torch lacks through `join`; gloo runs end to end in tests/test_distributed.py."""

import pytest
import torch
import torch.distributed as dist

from v4hal.model.parallel import Layout, LayoutError, Placement, join, local_placement, place


@pytest.mark.parametrize("device, local_rank, count, expected", [
    ("cpu", 3, 0, Placement("gloo", "cpu")),
    ("cuda", 0, 8, Placement("nccl", "cuda:0")),
    ("cuda", 7, 8, Placement("nccl", "cuda:7")),
    ("npu", 5, 8, Placement("hccl", "npu:5"))])
def test_the_backend_and_device_follow_the_device_type(device, local_rank, count, expected):
    assert place(device, local_rank, count) == expected
    assert place(device, local_rank, count, expected.backend) == expected
    assert str(expected) == f"{expected.backend} on {expected.device}"


@pytest.mark.parametrize("device, requested, message", [
    ("cpu", "nccl", "--dist-backend nccl: the model runs on cpu, whose process-group backend is gloo; "
                    "nccl needs cuda devices"),
    ("cuda", "hccl", "--dist-backend hccl: the model runs on cuda, whose process-group backend is nccl; "
                     "hccl needs npu devices"),
    ("npu", "gloo", "--dist-backend gloo: the model runs on npu, whose process-group backend is hccl; "
                    "gloo needs cpu devices"),
    ("cpu", "mpi", "known: \\['gloo', 'hccl', 'nccl'\\]")])
def test_a_backend_that_does_not_fit_the_device_is_refused(device, requested, message):
    with pytest.raises(LayoutError, match=message):
        place(device, 0, 8, requested)


@pytest.mark.parametrize("device", ["cuda", "npu"])
def test_more_ranks_than_local_devices_is_refused(device):
    with pytest.raises(LayoutError, match=f"local rank 2 needs {device}:2, but this node has 2 {device} device"
                                          f"\\(s\\): start at most 2 processes per node"):
        place(device, 2, 2)
    with pytest.raises(LayoutError, match="this node has 0 cuda"):
        place("cuda", 0, 0)


def test_an_unknown_device_type_is_refused():
    with pytest.raises(LayoutError, match="no process-group backend known for device type 'meta'"):
        place("meta", 0, 1)


def test_this_process_is_placed_from_torchrun_environment(monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert local_placement(torch.device("cpu")) == Placement("gloo", "cpu")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # cuda:1 on a node with one GPU
    with pytest.raises(LayoutError, match="local rank 1 needs cuda:1, but this node has 1 cuda"):
        local_placement(torch.device("cuda"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert local_placement(torch.device("cuda")) == Placement("nccl", "cuda:1")


@pytest.mark.skipif(dist.is_nccl_available(), reason="this torch has nccl: the refusal cannot happen")
def test_a_backend_this_torch_lacks_is_refused_before_joining(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(LayoutError, match=r"layout tp=2 ep=1 pp=1 dp=1: process-group backend nccl \(for cuda:0\) "
                                          r"is not available in this torch"):
        join(Layout(tp=2), Placement("nccl", "cuda:0"), 1.0)
    assert not dist.is_initialized()
