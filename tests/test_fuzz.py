"""Property test: Hypothesis draws shapes, dtypes, memory layouts and options
for every loss and checks fusedloss against torch (fusedloss.testing's rules).
Bounded for CI; bench/soak.py runs the same generator for 10^4 cases."""

import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fusedloss import _fuzz  # noqa: E402
from fusedloss.testing import assert_matches_torch  # noqa: E402


@pytest.mark.parametrize("loss", _fuzz.LOSSES)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(data=st.data())
def test_random_cases_match_torch(loss, data):
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    case = _fuzz.draw_case(loss, torch.Generator().manual_seed(seed), device="cpu")
    assert_matches_torch(case.name, *case.args, native=case.native, **case.kwargs)
