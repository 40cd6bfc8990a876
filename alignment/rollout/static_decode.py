"""Decoding a NemotronH hybrid from caches at fixed addresses, replayed as a CUDA graph on GPU.

Why: one decode step of the ~250M hybrid at batch 512 is well under 1 ms of GPU work, but issuing it through
transformers' forward takes ~16 ms of Python and kernel launches (`bench/bench_grpo.py --profile-generate`), so
rollouts wait on the host. A CUDA graph replays the whole step with one call, but every tensor it touches must keep
its address and shape, and transformers' DynamicCache grows the attention KV by concatenation on every step.

So the prompt is still prefilled by the model's own forward (the chunked scan, any prompt length). Its cache is then
copied into preallocated buffers: attention KV for `max_len` positions, Mamba conv and SSM states. Each decode step is
written here against the model's modules: the same weights, and the same decode functions the Mamba-2 mixer calls
(its modeling module's `causal_conv1d_update` and `mamba2_selective_state_update`: the causal-conv1d and mamba-ssm
kernels for CUDA tensors when those are installed, see alignment/mamba_kernels.py; on the CPU the SSM update is
written in place, alignment/rollout/cpu_step.py).
NemotronH attention has no positional encoding, so a step needs only each row's write position and the mask of
valid key positions.

Shapes cannot change between replays, so finished rows stay in the batch: they are fed a filler token (id 0) and
their outputs are ignored. Their compute is not saved, which costs little while a step is bound by the host (small
models) and up to the finished rows' share of the arithmetic when it is not (large models, large batches). The
continuous-batching engine (`alignment/rollout/continuous.py`) fills such rows again instead: `load_slots` writes another
prefill's rows into chosen rows (slots) of the buffers, and every row keeps its own write position; `moved_to`
continues chosen slots on a decoder of fewer rows (the engine's tail, once nothing waits). A Mamba state kept in the
model's dtype is updated by `alignment/rollout/ssm_step.py` on CUDA, a float32 one by the mixer's own function.

The eager form of the same step runs on any device; `tests/test_generation.py` checks it against transformers'
forward with its dynamic cache, and `bench/bench_generation.py` checks the graph against both on a GPU.
"""

from __future__ import annotations

import logging
import sys

import torch
import torch.nn.functional as F
from torch import nn

from alignment.mamba_kernels import route_kernels_by_device
from alignment.rollout import cpu_step
from alignment.rollout.ssm_step import ssm_step, ssm_step_chosen

log = logging.getLogger(__name__)

# Block types of NemotronH across transformers versions (`config.layers_block_type`).
MAMBA_BLOCKS = {"mamba", "linear_attention"}
ATTENTION_BLOCKS = {"attention", "full_attention"}
PLAIN_BLOCKS = {"mlp"}  # stateless: the block's own forward is used
POSITION_ROUND = 64  # KV buffers hold a multiple of this many positions, so one graph fits similar lengths
WARMUP_STEPS = 2  # eager steps before a capture (Triton autotuning, cuBLAS workspaces); they need room in the buffers
_LOGGED: set[tuple[torch.device, torch.dtype]] = set()  # the kernel path is logged once per device and state dtype


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The decoder blocks in order: modules with a `block_type` and a `mixer` (also under PEFT wrappers)."""
    return [m for m in model.modules() if isinstance(getattr(m, "block_type", None), str) and hasattr(m, "mixer")]


def _final_norm(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(getattr(module, "layers", None), nn.ModuleList) and hasattr(module, "norm_f"):
            return module.norm_f
    raise ValueError("no final norm (`norm_f`) next to the decoder layers")


def static_decode_unsupported(model: nn.Module) -> str | None:
    """Why `model` cannot decode on the static path, or None when it can."""
    blocks = _blocks(model)
    if not blocks:
        return f"{type(model).__name__} has no NemotronH blocks (a block_type and a mixer)"
    unknown = {b.block_type for b in blocks} - MAMBA_BLOCKS - ATTENTION_BLOCKS - PLAIN_BLOCKS
    if unknown:
        return f"block types {sorted(unknown)} have no static decode step"
    if any(not isinstance(getattr(b, "layer_idx", None), int) for b in blocks):
        return "a block has no layer_idx (its index in the cache)"
    try:
        _final_norm(model)
    except ValueError as error:
        return str(error)
    return None


def static_max_len(longest_prompt: int, max_new_tokens: int) -> int:
    """Positions the KV buffers hold: room for the longest prompt plus every new token, rounded up."""
    need = longest_prompt + max_new_tokens + WARMUP_STEPS
    return -(-need // POSITION_ROUND) * POSITION_ROUND


def _cache_states(cache, layer_idx: int, block_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(conv, ssm) of a Mamba layer or (keys, values) of an attention layer from transformers' cache after prefill.

    The one place that knows the cache's layout (the same in transformers 5.17 through 5.24).
    """
    layer = cache.layers[layer_idx]  # indexed like the model's decoder layers
    if block_type in MAMBA_BLOCKS:
        return layer.conv_states[0], layer.recurrent_states[0]
    return layer.keys, layer.values


class StaticDecoder:
    """Decode steps of a fixed batch of `batch_size` rows over at most `max_len` positions.

    Per batch of prompts: `start(cache, attention_mask)` with the prefill's cache, then `next(tokens, keep)` per step.
    With `use_graph` (CUDA only) the first `start` warms the step up, captures it, and every `next` replays it.
    """

    def __init__(self, model: nn.Module, batch_size: int, max_len: int, *, use_graph: bool,
                 ssm_state_dtype: torch.dtype = torch.float32):
        reason = static_decode_unsupported(model)
        if reason:
            raise ValueError(f"static decoding is not available: {reason}")
        self.model = model
        self.device = next(model.parameters()).device
        if use_graph and self.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device, the model is on {self.device}")
        self.blocks = _blocks(model)
        self.embed = model.get_input_embeddings()
        self.norm_f = _final_norm(model)
        self.lm_head = model.get_output_embeddings()
        mamba = next((b.mixer for b in self.blocks if b.block_type in MAMBA_BLOCKS), None)
        modeling = sys.modules[type(mamba).__module__] if mamba is not None else None
        route_kernels_by_device(model)  # before the look-up below: a CPU step must not reach a CUDA kernel
        # The functions the mixer's own decode branch calls: kernel on CUDA when installed, PyTorch reference
        # otherwise; on the CPU a float32 SSM state takes alignment/rollout/cpu_step.py (the same arithmetic, faster).
        self.conv_update = getattr(modeling, "causal_conv1d_update", None)
        self.state_update = getattr(modeling, "mamba2_selective_state_update", None)
        self.batch_size, self.max_len, self.use_graph = batch_size, max_len, use_graph
        if mamba is not None and (self.device, ssm_state_dtype) not in _LOGGED:
            _LOGGED.add((self.device, ssm_state_dtype))
            if ssm_step_chosen(self.device, ssm_state_dtype):
                updater = "alignment.rollout.ssm_step (Triton)"
            elif cpu_step.ssm_update_chosen(self.device, ssm_state_dtype):
                updater = "alignment.rollout.cpu_step (in place)"
            else:
                updater = f"{getattr(self.state_update, '__module__', '?')}.{getattr(self.state_update, '__name__', '?')}"
            log.info("static decode on %s: %s SSM state, updated by %s", self.device, str(ssm_state_dtype)[6:], updater)
        self.ssm_state_dtype = ssm_state_dtype  # float32 as transformers' cache holds it, or the model's dtype
        self.states: list[tuple[torch.Tensor, torch.Tensor] | None] | None = None  # per block, allocated on start
        self.input_ids = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B] token fed this step
        self.position = torch.zeros(batch_size, dtype=torch.long, device=self.device)  # [B] column each row writes
        self.slot_index = torch.arange(batch_size, device=self.device)  # [B] for per-row writes
        self.true = torch.ones((), dtype=torch.bool, device=self.device)  # a Python True would be copied from the host
        # After `start` all rows write one column (the path measured on GPUs); after `load_slots` each its own.
        # A captured graph holds the ops of one of the two: a decoder serves either a static batch or the engine.
        self.shared_column = True
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=self.device)  # [B, L] keys to attend
        self.rows = torch.arange(batch_size)  # batch rows still decoding (on the host: no sync to index with it)
        self.rows_on_device = self.rows.to(self.device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None  # [B, V] the captured step's output

    # --- per batch --------------------------------------------------------------------------------------------

    def start(self, cache, attention_mask: torch.Tensor) -> None:
        """Load a prefill: transformers' cache after the prompt forward and its [B, width] mask (left padding)."""
        batch, width = attention_mask.shape
        if batch != self.batch_size or width + WARMUP_STEPS >= self.max_len:
            raise ValueError(f"a [{batch}, {width}] prefill does not fit a decoder of {self.batch_size} rows x "
                             f"{self.max_len} positions")
        if self.graph is not None and not self.shared_column:
            raise RuntimeError("this decoder's graph was captured for slots (load_slots); use a new decoder")
        if self.states is None:
            self._allocate(cache)
        self._load(cache, attention_mask)
        if self.use_graph and self.graph is None:
            self._capture()
            self._load(cache, attention_mask)  # the warm-up steps moved the states on

    def next(self, tokens: list[int], keep: list[int]) -> torch.Tensor:
        """Feed `tokens` to the rows `keep` (indices into the rows still decoding); return their logits [len(keep), V].

        The other rows have finished: they are fed token 0 from now on and their logits are no longer returned.
        """
        if len(keep) < len(self.rows):
            self.rows = self.rows[torch.tensor(keep)]
            self.rows_on_device = self.rows.to(self.device)
        fed = torch.zeros(self.batch_size, dtype=torch.long)
        fed[self.rows] = torch.tensor(tokens)
        self.input_ids.copy_(fed)
        if self.graph is not None:
            self.graph.replay()
            logits = self.logits
        else:
            logits = self._step()
        return logits[self.rows_on_device]

    # --- per slot (the continuous-batching engine) ------------------------------------------------------------

    def load_slots(self, cache, attention_mask: torch.Tensor, rows: list[int], slots: list[int]) -> None:
        """Write prefill row `rows[k]` (transformers' cache, [n, width] left-padded mask) into slot `slots[k]`.

        The slot's Mamba states become the row's, its KV buffer the row's keys and values (zeros after them), its
        valid mask the row's, and its write position the prefill width. Other slots are untouched. A row may go to
        several slots: a prompt prefilled once serves every sample of its group.
        """
        width = attention_mask.shape[1]
        if width + WARMUP_STEPS >= self.max_len:
            raise ValueError(f"a {width}-token prefill does not fit a decoder of {self.max_len} positions")
        if self.graph is not None and self.shared_column:
            raise RuntimeError("this decoder's graph was captured for a static batch (start); use a new decoder")
        if self.states is None:
            self._allocate(cache)
        source = torch.tensor(rows, device=self.device)
        target = torch.tensor(slots, device=self.device)
        for block, state in zip(self.blocks, self.states):
            if state is None:
                continue
            first, second = _cache_states(cache, block.layer_idx, block.block_type)
            if block.block_type in MAMBA_BLOCKS:
                state[0][target] = first[source].to(state[0].dtype)
                state[1][target] = second[source].to(state[1].dtype)
            else:
                for buffer, prefill in zip(state, (first, second)):
                    rows_kv = torch.zeros_like(buffer[target])  # stale keys could be non-finite (0 * inf = nan)
                    rows_kv[:, :, :width] = prefill[source]
                    buffer[target] = rows_kv
        valid = torch.zeros(len(slots), self.max_len, dtype=torch.bool, device=self.device)
        valid[:, :width] = attention_mask[source].bool()
        self.valid[target] = valid
        self.position[target] = width
        self.shared_column = False  # slots filled at different times write different columns
        if self.use_graph and self.graph is None:
            self._capture_keeping_state()

    def free_slots(self, slots: list[int]) -> None:
        """Park finished slots: they write at column 0 of their own row until `load_slots` fills them again."""
        target = torch.tensor(slots, device=self.device)
        self.valid[target] = False
        self.position[target] = 0

    def moved_to(self, slots: list[int], batch_size: int) -> StaticDecoder:
        """A new decoder of `batch_size` rows whose row k continues slot `slots[k]` of this one; its other rows are
        parked. The continuous engine's tail: once nothing waits, the samples left move to a smaller step."""
        if len(slots) > batch_size:
            raise ValueError(f"{len(slots)} slots do not fit a decoder of {batch_size} rows")
        if self.states is None:
            raise RuntimeError("nothing to move: no slot was loaded")
        moved = StaticDecoder(self.model, batch_size, self.max_len, use_graph=self.use_graph,
                              ssm_state_dtype=self.ssm_state_dtype)
        source = torch.tensor(slots, device=self.device)
        moved.states = []
        for state in self.states:
            if state is None:
                moved.states.append(None)
                continue
            copies = []
            for buffer in state:  # conv and SSM states, or keys and values
                rows = buffer.new_zeros(batch_size, *buffer.shape[1:])
                rows[: len(slots)] = buffer[source]
                copies.append(rows)
            moved.states.append(tuple(copies))
        moved.valid[: len(slots)] = self.valid[source]
        moved.position[: len(slots)] = self.position[source]
        moved.shared_column = False
        if moved.use_graph:
            moved._capture_keeping_state()
        return moved

    def step_slots(self, tokens: list[int]) -> torch.Tensor:
        """Feed one token to every slot (a filler for free ones); return the logits of every slot [B, V]."""
        self.input_ids.copy_(torch.tensor(tokens))
        if self.graph is not None:
            self.graph.replay()
            return self.logits
        return self._step()

    # --- buffers ----------------------------------------------------------------------------------------------

    def _allocate(self, cache) -> None:
        self.states = []
        for block in self.blocks:
            if block.block_type in MAMBA_BLOCKS:
                conv, ssm = _cache_states(cache, block.layer_idx, block.block_type)  # [n, ...]: n may not be B
                self.states.append((conv.new_zeros(self.batch_size, *conv.shape[1:]),
                                    ssm.new_zeros(self.batch_size, *ssm.shape[1:], dtype=self.ssm_state_dtype)))
            elif block.block_type in ATTENTION_BLOCKS:
                keys, _ = _cache_states(cache, block.layer_idx, block.block_type)  # [n, H_kv, width, head_dim]
                shape = (self.batch_size, keys.shape[1], self.max_len, keys.shape[3])
                self.states.append((keys.new_zeros(shape), keys.new_zeros(shape)))
            else:
                self.states.append(None)

    def _load(self, cache, attention_mask: torch.Tensor) -> None:
        width = attention_mask.shape[1]
        for block, state in zip(self.blocks, self.states):
            if state is None:
                continue
            first, second = _cache_states(cache, block.layer_idx, block.block_type)
            if block.block_type in MAMBA_BLOCKS:
                state[0].copy_(first)
                state[1].copy_(second)
            else:
                for buffer, prefill in zip(state, (first, second)):
                    buffer.zero_()  # stale keys of an earlier batch could be non-finite; masked or not, 0 * inf = nan
                    buffer[:, :, :width].copy_(prefill)
        self.valid.zero_()
        self.valid[:, :width] = attention_mask.bool()
        self.position.fill_(width)
        self.shared_column = True
        self.rows = torch.arange(self.batch_size)
        self.rows_on_device = self.rows.to(self.device)

    # --- the step ---------------------------------------------------------------------------------------------

    def _step(self) -> torch.Tensor:
        """One token per row at its column `position`: returns [B, V] float logits and advances the columns."""
        if self.shared_column:  # one prefill for the whole batch: every row writes the same column
            self.valid.index_fill_(1, self.position[:1], True)
        else:
            self.valid.index_put_((self.slot_index, self.position), self.true)  # a device value: capturable
        hidden = self.embed(self.input_ids[:, None])  # [B, 1, D]
        for block, state in zip(self.blocks, self.states):
            mixed = block.norm(hidden.to(block.norm.weight.dtype))
            if block.block_type in MAMBA_BLOCKS:
                mixed = self._mamba(block.mixer, mixed, *state)
            elif block.block_type in ATTENTION_BLOCKS:
                mixed = self._attention(block.mixer, mixed, *state)
            else:
                mixed = block.mixer(mixed)
            hidden = hidden + mixed
        logits = self.lm_head(self.norm_f(hidden)[:, -1]).float()  # [B, V]
        self.position.add_(1)
        return logits

    def _mamba(self, mixer: nn.Module, x: torch.Tensor, conv: torch.Tensor, ssm: torch.Tensor) -> torch.Tensor:
        """The Mamba-2 mixer's single-token branch, states updated in place. x: [B, 1, D]."""
        batch, heads, head_dim = x.shape[0], mixer.num_heads, mixer.head_dim
        groups, state_size = mixer.n_groups, mixer.ssm_state_size
        gate, xbc, dt = mixer.in_proj(x).split([mixer.intermediate_size, mixer.conv_dim, heads], dim=-1)
        xbc = self.conv_update(
            xbc.transpose(1, 2), conv, mixer.conv1d.weight.squeeze(1), mixer.conv1d.bias, activation=mixer.activation
        ).transpose(1, 2)  # [B, 1, conv_dim]
        xs, b, c = xbc.split([mixer.intermediate_size, groups * state_size, groups * state_size], dim=-1)
        a = -torch.exp(mixer.A_log.float())  # [H]
        if ssm_step_chosen(ssm.device, ssm.dtype):  # a bf16 state: whole heads per program (rollout/ssm_step.py)
            y = ssm_step(ssm, xs.reshape(batch, heads, head_dim), dt[:, 0], a, b.reshape(batch, groups, state_size),
                         c.reshape(batch, groups, state_size), mixer.D, mixer.dt_bias)
        elif cpu_step.ssm_update_chosen(ssm.device, ssm.dtype):  # a float32 CPU state, in place (rollout/cpu_step.py)
            y = cpu_step.ssm_update(ssm, xs.reshape(batch, heads, head_dim), dt[:, 0], a,
                                    b.reshape(batch, groups, state_size), c.reshape(batch, groups, state_size),
                                    mixer.D, mixer.dt_bias)
        else:
            y = self.state_update(
                ssm,
                xs.reshape(batch, heads, head_dim),
                dt.transpose(1, 2).expand(-1, -1, head_dim),  # [B, H, P]
                a[:, None, None].expand(-1, head_dim, state_size),  # [H, P, N]
                b.reshape(batch, groups, state_size),
                c.reshape(batch, groups, state_size),
                mixer.D[:, None].expand(-1, head_dim),
                z=None,
                dt_bias=mixer.dt_bias[:, None].expand(-1, head_dim),
                dt_softplus=True,
            )  # [B, H, P]
        y = mixer.norm(y.reshape(batch, 1, -1), gate)
        return mixer.out_proj(y.to(x.dtype))

    def _attention(self, attn: nn.Module, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Attention of one new token over the valid positions, its key and value written at each row's `position`."""
        batch, head_dim, kv_heads = x.shape[0], attn.head_dim, keys.shape[1]
        new_keys = attn.k_proj(x).view(batch, kv_heads, 1, head_dim)
        new_values = attn.v_proj(x).view(batch, kv_heads, 1, head_dim)
        if self.shared_column:
            keys.index_copy_(2, self.position[:1], new_keys)
            values.index_copy_(2, self.position[:1], new_values)
        else:
            keys[self.slot_index, :, self.position] = new_keys[:, :, 0]
            values[self.slot_index, :, self.position] = new_values[:, :, 0]
        # Grouped-query attention without copying the KV: the query heads that share a KV head (consecutive, as in
        # transformers' repeat_kv) become that head's queries. [B, H_kv, H_q / H_kv, head_dim]
        query = attn.q_proj(x).view(batch, kv_heads, -1, head_dim)
        if query.device.type == "cpu":
            # No graph to keep static on the CPU: read the cache only up to the furthest column written, and use
            # plain matmuls (SDPA's CPU kernel is slow on one query per head against a masked cache).
            width = int(self.position.max()) + 1
            scores = torch.matmul(query, keys[:, :, :width].transpose(-1, -2)) * attn.scaling  # [B, H_kv, H_q/H_kv, W]
            scores = scores.masked_fill(~self.valid[:, None, None, :width], -torch.inf)
            out = torch.matmul(scores.softmax(dim=-1), values[:, :, :width])
        else:
            out = F.scaled_dot_product_attention(
                query, keys, values, attn_mask=self.valid[:, None, None, :], scale=attn.scaling
            )
        return attn.o_proj(out.reshape(batch, 1, -1))

    def _capture_keeping_state(self) -> None:
        """Capture the step, then put back the states, masks and positions its warm-up steps moved on."""
        saved = [None if s is None else (s[0].clone(), s[1].clone()) for s in self.states]
        valid_saved, position_saved = self.valid.clone(), self.position.clone()
        self._capture()
        for state, copy in zip(self.states, saved):
            if state is not None:
                state[0].copy_(copy[0])
                state[1].copy_(copy[1])
        self.valid.copy_(valid_saved)
        self.position.copy_(position_saved)

    def _capture(self) -> None:
        """Warm the step up on a side stream (Triton autotuning, cuBLAS workspaces), then record it."""
        current = torch.cuda.current_stream(self.device)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(current)
        with torch.cuda.stream(side):
            for _ in range(WARMUP_STEPS):
                self._step()
        current.wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # thread_local: CUDA calls from other threads (GRPO scores rewards beside generation) must not break capture.
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            self.logits = self._step()
        self.graph = graph
        log.info("decode step captured as a CUDA graph: %d rows x %d positions", self.batch_size, self.max_len)
