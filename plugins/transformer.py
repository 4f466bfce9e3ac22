"""The builtin backbone: a bidirectional pre-norm transformer (RMSNorm, rotary, SwiGLU or GELU).

With ``causal = true`` it is a causal (left-to-right) LM instead: loopsearch/eval/reference.py trains one
as the reference model that scores diffusion samples (generative perplexity).

Small enough to read in one sitting; it exposes its blocks so a looping strategy can run any
contiguous range of them several times (see loopsearch/looping.py).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from loopsearch import hookimpl
from loopsearch.backbone import Backbone
from loopsearch.flops import FlopProfile, head_flops, transformer_layer_flops


class TransformerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_layer: int = Field(6, ge=1, le=256, description="number of transformer layers")
    d_model: int = Field(64, ge=8, description="residual width")
    n_heads: int = Field(4, ge=1, description="attention heads; d_model must divide by it")
    mlp: Literal["swiglu", "gelu"] = Field("swiglu", description="MLP type")
    mlp_ratio: float = Field(4.0, gt=0, description="MLP width / d_model (SwiGLU uses 2/3 of it, as LLaMA)")
    rope_base: float = Field(10000.0, gt=0, description="rotary base")
    tie_embeddings: bool = Field(True, description="share input embedding and output head weights")
    causal: bool = Field(False, description="causal attention mask (a left-to-right LM, for the gen-PPL "
                                            "reference); false: bidirectional, as MDLM needs")

    @model_validator(mode="after")
    def _heads(self):
        if self.d_model % self.n_heads or (self.d_model // self.n_heads) % 2:
            raise ValueError(
                f"d_model={self.d_model} must split into n_heads={self.n_heads} heads of even size"
            )
        return self

    @property
    def d_ff(self) -> int:
        hidden = self.mlp_ratio * self.d_model * (2 / 3 if self.mlp == "swiglu" else 1)
        return max(8, int(round(hidden / 8)) * 8)  # a multiple of 8 for efficient matmuls


def rotary_tables(seq_len: int, head_dim: int, base: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)  # (T, hd/2)
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate pairs (first half, second half)
    x1, x2 = x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class MLP(nn.Module):
    def __init__(self, d: int, d_ff: int, kind: str):
        super().__init__()
        self.kind = kind
        self.up = nn.Linear(d, d_ff, bias=False)
        self.gate = nn.Linear(d, d_ff, bias=False) if kind == "swiglu" else None
        self.down = nn.Linear(d_ff, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate is not None:
            return self.down(F.silu(self.gate(x)) * self.up(x))
        return self.down(F.gelu(self.up(x)))


class Block(nn.Module):
    def __init__(self, p: TransformerParams):
        super().__init__()
        self.n_heads = p.n_heads
        self.causal = p.causal
        self.norm1 = nn.RMSNorm(p.d_model)
        self.qkv = nn.Linear(p.d_model, 3 * p.d_model, bias=False)
        self.proj = nn.Linear(p.d_model, p.d_model, bias=False)
        self.norm2 = nn.RMSNorm(p.d_model)
        self.mlp = MLP(p.d_model, p.d_ff, p.mlp)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)  # (B, H, T, hd)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)  # bidirectional unless causal
        h = h + self.proj(y.transpose(1, 2).reshape(B, T, C))
        return h + self.mlp(self.norm2(h))

    def attention_probs(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """The softmax attention probabilities (B, H, T_query, T_key) that ``forward`` applies to
        the values: the same math as its ``scaled_dot_product_attention``, written out."""
        B, T, C = h.shape
        q, k, _ = self.qkv(self.norm1(h)).view(B, T, 3, self.n_heads, C // self.n_heads).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        scores = (q @ k.transpose(-2, -1)).float() * q.shape[-1] ** -0.5
        if self.causal:  # query i sees keys j <= i, as is_causal=True in forward
            future = torch.ones(T, T, dtype=torch.bool, device=h.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1).to(h.dtype)


class Transformer(Backbone):
    name = "transformer"
    Params = TransformerParams

    def __init__(self, params: TransformerParams, vocab_size: int, seq_len: int):
        super().__init__(params, vocab_size, seq_len)
        self.seq_len = seq_len  # the longest sequence (rotary tables); FLOP-proportional loop draws use it
        p = self.params = params
        self.n_layer, self.d_model = p.n_layer, p.d_model
        self.mask_id, self.n_tokens = vocab_size, vocab_size + 1  # MASK is the last id
        self.wte = nn.Embedding(self.n_tokens, p.d_model)
        self.blocks = nn.ModuleList(Block(p) for _ in range(p.n_layer))
        self.norm_f = nn.RMSNorm(p.d_model)
        self.lm_head = nn.Linear(p.d_model, self.n_tokens, bias=False)
        if p.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        cos, sin = rotary_tables(seq_len, p.d_model // p.n_heads, p.rope_base)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        self.apply(self._init)
        for block in self.blocks:  # scale residual projections by depth (GPT-2 / nanoGPT)
            for w in (block.proj.weight, block.mlp.down.weight):
                nn.init.normal_(w, std=0.02 / (2 * p.n_layer) ** 0.5)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.wte(x)

    supports_token_index = True  # run_block(i, h, index=): a subset of each sequence's tokens (router)

    def run_block(self, i: int, h: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """Layer i on h (B, T, C). ``index`` (B, T') long: h holds only these positions of each
        sequence, which attend to one another at their own rotary positions."""
        if index is None:
            T = h.shape[1]
            return self.blocks[i](h, self.cos[:T], self.sin[:T])
        return self.blocks[i](h, self.cos[index][:, None], self.sin[index][:, None])

    def attention_probs(self, i: int, h: torch.Tensor) -> torch.Tensor:
        T = h.shape[1]
        return self.blocks[i].attention_probs(h, self.cos[:T], self.sin[:T])

    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.norm_f(h))

    def flop_profile(self, seq_len: int) -> FlopProfile:
        p = self.params
        # Full T x T attention also when causal: FlopCounterMode counts SDPA's math path, which
        # computes every score and then masks, so the causal model keeps the same analytic count.
        layer = transformer_layer_flops(seq_len, p.d_model, p.d_ff, gated_mlp=p.mlp == "swiglu")
        return FlopProfile(seq_len, (layer,) * p.n_layer, head_flops(seq_len, p.d_model, self.n_tokens))


@hookimpl
def register_backbones():
    return [Transformer]
