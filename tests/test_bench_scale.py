"""bench/bench_scale.py's accounting: the matmul parameters of the MFU formula and the decode state bytes of its bound,
against the architecture written out by hand."""

import sys
from pathlib import Path

import torch

from alignment.modeling import ModelConfig, load_model
from tests.conftest import TINY_MODEL

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

import bench_scale  # noqa: E402


def test_flop_model_of_nano9b_counts_every_matmul_but_the_input_embedding():
    model = load_model(ModelConfig(name_or_path=str(bench_scale.MODELS["nano9b"].config_file), dtype="bfloat16"),
                       "meta")
    flops = bench_scale.FlopModel.of(model)
    d, v = 4480, 131072
    mamba = d * (2 * 128 * 80 + 2 * 8 * 128 + 128) + 128 * 80 * d  # in_proj (z, xBC, dt), out_proj
    attention = d * 40 * 128 + 2 * d * 8 * 128 + 40 * 128 * d  # q, k, v, o
    mlp = 2 * d * 15680  # up, down (relu2: no gate)
    assert flops.matmul_params == 27 * mamba + 4 * attention + 25 * mlp + v * d  # + lm_head
    assert (flops.mamba_layers, flops.attention_layers, flops.attention_width) == (27, 4, 5120)
    H, P, N, G, Q = 128, 80, 128, 8, 128
    assert flops.scan_per_token == H * Q * P + G * Q * N + 4 * H * N * P + 2 * H * N * P / Q
    # One sample of L tokens: linear, adapter, attention and scan terms as the docstring writes them.
    L, A = 1000, 10
    expected = L * (4 * flops.matmul_params + 6 * A) + 3 * (4 * 2 * 5120 * L * L + 27 * flops.scan_per_token * L)
    assert flops.lora_step([L], A) == expected


def test_decode_state_bytes_are_the_conv_and_ssm_states_and_one_kv_position():
    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL)), "cpu").eval()
    states = bench_scale.decode_state_bytes(model, "cpu")
    c = model.config  # float32 model: every state 4 bytes
    conv_dim = c.mamba_num_heads * c.mamba_head_dim + 2 * c.n_groups * c.ssm_state_size
    per_layer = conv_dim * c.conv_kernel * 4 + c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size * 4
    assert states["mamba_state_bytes_per_row"] == 4 * per_layer  # 4 Mamba layers in M-M*-M-M*-
    assert states["kv_bytes_per_row_position"] == 2 * 2 * c.num_key_value_heads * c.head_dim * 4  # 2 layers, K and V
    half = bench_scale.decode_state_bytes(model, "cpu", ssm_dtype=torch.bfloat16)  # rollout.ssm_state_dtype: model
    assert half["mamba_state_bytes_per_row"] == states["mamba_state_bytes_per_row"] \
        - 4 * c.mamba_num_heads * c.mamba_head_dim * c.ssm_state_size * 2
    bound = bench_scale.decode_bound(model, states, batch=2, context=10, hbm_tbps=1.0)
    assert bound["bytes_per_step"] == bound["bytes_weights"] + 2 * 2 * states["mamba_state_bytes_per_row"] \
        + 2 * 11 * states["kv_bytes_per_row_position"]
    assert torch.isclose(torch.tensor(bound["bound_tokens_per_s"]), torch.tensor(2 / (bound["bytes_per_step"] / 1e12)))


def test_zero_memory_counts_the_cache_the_rollout_engine_allocates():
    """bench/zero_memory.py's rollout cache against the bytes of the decoder's own buffers, for both SSM dtypes."""
    import zero_memory
    from alignment.rollout.generation import prefill
    from alignment.rollout.static_decode import StaticDecoder

    model = load_model(ModelConfig(name_or_path=str(TINY_MODEL), dtype="bfloat16"))
    _, cache, mask = prefill(model, [[5, 6, 7]], pad_token_id=0)
    for ssm_dtype, fp32 in ((torch.bfloat16, False), (torch.float32, True)):
        decoder = StaticDecoder(model, batch_size=3, max_len=40, use_graph=False, ssm_state_dtype=ssm_dtype)
        decoder.load_slots(cache, mask, rows=[0], slots=[1])
        allocated = sum(t.numel() * t.element_size() for state in decoder.states if state for t in state)
        counts = (sum(p.numel() for p in model.parameters()), 0)
        planned = zero_memory.plan(str(TINY_MODEL), world=1, rollout_batch=3, context=40, row_tokens=1,
                                   ssm_fp32=fp32, counts=counts)
        assert planned["rollout_cache"] * zero_memory.GB == allocated
