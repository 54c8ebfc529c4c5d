"""A short soak (scripts/soak.py) in both preemption modes: random requests, aborts from another thread,
bad requests among them; afterwards nothing leaked and every request got one final output with a reason.
docs/reliability.md records the long run."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "soak.py"


def _load_soak():
    spec = importlib.util.spec_from_file_location("soak_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_a_short_soak_leaks_nothing_and_loses_nothing(mode):
    report = _load_soak().run_soak(mode, num_requests=100, seed=7, abort_every_s=0.03)
    assert report.problems == []
    assert report.num_requests > 80 and report.num_aborted > 0 and report.num_preemptions > 0
    assert report.num_refused > 0  # the bad requests among them were refused alone
    if mode == "swap":
        assert report.num_swap_outs > 0
