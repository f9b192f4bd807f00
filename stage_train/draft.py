"""The Llama EAGLE-3 draft model: one fused decoder layer plus a reduced-vocab head.

The module is a plain ``nn.Module`` with no distributed code; sharding, mixed precision
and checkpointing wrappers are applied from the outside.

Parameter and buffer names are the SpecForge / SGLang / vLLM serving layout and are
exported verbatim::

    embed_tokens.weight                       [V, H]      frozen copy of the target embedding
    fc.weight                                 [H, 3*H_t]  fuses the three target aux states
    midlayer.input_layernorm.weight           [H]
    midlayer.hidden_norm.weight               [H]
    midlayer.post_attention_layernorm.weight  [H]
    midlayer.self_attn.{q,k,v,o}_proj.weight  [n_h*d, 2H] [n_kv*d, 2H] [n_kv*d, 2H] [H, n_h*d]
    midlayer.mlp.{gate,up,down}_proj.weight   [I, H] [I, H] [H, I]
    norm.weight                               [H]
    lm_head.weight                            [V_d, H]
    d2t  int64[V_d]  (target_id = i + d2t[i])
    t2d  bool[V]

The training-time-test (TTT) unroll is driven from outside (``stage_train.core``) through
``decoder_step`` and a shared ``cache_hidden = [[], []]`` list of per-step keys and values;
see ``Eagle3Attention`` for the exact attention pattern.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn
from transformers import LlamaConfig
from transformers.activations import ACT2FN
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

__all__ = [
    "ATTENTION_BACKENDS",
    "FLEX_TILE",
    "DraftConfig",
    "Eagle3Attention",
    "Eagle3DecoderLayer",
    "Eagle3DraftModel",
    "RMSNorm",
    "SwiGLUMLP",
]

# Keys of a draft config.json that describe RoPE; everything else in ``rope_scaling``/
# ``rope_parameters`` is a scaling hyper-parameter (factor, low_freq_factor, ...).
_ROPE_META_KEYS = ("rope_type", "type", "rope_theta")


def _normalise_rope_scaling(scaling: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Return an HF-style scaling dict with ``rope_type`` set, or None for plain RoPE.

    Accepts the legacy ``{"type": ...}`` spelling and drops any ``rope_theta`` key, because
    theta is carried separately. A dict whose type is ``"default"`` means "no scaling".
    """
    if scaling is None:
        return None
    scaling = dict(scaling)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    scaling.pop("rope_theta", None)
    if rope_type == "default":
        return None
    return {"rope_type": rope_type, **scaling}


@dataclass(frozen=True)
class DraftConfig:
    """Shape and RoPE configuration of an EAGLE-3 Llama draft.

    ``vocab_size`` is the *target* vocabulary (embedding rows, ``t2d`` length) and
    ``draft_vocab_size`` the reduced head size. ``target_hidden_size`` sizes ``fc``'s
    input (3 * H_t), which serving engines need when it differs from ``hidden_size``.
    ``rope_scaling`` is an HF-style dict (``{"rope_type": "llama3", "factor": 8.0, ...}``)
    or None for default RoPE; it must match what the serving engine reads from
    config.json, otherwise positions are encoded differently at train and serve time.
    """

    hidden_size: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    vocab_size: int
    draft_vocab_size: int
    target_hidden_size: int
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = field(default=None)
    hidden_act: str = "silu"

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "head_dim",
            "vocab_size",
            "draft_vocab_size",
            "target_hidden_size",
            "max_position_embeddings",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"DraftConfig.{name} must be a positive int, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ValueError(
                "DraftConfig.num_attention_heads must be divisible by num_key_value_heads, "
                f"got {self.num_attention_heads} and {self.num_key_value_heads}"
            )
        if self.head_dim % 2 != 0:
            raise ValueError(f"DraftConfig.head_dim must be even for RoPE, got {self.head_dim}")
        if self.draft_vocab_size > self.vocab_size:
            raise ValueError(
                f"DraftConfig.draft_vocab_size ({self.draft_vocab_size}) must not exceed "
                f"vocab_size ({self.vocab_size})"
            )
        if not (self.rms_norm_eps > 0):
            raise ValueError(f"DraftConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not (float(self.rope_theta) > 0):
            raise ValueError(f"DraftConfig.rope_theta must be > 0, got {self.rope_theta!r}")
        if self.hidden_act not in ACT2FN:
            raise ValueError(f"DraftConfig.hidden_act {self.hidden_act!r} is not a known activation")
        if self.rope_scaling is not None and not isinstance(self.rope_scaling, Mapping):
            raise ValueError(f"DraftConfig.rope_scaling must be a dict or None, got {self.rope_scaling!r}")
        # Frozen dataclass: normalise through object.__setattr__ (defensive copy as well).
        object.__setattr__(self, "rope_theta", float(self.rope_theta))
        object.__setattr__(self, "rms_norm_eps", float(self.rms_norm_eps))
        object.__setattr__(self, "rope_scaling", _normalise_rope_scaling(self.rope_scaling))

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_target_config(cls, cfg: LlamaConfig, draft_vocab_size: int) -> "DraftConfig":
        """Copy the target's shape and RoPE (the Automodel convention, notes §2.6/§10.9).

        transformers 5 keeps theta and the scaling type in ``cfg.rope_parameters``; older
        configs carried ``rope_theta``/``rope_scaling`` attributes, which are used as a
        fallback. ``head_dim`` may be absent, in which case it is hidden / heads.
        """
        rope_parameters = getattr(cfg, "rope_parameters", None)
        if isinstance(rope_parameters, Mapping) and "rope_theta" in rope_parameters:
            rope_theta = float(rope_parameters["rope_theta"])
            rope_scaling = _normalise_rope_scaling(rope_parameters)
        else:
            rope_theta = float(getattr(cfg, "rope_theta", 10000.0))
            rope_scaling = _normalise_rope_scaling(getattr(cfg, "rope_scaling", None))
        num_heads = cfg.num_attention_heads
        num_kv_heads = getattr(cfg, "num_key_value_heads", None) or num_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // num_heads
        return cls(
            hidden_size=cfg.hidden_size,
            intermediate_size=cfg.intermediate_size,
            num_attention_heads=num_heads,
            num_key_value_heads=num_kv_heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.rms_norm_eps,
            vocab_size=cfg.vocab_size,
            draft_vocab_size=draft_vocab_size,
            target_hidden_size=cfg.hidden_size,
            max_position_embeddings=cfg.max_position_embeddings,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            hidden_act=getattr(cfg, "hidden_act", "silu"),
        )

    @property
    def rope_parameters(self) -> dict[str, Any]:
        """transformers-5 style RoPE dict: type, theta and scaling hyper-parameters."""
        scaling = dict(self.rope_scaling or {})
        rope_type = scaling.pop("rope_type", "default")
        return {"rope_type": rope_type, "rope_theta": self.rope_theta, **scaling}

    def to_llama_config(self) -> LlamaConfig:
        """A one-layer ``LlamaConfig`` with this shape, used to build the rotary embedding."""
        return LlamaConfig(
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=1,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            vocab_size=self.vocab_size,
            max_position_embeddings=self.max_position_embeddings,
            rope_parameters=self.rope_parameters,
            hidden_act=self.hidden_act,
            tie_word_embeddings=False,
        )

    def to_hf_dict(self, dtype: str = "bfloat16") -> dict[str, Any]:
        """The serving ``config.json`` body (SGLang ``LlamaForCausalLMEagle3`` / vLLM alias).

        Both the transformers-4 keys (``rope_theta``, ``rope_scaling``) and the
        transformers-5 ``rope_parameters`` are written, because serving engines pin
        different transformers versions.
        """
        return {
            "architectures": ["LlamaForCausalLMEagle3"],
            "model_type": "llama",
            "num_hidden_layers": 1,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": self.hidden_act,
            "vocab_size": self.vocab_size,
            "draft_vocab_size": self.draft_vocab_size,
            "target_hidden_size": self.target_hidden_size,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": dict(self.rope_scaling) if self.rope_scaling is not None else None,
            "rope_parameters": self.rope_parameters,
            "tie_word_embeddings": False,
            "torch_dtype": dtype,
            "dtype": dtype,
        }

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> "DraftConfig":
        """Inverse of ``to_hf_dict``; also reads hand-written EAGLE/SpecForge configs.

        Unknown keys are ignored. Missing optional keys take the serving engines' defaults:
        ``draft_vocab_size`` = ``vocab_size``, ``target_hidden_size`` = ``hidden_size``,
        ``head_dim`` = hidden / heads, ``rope_theta`` = 10000, ``max_position_embeddings`` = 2048.
        """
        for key in ("hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
            if key not in d:
                raise ValueError(f"draft config dict is missing required key {key!r}")
        rope_parameters = d.get("rope_parameters")
        if d.get("rope_theta") is not None:
            rope_theta = float(d["rope_theta"])
        elif isinstance(rope_parameters, Mapping) and "rope_theta" in rope_parameters:
            rope_theta = float(rope_parameters["rope_theta"])
        else:
            rope_theta = 10000.0
        if d.get("rope_scaling") is not None:
            rope_scaling = _normalise_rope_scaling(d["rope_scaling"])
        elif isinstance(rope_parameters, Mapping):
            rope_scaling = _normalise_rope_scaling(rope_parameters)
        else:
            rope_scaling = None
        num_heads = int(d["num_attention_heads"])
        return cls(
            hidden_size=int(d["hidden_size"]),
            intermediate_size=int(d["intermediate_size"]),
            num_attention_heads=num_heads,
            num_key_value_heads=int(d.get("num_key_value_heads") or num_heads),
            head_dim=int(d.get("head_dim") or int(d["hidden_size"]) // num_heads),
            rms_norm_eps=float(d.get("rms_norm_eps", 1e-6)),
            vocab_size=int(d["vocab_size"]),
            draft_vocab_size=int(d.get("draft_vocab_size") or d["vocab_size"]),
            target_hidden_size=int(d.get("target_hidden_size") or d["hidden_size"]),
            max_position_embeddings=int(d.get("max_position_embeddings", 2048)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            hidden_act=str(d.get("hidden_act", "silu")),
        )


class RMSNorm(nn.Module):
    """Llama RMSNorm: normalise in fp32, cast back, then scale (weight initialised to ones)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(input_dtype)


class SwiGLUMLP(nn.Module):
    """Llama MLP: ``down(act(gate(x)) * up(x))`` without biases."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)
        self.act_fn = ACT2FN[hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class _Fp32RotaryEmbedding(LlamaRotaryEmbedding):
    """``LlamaRotaryEmbedding`` whose inverse frequencies survive ``module.to(bfloat16)``.

    ``nn.Module.to(dtype)`` casts floating buffers, and bf16 ``inv_freq`` (8 mantissa bits)
    scrambles RoPE phases at long positions, so a draft trained in pure bf16 would encode
    positions differently from the fp32 RoPE of the serving engine. After any cast that
    leaves ``inv_freq`` in another dtype, the frequencies are recomputed in fp32.
    """

    def _apply(self, fn: Any, recurse: bool = True) -> "_Fp32RotaryEmbedding":
        super()._apply(fn, recurse)
        if self.inv_freq.dtype != torch.float32:
            device = self.inv_freq.device
            if self.rope_type == "default":
                inv_freq, _ = self.compute_default_rope_parameters(self.config)
            else:
                inv_freq, _ = ROPE_INIT_FUNCTIONS[self.rope_type](self.config)
            inv_freq = inv_freq.to(device=device, dtype=torch.float32)
            self.inv_freq = inv_freq
            self.original_inv_freq = inv_freq.clone()
            self.max_seq_len_cached = self.original_max_seq_len
        return self


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """GQA: repeat each KV head ``n_rep`` times, [B, n_kv, T, d] -> [B, n_kv*n_rep, T, d]."""
    if n_rep == 1:
        return x
    b, n_kv, t, d = x.shape
    return x[:, :, None].expand(b, n_kv, n_rep, t, d).reshape(b, n_kv * n_rep, t, d)


def _block0_allowed(attention_mask: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Boolean [B, 1, T, T] "query t may attend key j" for block 0 of the TTT attention.

    A 2-D ``attention_mask`` [B, T] of 1/0 gives causal & key-not-padding. A 4-D boolean
    [B, 1, T, T] mask is taken as the complete allowed pattern (e.g. block-causal for
    packed sequences) and used as is.
    """
    if attention_mask.dim() == 2:
        causal = torch.ones(seq_len, seq_len, dtype=torch.bool, device=attention_mask.device).tril()
        return causal[None, None] & attention_mask.bool()[:, None, None, :]
    if attention_mask.dim() == 4 and attention_mask.dtype == torch.bool:
        return attention_mask
    raise ValueError(
        "attention_mask must be a [B, T] padding mask of 1/0 or a boolean [B, 1, T, T] allowed-mask, "
        f"got shape {tuple(attention_mask.shape)} dtype {attention_mask.dtype}"
    )


ATTENTION_BACKENDS = ("eager", "flex")


def _ttt_mask_mod(key_valid: torch.Tensor, seq_len: int):
    """Flex ``mask_mod`` of one TTT step over the concatenated keys ``[K_0; K_1; ...; K_k]``.

    Key column ``c`` is slot ``c % T`` of block ``c // T``. Block 0 is causal and skips padded
    keys (``key_valid`` [B, T] bool); block i > 0 is the diagonal: query t sees only ``K_i[t]``.
    """

    def mask_mod(b, h, q_idx, kv_idx):
        block = kv_idx // seq_len
        key = kv_idx - block * seq_len
        prefix = (block == 0) & (key <= q_idx) & key_valid[b, key]
        diagonal = (block > 0) & (key == q_idx)
        return prefix | diagonal

    return mask_mod


FLEX_TILE = 128  # flex_attention's block size; T is padded to a multiple of it
FLEX_MIN_HEAD_DIM = 16  # the compiled CUDA kernel refuses smaller heads ("embedding dimension ... at least 16")


def raise_recompile_limit(limit: int = 64) -> None:
    """Let Dynamo keep up to ``limit`` graphs per compiled function.

    Shapes vary from batch to batch (rows, padded length, TTT step, grad mode), and every
    combination is a Dynamo guard; past the default limit torch would silently fall back to
    eager (for flex attention: the unfused kernel that materialises the scores)."""
    dynamo_config = torch._dynamo.config
    name = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    setattr(dynamo_config, name, max(getattr(dynamo_config, name), limit))


@functools.cache
def _compiled_flex_kernels():
    """``(create_block_mask, flex_attention)`` compiled once per process (CUDA path)."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    raise_recompile_limit()
    return torch.compile(create_block_mask), torch.compile(flex_attention, dynamic=True)


class Eagle3Attention(nn.Module):
    """Self-attention over the TTT cache (notes §5.2).

    ``cache_hidden = [K_list, V_list]`` is created empty once per batch and shared by all
    TTT steps. At step ``k = len(K_list)``:

    * q, K_k, V_k are projected from ``u`` and rotated at positions ``position_ids + k``
      (the positions the chain tokens occupy at inference); K_k/V_k are appended to the cache.
    * Block 0: ``q @ K_0^T / sqrt(d)`` with the causal + key-padding mask (the mask is
      never shifted per step).
    * Diagonal blocks i = 1..k: ``s_i[t] = <q_t, K_i[t]> / sqrt(d)``: query t sees only its
      own chain's later keys, never ``K_0[t+1:]``.
    * One softmax over the T + k columns; ``out = P[:, :T] @ V_0 + sum_i P[T+i-1] V_i``.

    Two backends compute this (``backend``); they agree to rounding on every row that has a
    visible key (a row with none, a left-padded query at step 0, is uniform under eager and
    zero under flex; such slots are never supervised and no other slot reads them):

    * ``"eager"`` (default): explicit fp32 scores [B, h, T, T] plus the diagonal columns;
      the cache holds GQA-expanded K/V. Accepts a boolean [B, 1, T, T] block-0 mask too.
      Fully masked block-0 rows use ``finfo(float32).min`` (finite), so they never yield NaN.
    * ``"flex"``: one ``flex_attention`` call over the concatenated keys ``[K_0; ...; K_k]``
      with a block-sparse mask (causal prefix + diagonals), so no [T, T] tensor is built and
      the diagonal blocks cost one tile each. The cache holds un-expanded K/V (GQA is done by
      the kernel). Needs a [B, T] padding mask. Compiled on CUDA; elsewhere (flex has no CPU
      backward) the same concatenated layout and mask run densely through SDPA, for tests.

    Nothing is detached, so gradients flow into earlier steps through the cached K/V.
    """

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.n_rep = self.num_heads // self.num_kv_heads
        in_features = 2 * config.hidden_size
        self.q_proj = nn.Linear(in_features, self.num_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(in_features, self.num_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)
        self.rotary_emb = _Fp32RotaryEmbedding(config.to_llama_config())
        self.backend = "eager"

    def set_backend(self, backend: str) -> None:
        """Choose ``"eager"`` or ``"flex"`` (see the class docstring)."""
        if backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention backend must be one of {ATTENTION_BACKENDS}, got {backend!r}")
        self.backend = backend

    def forward(
        self,
        u: torch.Tensor,
        cache_hidden: list[list[torch.Tensor]],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        step = len(cache_hidden[0])
        q, k, v = self.project(u, position_ids, step)
        return self.o_proj(self.attend(q, k, v, cache_hidden, attention_mask))

    def project(self, u: torch.Tensor, position_ids: torch.Tensor, step: int):
        """q [B, h, T, d], k and v [B, h_kv, T, d] of TTT step ``step``, q and k rotated at
        ``position_ids + step``."""
        bsz, seq_len, _ = u.shape
        q = self.q_proj(u).view(bsz, seq_len, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(u).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(u).view(bsz, seq_len, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = self.rotary_emb(v, position_ids + step)
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        return q, k, v

    def attend(self, q, k, v, cache_hidden: list[list[torch.Tensor]], attention_mask: torch.Tensor) -> torch.Tensor:
        """Append this step's K/V to ``cache_hidden`` and attend over it: [B, T, h*d], before ``o_proj``."""
        step = len(cache_hidden[0])
        bsz, _, seq_len, _ = q.shape
        if self.backend == "flex":
            out = self._flex_attention(q, k, v, cache_hidden, attention_mask, step)
        else:
            out = self._eager_attention(q, k, v, cache_hidden, attention_mask, step)
        return out.transpose(1, 2).reshape(bsz, seq_len, self.num_heads * self.head_dim)

    def _eager_attention(self, q, k, v, cache_hidden, attention_mask, step: int) -> torch.Tensor:
        seq_len = q.shape[2]
        cache_hidden[0].append(_expand_kv(k, self.n_rep))
        cache_hidden[1].append(_expand_kv(v, self.n_rep))
        keys, values = cache_hidden
        scale = 1.0 / math.sqrt(self.head_dim)
        allowed = _block0_allowed(attention_mask, seq_len)
        scores0 = torch.matmul(q, keys[0].transpose(-1, -2)).float() * scale
        scores0 = scores0.masked_fill(~allowed, torch.finfo(torch.float32).min)
        if step == 0:
            probs = torch.softmax(scores0, dim=-1).to(values[0].dtype)
            return torch.matmul(probs, values[0])
        k_diag = torch.stack(keys[1:], dim=0)  # [k, B, h, T, d]
        v_diag = torch.stack(values[1:], dim=0)
        scores_diag = torch.einsum("bhtd,sbhtd->bhts", q, k_diag).float() * scale
        probs = torch.softmax(torch.cat([scores0, scores_diag], dim=-1), dim=-1).to(values[0].dtype)
        out = torch.matmul(probs[..., :seq_len], values[0])
        return out + torch.einsum("bhts,sbhtd->bhtd", probs[..., seq_len:], v_diag)

    def _flex_attention(self, q, k, v, cache_hidden, attention_mask, step: int) -> torch.Tensor:
        from torch.nn.attention.flex_attention import create_mask

        if attention_mask.dim() != 2:
            raise ValueError(
                "the flex attention backend takes a [B, T] padding mask; use the eager backend for "
                f"a [B, 1, T, T] block mask (got shape {tuple(attention_mask.shape)})"
            )
        bsz, _, seq_len, _ = q.shape
        # Pad T to whole tiles: fewer distinct shapes to compile, and every diagonal block then
        # starts on a tile boundary. Padded keys are invalid; padded query rows are cut off.
        pad = -seq_len % FLEX_TILE
        if pad:
            q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
            attention_mask = F.pad(attention_mask, (0, pad))
        width = seq_len + pad
        cache_hidden[0].append(k)
        cache_hidden[1].append(v)
        keys = torch.cat(cache_hidden[0], dim=2).to(q.dtype) if step else k
        values = torch.cat(cache_hidden[1], dim=2).to(q.dtype) if step else v
        mask_mod = _ttt_mask_mod(attention_mask.bool(), width)
        kv_len = (step + 1) * width
        scale = 1.0 / math.sqrt(self.head_dim)
        if q.device.type != "cuda":
            # flex_attention has no CPU backward: run the same layout and mask densely (tests, CPU).
            allowed = create_mask(mask_mod, bsz, 1, width, kv_len, device=q.device)
            bias = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device)
            bias = bias.masked_fill(~allowed, torch.finfo(q.dtype).min)
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=bias, scale=scale,
                                                 enable_gqa=self.n_rep > 1)
        else:
            build_mask, attend = _compiled_flex_kernels()
            block_mask = build_mask(mask_mod, bsz, None, width, kv_len, device=q.device)
            out = attend(q, keys, values, block_mask=block_mask, scale=scale, enable_gqa=self.n_rep > 1)
        return out[:, :, :seq_len]


class Eagle3DecoderLayer(nn.Module):
    """The fused EAGLE-3 midlayer: attention input is ``[norm(embeds) ; norm(hidden)]``.

    The embedding half comes first; the SGLang and vLLM loaders slice q/k/v in that order.
    The residual stream is the incoming hidden state, and the *pre-norm* output is returned
    because it is what the next TTT step consumes.
    """

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hidden_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Eagle3Attention(config)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = SwiGLUMLP(config.hidden_size, config.intermediate_size, config.hidden_act)

        self.compiled = False

    def forward(
        self,
        input_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        cache_hidden: list[list[torch.Tensor]],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
    ) -> torch.Tensor:
        """One pass: the attention inputs and the output half (``o_proj``, residuals, MLP) run
        through ``torch.compile`` when :attr:`compiled` is set, the attention itself never does
        (flex is compiled on its own, eager needs no fusion)."""
        attention_input, layer_output = _compiled_layer_pieces() if self.compiled else (_attention_input, _layer_output)
        q, k, v = attention_input(self, input_embeds, hidden_states, position_ids, len(cache_hidden[0]))
        return layer_output(self, self.self_attn.attend(q, k, v, cache_hidden, attention_mask), hidden_states)


def _attention_input(layer: Eagle3DecoderLayer, input_embeds, hidden_states, position_ids, step: int):
    """``[norm(embeds) ; norm(hidden)]`` projected to the rotated q, k, v of TTT step ``step``."""
    u = torch.cat([layer.input_layernorm(input_embeds), layer.hidden_norm(hidden_states)], dim=-1)
    return layer.self_attn.project(u, position_ids, step)


def _layer_output(layer: Eagle3DecoderLayer, attention: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """The pre-norm output: ``residual + o_proj(attention)``, then the MLP's residual block."""
    hidden = residual + layer.self_attn.o_proj(attention)
    return hidden + layer.mlp(layer.post_attention_layernorm(hidden))


@functools.cache
def _compiled_layer_pieces():
    """``(_attention_input, _layer_output)`` compiled once per process with symbolic shapes and
    step, so that one graph serves every batch shape and TTT step."""
    raise_recompile_limit()
    return torch.compile(_attention_input, dynamic=True), torch.compile(_layer_output, dynamic=True)


class Eagle3DraftModel(nn.Module):
    """EAGLE-3 Llama draft: ``fc`` fusion, one midlayer, final norm and a V_d-row head.

    ``embed_tokens`` is frozen (the serving engine replaces it with the target's), the
    ``lm_head`` is fresh and trainable, and ``d2t``/``t2d`` are persistent buffers so the
    vocabulary mapping always travels with the weights. Until ``set_vocab_mapping`` is
    called the mapping is the identity over the first V_d target ids.
    """

    def __init__(self, config: DraftConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.fc = nn.Linear(3 * config.target_hidden_size, config.hidden_size, bias=False)
        self.midlayer = Eagle3DecoderLayer(config)
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.draft_vocab_size, bias=False)
        t2d = torch.zeros(config.vocab_size, dtype=torch.bool)
        t2d[: config.draft_vocab_size] = True
        self.register_buffer("d2t", torch.zeros(config.draft_vocab_size, dtype=torch.long), persistent=True)
        self.register_buffer("t2d", t2d, persistent=True)

    # ----------------------------------------------------------------- vocab / embeddings
    @torch.no_grad()
    def set_vocab_mapping(self, selected_token_ids: torch.Tensor) -> None:
        """Fill ``d2t`` (offsets, ``target = i + d2t[i]``) and ``t2d`` from the selected ids.

        The ids must be strictly ascending target ids, V_d of them: EAGLE/SpecForge
        ordering, which keeps boolean ``t2d`` indexing and the ``lm_head`` row order aligned.
        """
        ids = torch.as_tensor(selected_token_ids)
        if ids.dim() != 1 or ids.numel() != self.config.draft_vocab_size:
            raise ValueError(
                f"selected_token_ids must be 1-D with {self.config.draft_vocab_size} entries, "
                f"got shape {tuple(ids.shape)}"
            )
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"selected_token_ids must be an integer tensor, got {ids.dtype}")
        ids = ids.to(device=self.d2t.device, dtype=torch.long)
        if ids.numel() > 1 and not bool((ids[1:] > ids[:-1]).all()):
            raise ValueError("selected_token_ids must be strictly ascending (sorted, no duplicates)")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"selected_token_ids must lie in [0, {self.config.vocab_size})")
        self.d2t.copy_(ids - torch.arange(ids.numel(), device=ids.device))
        self.t2d.zero_()
        self.t2d[ids] = True

    def draft_to_target_ids(self) -> torch.Tensor:
        """Target id of every draft id, ``arange(V_d) + d2t`` (long[V_d])."""
        return torch.arange(self.config.draft_vocab_size, device=self.d2t.device) + self.d2t

    @torch.no_grad()
    def load_target_embeddings(self, weight: torch.Tensor) -> None:
        """Copy the target's input embedding ([V, H]) and keep it frozen."""
        expected = (self.config.vocab_size, self.config.hidden_size)
        if tuple(weight.shape) != expected:
            raise ValueError(f"target embedding must have shape {expected}, got {tuple(weight.shape)}")
        self.embed_tokens.weight.copy_(weight)
        self.embed_tokens.weight.requires_grad_(False)

    # ----------------------------------------------------------------- pieces of the unroll
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings [B, T, H] (frozen table)."""
        return self.embed_tokens(input_ids)

    def project_hidden(self, aux_hidden_states: torch.Tensor) -> torch.Tensor:
        """Fuse the concatenated target aux states [B, T, 3*H_t] into g^(0) [B, T, H]."""
        return self.fc(aux_hidden_states.to(self.fc.weight.dtype))

    def decoder_step(
        self,
        input_embeds: torch.Tensor,
        hidden_states: torch.Tensor,
        cache_hidden: list[list[torch.Tensor]],
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One TTT step of the midlayer; appends this step's K/V to ``cache_hidden``.

        ``position_ids`` [B, T] are the step-0 positions (arange per row, or per-document
        positions for packed rows); the step offset is added inside the attention. Returns
        the pre-norm hidden state [B, T, H] to feed back into the next step.
        """
        if position_ids is None:
            bsz, seq_len = input_embeds.shape[:2]
            position_ids = torch.arange(seq_len, device=input_embeds.device).expand(bsz, seq_len)
        return self.midlayer(input_embeds, hidden_states, cache_hidden, attention_mask, position_ids)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Draft-vocab logits ``lm_head(norm(hidden))`` [B, T, V_d]."""
        return self.lm_head(self.norm(hidden_states))

    def set_attention_backend(self, backend: str) -> None:
        """Select the TTT attention kernel, ``"eager"`` or ``"flex"`` (see ``Eagle3Attention``)."""
        self.midlayer.self_attn.set_backend(backend)

    def set_compiled(self, compiled: bool) -> None:
        """Run the midlayer's pieces around the attention through ``torch.compile`` (or not)."""
        self.midlayer.compiled = bool(compiled)
