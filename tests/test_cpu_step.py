"""The CPU decode step's in-place SSM update (alignment/rollout/cpu_step.py) against the mixer's own function."""

from __future__ import annotations

import pytest
import torch

from alignment.rollout import cpu_step

from tests.test_ssm_step import inputs, mixers_update


@pytest.mark.parametrize("shape", [(5, 8, 2, 12, 16), (3, 6, 3, 20, 24), (7, 6, 1, 32, 16)])
def test_the_ssm_update_is_the_mixers(shape):
    ours, theirs = inputs(shape, "cpu"), inputs(shape, "cpu")
    before = ours["state"].clone()
    y = cpu_step.ssm_update(**ours)
    expected = mixers_update(theirs)
    assert not torch.equal(ours["state"], before)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["state"], theirs["state"], rtol=1e-5, atol=1e-5)


def test_the_ssm_update_refuses_a_state_below_float32():
    values = inputs((2, 4, 1, 8, 16), "cpu")
    with pytest.raises(ValueError, match="float32 state"):
        cpu_step.ssm_update(**(values | {"state": values["state"].to(torch.bfloat16)}))


def test_the_static_decoder_takes_it_for_a_float32_cpu_state_only():
    assert cpu_step.ssm_update_chosen(torch.device("cpu"), torch.float32)
    assert not cpu_step.ssm_update_chosen(torch.device("cpu"), torch.bfloat16)
    assert not cpu_step.ssm_update_chosen(torch.device("cuda"), torch.float32)
