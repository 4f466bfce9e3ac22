"""The one FLOP accounting: training budget, sampler cost and leaderboard all use these functions.

Conventions (the usual ones, e.g. Kaplan et al. 2020; Chinchilla appendix F):
- a matmul of (m x k) by (k x n) costs 2*m*k*n FLOPs; elementwise work (norms, activations,
  softmax, rotary, residual adds) is not counted, exactly as torch.utils.flop_counter does;
- backward costs twice the forward, so a training step costs 3x its forward FLOPs;
- every application of the loop block is counted (a block looped k times costs k times).

Backbones describe themselves with a FlopProfile (forward FLOPs per sequence for each layer and
the output head); this module turns a profile plus a loop plan into totals.
"""

from __future__ import annotations

from dataclasses import dataclass

TRAIN_MULTIPLIER = 3  # forward + backward (2x forward)


@dataclass(frozen=True)
class FlopProfile:
    """Forward FLOPs of one sequence of ``seq_len`` tokens, per part of the backbone."""

    seq_len: int
    layers: tuple[float, ...]  # one entry per layer (attention + MLP)
    head: float  # output projection to the vocabulary
    embed: float = 0.0  # a table lookup costs no FLOPs

    def forward(self, loop_start: int = 0, loop_end: int = 0, applications: float = 1.0,
                head_share: float = 1.0) -> float:
        """FLOPs of one forward pass of one sequence with the block [loop_start, loop_end) run
        ``applications`` times (may be fractional: a mean over tokens or sequences) and the head
        run on ``head_share`` of the positions (training and validation run it only where the
        loss is: the masked positions)."""
        inside = sum(self.layers[loop_start:loop_end])
        outside = sum(self.layers) - inside
        return self.embed + outside + applications * inside + head_share * self.head


def transformer_layer_flops(seq_len: int, d_model: int, d_ff: int, gated_mlp: bool = True) -> float:
    """Forward FLOPs of one pre-norm transformer layer on one sequence (bidirectional attention).

    qkv + output projections: 2*T*d*(3d) + 2*T*d*d = 8*T*d^2
    scores Q K^T and weighted sum A V: 2 * (2*T*T*d)    (full T x T: no causal mask)
    MLP: 2*T*d*f per matrix; SwiGLU has 3 matrices, GELU 2.
    """
    T, d = seq_len, d_model
    attn_proj = 8 * T * d * d
    attn_mix = 4 * T * T * d
    mlp = (3 if gated_mlp else 2) * 2 * T * d * d_ff
    return float(attn_proj + attn_mix + mlp)


def head_flops(seq_len: int, d_model: int, n_out: int) -> float:
    """Forward FLOPs of the output projection d_model -> n_out on one sequence."""
    return float(2 * seq_len * d_model * n_out)


def train_step_flops(profile: FlopProfile, batch_size: int, loop_start: int = 0, loop_end: int = 0,
                     applications: float = 1.0, head_share: float = 1.0) -> float:
    """FLOPs of one optimizer step (forward + backward) on ``batch_size`` sequences, the head run
    on ``head_share`` of the positions."""
    return TRAIN_MULTIPLIER * batch_size * profile.forward(loop_start, loop_end, applications, head_share)


def inference_flops_per_token(profile: FlopProfile, loop_start: int = 0, loop_end: int = 0,
                              applications: float = 1.0) -> float:
    """Forward FLOPs per token of one denoising network call."""
    return profile.forward(loop_start, loop_end, applications) / profile.seq_len
