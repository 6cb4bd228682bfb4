"""What a run computes in depends on the machine: the precision `auto` resolves to, and the line
every benchmark prints so that its seconds can be read against the machine that made them."""

import os

import pytest
import torch

from fishcomp import context
from fishcomp.context import autocast_dtype, describe_machine


@pytest.mark.parametrize("native", [True, False])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, native):
    monkeypatch.setattr(context, "cpu_has_bf16", lambda: native)
    cpu = torch.device("cpu")
    assert autocast_dtype("auto", cpu) == (torch.bfloat16 if native else None)
    assert autocast_dtype("fp32", cpu) is None
    assert autocast_dtype("bf16", cpu) == torch.bfloat16  # asked for: honoured, even where emulated
    assert autocast_dtype("auto", torch.device("cuda")) == torch.float16


@pytest.mark.parametrize("native", [True, False])
def test_the_benchmarks_machine_line_says_cores_threads_torch_and_whether_bf16_is_native(monkeypatch, native):
    monkeypatch.setattr(context, "cpu_has_bf16", lambda: native)
    line = describe_machine()
    assert f"{os.cpu_count()} cores" in line and f"torch {torch.__version__} with {torch.get_num_threads()} threads" in line
    assert ("native bf16 (" in line) == native and ("bf16 only emulated" in line) == (not native)
