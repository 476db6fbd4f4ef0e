"""tiny-lm's network: a decoder-only transformer in plain torch, and its decode step captured
as a CUDA graph.

A decode step of a model this size is bound by launching kernels, not by the GPU: on an H100 a
1 GB model's step runs ~3 µs kernels behind ~25 µs of CPU each. So the network is written for
few kernels per layer (rotary positions turn query and key together with one complex multiply;
the residual adds go into the output projections with ``addmm_``; a padding mask is built once
per forward as an additive bias, and a batch without padding runs attention with no mask), and
on CUDA a sequence decoded alone replays one captured graph per token (``DecodeGraph``), as
serving engines do.

Imports torch: import it where torch is installed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from gpufleet.models.attention import serving_attention

if TYPE_CHECKING:
    from gpufleet.models.demo.tiny_lm import TinyLMConfig

log = logging.getLogger(__name__)

Cache = list[tuple[torch.Tensor, torch.Tensor]]  # per layer: keys, values [B, H, L, hd]

GRAPH_CACHE_LIMIT = 2 << 30  # bytes: a larger one-sequence KV cache decodes without a graph


class Transformer:
    """Pre-norm blocks (RMSNorm, rotary attention through ``scaled_dot_product_attention``,
    GELU MLP), with a KV cache for generation."""

    def __init__(self, config: TinyLMConfig, weights: dict[str, torch.Tensor]) -> None:
        self.config, self.w = config, weights
        self.head_dim = config.d_model // config.n_heads
        self.device = weights["embed.weight"].device
        self.dtype = weights["embed.weight"].dtype
        half = torch.arange(0, self.head_dim // 2, device=self.device, dtype=torch.float32)
        self.inv_freq = 10000.0 ** (-2 * half / self.head_dim)
        # Each layer's weights looked up and transposed once, not in every step (a decode step
        # is bound by the CPU time of each Python-level op).
        self.blocks = [
            (
                weights[f"layers.{i}.attn_norm.weight"],
                weights[f"layers.{i}.attn.qkv.weight"],
                weights[f"layers.{i}.attn.out.weight"].t(),
                weights[f"layers.{i}.mlp_norm.weight"],
                weights[f"layers.{i}.mlp.up.weight"],
                weights[f"layers.{i}.mlp.down.weight"].t(),
            )
            for i in range(config.n_layers)
        ]

    def new_cache(self, batch: int, length: int) -> Cache:
        # Zeros, not torch.empty: ``step`` attends over every slot, the unfilled ones masked
        # with -inf, and uninitialised memory may hold NaN, which the mask does not cancel
        # (NaN - inf is NaN; a zero weight times a NaN value is NaN).
        c = self.config
        shape = (batch, c.n_heads, length, self.head_dim)
        return [
            (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            for _ in range(c.n_layers)
        ]

    def cache_bytes(self, batch: int, length: int) -> int:
        c = self.config
        return 2 * c.n_layers * batch * c.d_model * length * self.dtype.itemsize

    def forward(
        self,
        ids: torch.Tensor,  # [B, T] token ids
        positions: torch.Tensor,  # [B, T] rotary positions (0 at each row's first real token)
        valid: torch.Tensor,  # [B, start + T] False where a key is left padding
        cache: Cache | None = None,
        start: int = 0,  # where ``ids`` go in the cache
        *,
        unpadded: bool = False,  # the caller knows ``valid`` is all True
        last_only: bool = False,  # logits of the last position only
    ) -> torch.Tensor:
        """Logits [B, T, vocab] (float32), or [B, 1, vocab] with ``last_only``."""
        t = ids.shape[1]
        s = start + t
        bias: torch.Tensor | None = None
        causal = False
        if unpadded and (t == 1 or start == 0):
            causal = t > 1  # a new token sees every cached key; a prompt, the keys before it
        else:
            keys = torch.arange(s, device=ids.device)
            queries = torch.arange(start, s, device=ids.device)
            # A padded query sees only itself: a row with no key at all would give NaN, and NaN
            # in the values poisons every later row even where its weight is 0.
            allowed = (valid[:, None, None, :s] & (keys <= queries[:, None])) | (
                keys == queries[:, None]
            )
            bias = torch.zeros(allowed.shape, dtype=self.dtype, device=ids.device)
            bias.masked_fill_(~allowed, float("-inf"))
        x = self._layers(ids, positions, bias, causal, cache, start, s)
        return self._logits(x[:, -1:] if last_only else x)

    def step(
        self, ids: torch.Tensor, slot: torch.Tensor, bias: torch.Tensor, cache: Cache
    ) -> torch.Tensor:
        """One token of one unpadded sequence, with static shapes (what a CUDA graph needs):
        ``ids`` [1, 1]; ``slot`` [1], the token's position and cache index; ``bias`` [1, 1, 1,
        L], 0 over the filled keys and -inf after them; ``cache`` of length L. Logits [1, 1,
        vocab]."""
        x = self._layers(ids, slot.view(1, 1), bias, False, cache, slot, bias.shape[-1])
        return self._logits(x)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        x = F.rms_norm(x, (self.config.d_model,), self.w["norm.weight"], eps=1e-5)
        return F.linear(x, self.w["lm_head.weight"]).float()

    def _layers(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        bias: torch.Tensor | None,
        causal: bool,
        cache: Cache | None,
        start: int | torch.Tensor,  # a tensor: the slot ``step`` writes, attending to all L keys
        s: int,
    ) -> torch.Tensor:
        c, hd = self.config, self.head_dim
        angles = positions[..., None].float() * self.inv_freq  # [B, T, hd/2]
        turn = torch.polar(torch.ones_like(angles), angles)[:, None, None]  # [B, 1, 1, T, hd/2]
        x = self.w["embed.weight"][ids]  # a tensor of its own: the residual adds go into it
        b, t, d = x.shape
        rows = x.view(b * t, d)
        with serving_attention():
            for i, (attn_norm, qkv_w, out_t, mlp_norm, up_w, down_t) in enumerate(self.blocks):
                h = F.rms_norm(x, (d,), attn_norm, eps=1e-5)
                qkv = F.linear(h, qkv_w).view(b, t, 3, c.n_heads, hd).transpose(1, 3)
                # qkv: [B, H, 3, T, hd]
                pairs = qkv[:, :, :2].float().reshape(b, c.n_heads, 2, t, hd // 2, 2)
                turned = torch.view_as_real(torch.view_as_complex(pairs) * turn)
                q, k = turned.view(b, c.n_heads, 2, t, hd).to(x.dtype).unbind(2)  # [B, H, T, hd]
                v = qkv[:, :, 2]
                if cache is not None:
                    keys, values = cache[i]
                    if isinstance(start, torch.Tensor):
                        keys.index_copy_(2, start, k)
                        values.index_copy_(2, start, v)
                    else:
                        keys.narrow(2, start, t).copy_(k)
                        values.narrow(2, start, t).copy_(v)
                    k, v = keys.narrow(2, 0, s), values.narrow(2, 0, s)
                a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, is_causal=causal)
                rows.addmm_(a.transpose(1, 2).reshape(b * t, d), out_t)
                h = F.rms_norm(x, (d,), mlp_norm, eps=1e-5)
                rows.addmm_(F.gelu(F.linear(h, up_w)).view(b * t, c.d_ff), down_t)
        return x


class DecodeGraph:
    """``Transformer.step`` for one sequence, captured once as a CUDA graph and replayed for
    every token: one launch instead of ~15 kernels per layer.

    It owns a KV cache of ``length`` (the model's context, rounded up to 64) that the prompt
    is written into, eagerly, before the first replay. Inputs and output live in static
    buffers: ``run`` returns logits that the next ``run`` overwrites, and one sequence at a
    time uses it (a worker predicts from one thread). The cache stays allocated with the
    model (``Transformer.cache_bytes``; at most ``GRAPH_CACHE_LIMIT``).
    """

    def __init__(self, net: Transformer, length: int) -> None:
        self.length = -(-length // 64) * 64  # aligned for the memory-efficient attention kernel
        dev = net.device
        # Zeroed (new_cache): the step reads every slot. Slots past a sequence keep earlier
        # sequences' finite values.
        self.cache = net.new_cache(1, self.length)
        self.token = torch.zeros((1, 1), dtype=torch.long, device=dev)
        self.slot = torch.zeros((1,), dtype=torch.long, device=dev)
        self.bias = torch.zeros((1, 1, 1, self.length), dtype=net.dtype, device=dev)
        # Warm up on a side stream, as capture requires: workspaces and lazily loaded kernels
        # are set up outside the graph. The step writes its slot (0), which a prompt overwrites.
        side = torch.cuda.Stream(dev)  # type: ignore[no-untyped-call]
        main = torch.cuda.current_stream(dev)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            net.step(self.token, self.slot, self.bias, self.cache)
        main.wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = net.step(self.token, self.slot, self.bias, self.cache)

    def begin(self, prompt_length: int) -> None:
        """A new sequence whose prompt fills the cache's first ``prompt_length`` slots."""
        self.bias.fill_(float("-inf"))
        self.bias[..., :prompt_length] = 0

    def run(self, token: torch.Tensor, at: int) -> torch.Tensor:
        """Logits [1, 1, vocab] after ``token`` ([1] or [1, 1]) at position ``at``."""
        self.token.copy_(token.view(1, 1))
        self.slot.fill_(at)
        self.bias[..., at] = 0
        self.graph.replay()
        return self.logits


def decode_graph(net: Transformer, length: int) -> DecodeGraph | None:
    """A ``DecodeGraph`` on CUDA, or None where the model decodes eagerly: not on CUDA, a
    one-sequence cache over ``GRAPH_CACHE_LIMIT``, or a capture that failed (out of memory,
    say; it is logged once and the model runs eagerly)."""
    if net.device.type != "cuda" or net.cache_bytes(1, length) > GRAPH_CACHE_LIMIT:
        return None
    try:
        return DecodeGraph(net, length)
    except RuntimeError as exc:  # torch.OutOfMemoryError and capture errors
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        log.warning("tiny-lm decodes without a CUDA graph: %s", first)
        torch.cuda.synchronize(net.device)
        return None
