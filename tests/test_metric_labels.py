"""Label values the metrics module derives (no server needed)."""

from __future__ import annotations

from service.metrics import physical_gpu


def test_physical_gpu_follows_cuda_visible_devices():
    assert physical_gpu("cuda:0", "2,3") == "2" and physical_gpu("cuda:1", "2,3") == "3"
    assert physical_gpu("cuda:1", "") == "1"
    assert physical_gpu("cuda:0", "GPU-8f2e") == "GPU-8f2e"
    assert physical_gpu("cuda:5", "0,1") == "5"  # outside the list: what the worker said
