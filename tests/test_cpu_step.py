"""The CPU decode step's in-place SSM update (alignment/rollout/cpu_step.py) against the mixer's own function."""

from __future__ import annotations

import pytest
import torch
from transformers.models.nemotron_h import modeling_nemotron_h as modeling

from alignment.rollout import cpu_step

from tests.test_ssm_step import inputs


@pytest.mark.parametrize("shape", [(5, 8, 2, 12, 16), (3, 6, 3, 20, 24), (7, 6, 1, 32, 16)])
def test_the_ssm_update_is_the_mixers(shape):
    ours, theirs = inputs(shape, "cpu"), inputs(shape, "cpu")
    before = ours["state"].clone()
    y = cpu_step.ssm_update(**ours)
    head_dim, dstate = shape[3], shape[4]
    expected = modeling.mamba2_selective_state_update(
        theirs["state"], theirs["x"], theirs["dt"][..., None].expand(-1, -1, head_dim),
        theirs["a"][:, None, None].expand(-1, head_dim, dstate), theirs["b"], theirs["c"],
        theirs["d"][:, None].expand(-1, head_dim), dt_bias=theirs["dt_bias"][:, None].expand(-1, head_dim),
        dt_softplus=True,
    )  # fmt: skip
    assert not torch.equal(ours["state"], before)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours["state"], theirs["state"], rtol=1e-5, atol=1e-5)


def test_the_ssm_update_refuses_a_state_below_float32():
    values = inputs((2, 4, 1, 8, 16), "cpu")
    with pytest.raises(ValueError, match="float32 state"):
        cpu_step.ssm_update(**(values | {"state": values["state"].to(torch.bfloat16)}))
