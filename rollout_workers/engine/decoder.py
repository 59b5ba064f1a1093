"""The embedded engine's forward pass: a Llama/Qwen2 model's own modules over the slot KV cache.

HF's forward re-pads a left-aligned cache as rows join and leave and costs hundreds of Python
calls per layer. Here the model's own weights (so a weight update is seen as it is) run in
fewer, larger kernels: the Q/K/V and gate/up projections are fused (the parameters become
views of one tensor each), norms are fused RMSNorms, RoPE rotates queries and keys at once,
residual additions happen inside the GEMMs, and attention reads the slot cache in place. A
decode step folds the query heads that share a KV head into the query-length axis, so
grouped-query attention needs no repeated keys, and on CUDA it is replayed from a CUDA graph
captured once per (batch bucket, length bucket), its logits float32 out of the GEMM.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rollout_workers.engine.kv_cache import SlotCache, batch_bucket, column_bucket

log = logging.getLogger(__name__)

FAMILIES = ("llama", "qwen2")
# RoPE variants whose angles depend on the position alone (a table per position holds them).
STATIC_ROPE = ("default", "linear", "llama3", "yarn")


def unsupported(config) -> str | None:
    """Why the embedded engine cannot run this model, or None."""
    if config.model_type not in FAMILIES:
        return (
            f"model type {config.model_type!r} (the embedded engine runs {', '.join(FAMILIES)}; use engine.kind=sglang)"
        )
    if getattr(config, "use_sliding_window", False):
        return "sliding-window attention"
    rope = (getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}).get(
        "rope_type", "default"
    )
    if rope not in STATIC_ROPE:
        return f"rope type {rope!r} (its angles depend on the sequence length)"
    return None


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """RoPE as x·cos + roll(x)·sin with the sine's first half negated (the table holds it so): the
    rotation of HF's rotate_half in three kernels, for queries and keys at once."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin_signed)


def _fuse(linears: list[torch.nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One weight (and bias) holding the linears' output rows, whose parameters become views of it:
    one GEMM instead of several, and updates through the model's state dict land in the fused tensor."""
    biases = [linear.bias is not None for linear in linears]
    if any(biases) != all(biases):
        raise ValueError("the embedded engine cannot fuse projections of which only some have a bias")
    weight = torch.cat([linear.weight.data for linear in linears])
    bias = torch.cat([linear.bias.data for linear in linears]) if all(biases) else None
    start = 0
    for linear in linears:
        rows = linear.weight.shape[0]
        linear.weight.data = weight[start : start + rows]
        if bias is not None:
            linear.bias.data = bias[start : start + rows]
        start += rows
    return weight, bias


def _linear_residual(residual: torch.Tensor, x: torch.Tensor, linear: torch.nn.Linear) -> torch.Tensor:
    """residual + linear(x), the addition inside the GEMM."""
    base = residual if linear.bias is None else residual + linear.bias
    flat = torch.addmm(base.reshape(-1, base.shape[-1]), x.reshape(-1, x.shape[-1]), linear.weight.t())
    return flat.view(residual.shape)


@dataclass
class FusedLayer:
    """A decoder layer's weights as the engine's forward uses them (the model's own tensors)."""

    layer: torch.nn.Module
    qkv_weight: torch.Tensor
    qkv_bias: torch.Tensor | None
    gate_up_weight: torch.Tensor
    gate_up_bias: torch.Tensor | None

    @classmethod
    def of(cls, layer: torch.nn.Module) -> FusedLayer:
        attn, mlp = layer.self_attn, layer.mlp
        return cls(layer, *_fuse([attn.q_proj, attn.k_proj, attn.v_proj]), *_fuse([mlp.gate_proj, mlp.up_proj]))

    def is_bound(self) -> bool:
        """Still the model's tensors (moving the model between devices gives it new ones)."""
        return self.layer.self_attn.q_proj.weight.data_ptr() == self.qkv_weight.data_ptr()


class Decoder:
    def __init__(self, model, device: torch.device, cuda_graph_max_bs: int = 0):
        config = model.config
        if reason := unsupported(config):
            raise ValueError(f"the embedded engine cannot run this model: {reason}")
        self.model = model
        self.device = device
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.hidden_size = config.hidden_size
        self.scale = self.head_dim**-0.5
        self.context_length = int(getattr(config, "max_position_embeddings", 0) or 2048)
        self.cache = SlotCache(config.num_hidden_layers, self.kv_heads, self.head_dim, model.dtype, device)
        self.layers: list[FusedLayer] = []
        self._bind()
        self.logits_dtype = torch.float32 if _float32_head(model.dtype, device) else model.dtype
        self.graphs = DecodeGraphs(self, cuda_graph_max_bs) if device.type == "cuda" and cuda_graph_max_bs else None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    def _bind(self) -> None:
        if not (self.layers and all(fused.is_bound() for fused in self.layers)):
            self.layers = [FusedLayer.of(layer) for layer in self.model.model.layers]

    def reset(self) -> None:
        """Forget the cache and everything captured over the weights (they moved, or memory is released)."""
        self.cache.clear()
        self._rope = None
        self._bind()
        if self.graphs is not None:
            self.graphs.clear()

    def rope(self) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and signed sin (see _rotate) of every position, from the model's own rotary module
        (its scaling included)."""
        if self._rope is None:
            inner = self.model.model
            positions = torch.arange(self.context_length, device=self.device).unsqueeze(0)
            probe = torch.empty(0, dtype=self.model.dtype, device=self.device)
            cos, sin = inner.rotary_emb(probe, positions)
            half = self.head_dim // 2
            self._rope = cos[0], torch.cat((-sin[0, :, :half], sin[0, :, half:]), dim=-1)
        return self._rope

    def _norm(self, norm: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(hidden, (self.hidden_size,), norm.weight, norm.variance_epsilon)

    def _qkv(self, fused: FusedLayer, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rotated queries and keys and the values, (..., heads, head_dim) each, of hidden (..., hidden)."""
        x = self._norm(fused.layer.input_layernorm, hidden)
        qkv = F.linear(x, fused.qkv_weight, fused.qkv_bias)
        qk_width = (self.heads + self.kv_heads) * self.head_dim
        qk = _rotate(qkv[..., :qk_width].unflatten(-1, (self.heads + self.kv_heads, self.head_dim)), cos, sin)
        v = qkv[..., qk_width:].unflatten(-1, (self.kv_heads, self.head_dim))
        return qk[..., : self.heads, :], qk[..., self.heads :, :], v

    def _mlp(self, fused: FusedLayer, hidden: torch.Tensor) -> torch.Tensor:
        """hidden + the layer's MLP of it."""
        mlp = fused.layer.mlp
        x = self._norm(fused.layer.post_attention_layernorm, hidden)
        gate, up = F.linear(x, fused.gate_up_weight, fused.gate_up_bias).chunk(2, dim=-1)
        return _linear_residual(hidden, mlp.act_fn(gate) * up, mlp.down_proj)

    # ---- prefill: new rows' tokens, written into their slots ----

    def prefill(self, tokens: torch.Tensor, first: int, start: int) -> torch.Tensor:
        """Final hidden states (n, T, hidden) of right-padded `tokens` (n, T), stored in slots
        [first, first + n) from column `start`; start > 0 (a later chunk of one long row) attends
        to the columns before it."""
        n, width = tokens.shape
        self.cache.reserve(first + n, start + width)
        cos, sin = (table[start : start + width].unsqueeze(1) for table in self.rope())  # (T, 1, dim)
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)
        slots, columns = slice(first, first + n), slice(start, start + width)
        causal = None
        if start:
            seen = torch.arange(start + width, device=self.device).unsqueeze(0)
            causal = seen <= (start + torch.arange(width, device=self.device)).unsqueeze(1)
        for fused, keys, values in zip(self.layers, self.cache.keys, self.cache.values, strict=True):
            q, k, v = (t.transpose(1, 2) for t in self._qkv(fused, hidden, cos, sin))  # (n, heads, T, dim)
            keys[slots, :, columns] = k
            values[slots, :, columns] = v
            if start:
                k, v = keys[slots, :, : start + width], values[slots, :, : start + width]
            o = F.scaled_dot_product_attention(
                q, k, v, attn_mask=causal, is_causal=causal is None, scale=self.scale, enable_gqa=True
            )
            hidden = _linear_residual(hidden, o.transpose(1, 2).reshape(n, width, -1), fused.layer.self_attn.o_proj)
            hidden = self._mlp(fused, hidden)
        return self._norm(inner.norm, hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.lm_head(hidden)

    # ---- decode: one token for each of the first `rows` slots ----

    def decode(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        """Logits (rows, vocab) of each row's next token; `tokens` and `positions` (rows,) are where
        they go in the cache, `longest` bounds positions + 1 (known on the host: no sync)."""
        rows = tokens.shape[0]
        self.cache.reserve(rows, longest)
        if self.graphs is not None and rows <= self.graphs.max_rows:
            return self.graphs.run(tokens, positions, longest)
        slots = torch.arange(rows, device=self.device)
        return self.decode_step(tokens, positions, slots, longest)

    def decode_step(
        self, tokens: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, columns: int, out=None
    ) -> torch.Tensor:
        """The step itself (what a graph captures): rows = len(tokens) reads slots [0, rows)."""
        rows = tokens.shape[0]
        cos_table, sin_table = self.rope()
        cos, sin = cos_table[positions].unsqueeze(1), sin_table[positions].unsqueeze(1)  # (rows, 1, dim)
        visible = torch.arange(columns, device=self.device).unsqueeze(0) <= positions.unsqueeze(1)
        mask = torch.zeros(visible.shape, dtype=self.model.dtype, device=self.device)
        mask = mask.masked_fill(~visible, float("-inf")).view(rows, 1, 1, columns)
        group = self.heads // self.kv_heads
        inner = self.model.model
        hidden = inner.embed_tokens(tokens)  # (rows, hidden)
        for fused, keys, values in zip(self.layers, self.cache.keys, self.cache.values, strict=True):
            q, k, v = self._qkv(fused, hidden, cos, sin)
            keys[slots, :, positions] = k
            values[slots, :, positions] = v
            o = F.scaled_dot_product_attention(
                q.reshape(rows, self.kv_heads, group, self.head_dim),
                keys[:rows, :, :columns],
                values[:rows, :, :columns],
                attn_mask=mask,
                scale=self.scale,
            )
            hidden = _linear_residual(hidden, o.reshape(rows, -1), fused.layer.self_attn.o_proj)
            hidden = self._mlp(fused, hidden)
        hidden = self._norm(inner.norm, hidden)
        if out is None:
            return self.model.lm_head(hidden)
        head = self.model.lm_head.weight
        if out.dtype != hidden.dtype:  # float32 logits straight from the GEMM's accumulator
            return torch.mm(hidden, head.t(), out_dtype=out.dtype, out=out)
        return torch.mm(hidden, head.t(), out=out)


def _float32_head(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether this device's GEMM writes float32 out of half-precision inputs (CUDA's does)."""
    if dtype == torch.float32:
        return False
    probe = torch.ones((2, 2), dtype=dtype, device=device)
    try:
        torch.mm(probe, probe, out_dtype=torch.float32, out=torch.empty((2, 2), device=device))
    except (RuntimeError, NotImplementedError, TypeError):
        return False
    return True


class DecodeGraphs:
    """CUDA graphs of the decode step, captured on first use per (batch bucket, length bucket).

    Inputs live in static buffers; rows beyond the live ones pad the bucket and write their
    keys to the cache's scratch slot. Every graph writes its logits into one shared buffer,
    read (by sampling) before the next replay.
    """

    def __init__(self, decoder: Decoder, max_rows: int):
        self.decoder = decoder
        self.max_rows = max_rows
        device = decoder.device
        width = batch_bucket(max_rows)
        vocab = decoder.model.lm_head.weight.shape[0]
        self.tokens = torch.zeros(width, dtype=torch.long, device=device)
        self.positions = torch.zeros(width, dtype=torch.long, device=device)
        self.slots = torch.zeros(width, dtype=torch.long, device=device)
        self.logits = torch.empty((width, vocab), dtype=decoder.logits_dtype, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.generation = -1
        self.pool = None
        self.replays = self.captures = 0

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None

    def run(self, tokens: torch.Tensor, positions: torch.Tensor, longest: int) -> torch.Tensor:
        cache = self.decoder.cache
        if cache.generation != self.generation:  # captured over tensors that no longer exist
            self.clear()
            self.generation = cache.generation
        rows = tokens.shape[0]
        bucket = batch_bucket(rows)
        columns = min(column_bucket(longest), cache.length)
        self.tokens[:rows] = tokens
        self.tokens[rows:bucket] = 0
        self.positions[:rows] = positions
        self.positions[rows:bucket] = 0
        torch.arange(bucket, out=self.slots[:bucket])
        self.slots[rows:bucket] = cache.scratch
        key = (bucket, columns)
        graph = self.graphs.get(key)
        if graph is None:
            graph = self.graphs[key] = self._capture(bucket, columns)
            self.captures += 1
        graph.replay()
        self.replays += 1
        return self.logits[:rows]

    def _capture(self, bucket: int, columns: int) -> torch.cuda.CUDAGraph:
        args = (self.tokens[:bucket], self.positions[:bucket], self.slots[:bucket], columns)
        out = self.logits[:bucket]
        side = torch.cuda.Stream(self.decoder.device)
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the graph (lazy library initialisation)
            self.decoder.decode_step(*args, out=out)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            self.decoder.decode_step(*args, out=out)
        self.pool = graph.pool()
        log.debug("captured a decode graph for %d rows x %d columns (%d graphs)", bucket, columns, len(self.graphs) + 1)
        return graph
