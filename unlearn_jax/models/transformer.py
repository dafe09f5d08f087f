r"""A decoder-only transformer language model (Flax linen) with logical partitioning annotations.

The network, for tokens :math:`x \in \{0..V-1\}^{T}` (batched ``[B, T]``):

.. math::
    h_0 &= \sqrt{D}\, E[x], \\
    h_\ell &= g_\ell + \operatorname{MLP}_\ell(\operatorname{norm}(g_\ell)), \quad
    g_\ell = h_{\ell-1} + \operatorname{Attn}_\ell(\operatorname{norm}(h_{\ell-1})), \\
    \text{logits} &= \operatorname{norm}(h_L)\, E^\top \in \mathbb{R}^{T \times V},

pre-norm residual blocks (RMSNorm or LayerNorm), multi-head causal self-attention with rotary
position embeddings (RoPE) on queries and keys, a GELU or SwiGLU MLP, and the output projection
tied to the input embedding :math:`E \in \mathbb{R}^{V \times D}` (``params["embed"]["embedding"]``).
No biases, no dropout: the only variable collection is ``"params"``, so the model is a pure function
of one sequence and ``vmap`` gives per-example quantities.

Parameter layout (``L`` layers; ``H`` heads of size ``Dh``; MLP width ``F``)::

    embed/embedding                [V, D]      ("vocab", "embed")
    layers_{i}/attn_norm/scale     [D]         ("norm",)          (+ bias for LayerNorm)
    layers_{i}/attn/{query,key,value}/kernel   [D, H, Dh]  ("embed", "heads", "kv")
    layers_{i}/attn/out/kernel     [H, Dh, D]  ("heads", "kv", "embed")
    layers_{i}/mlp_norm/scale      [D]         ("norm",)
    layers_{i}/mlp/wi/kernel       [D, F]      ("embed", "mlp")   (SwiGLU: wi_gate and wi_up)
    layers_{i}/mlp/wo/kernel       [F, D]      ("mlp", "embed")
    final_norm/scale               [D]         ("norm",)

With ``scan_layers=True`` the ``L`` blocks are one ``nn.scan``: a single subtree ``layers/...`` whose
leaves carry a leading ``[L]`` axis named ``"layers"`` (``layers/attn/query/kernel [L, D, H, Dh]``).
Scanned and unrolled models compute the same function: stacking the unrolled ``layers_{i}`` leaves
along a new axis 0 gives the scanned parameters (:func:`stack_layers` does it).

Logical axis names. Every parameter is created through ``nn.with_logical_partitioning``, so
``model.init`` returns ``nn.LogicallyPartitioned`` boxes whose ``names`` are the logical axes above
(``nn.get_partition_spec(variables)`` reads them). The rest of unlearn_jax works on plain arrays:
unbox them with ``nn.unbox(variables)`` (``unlearn_jax.training.create_train_state`` does), and keep
the names for the sharding rules with :func:`unlearn_jax.sharding.logical_axes` (which reads the
boxes of ``model.init`` or of ``jax.eval_shape(model.init, ...)``; no arrays are needed).
``apply`` accepts plain (unboxed) parameters.

Activations of a middle layer (e.g. for RMU): :meth:`TransformerLM.hidden_states` returns the
residual stream after ``layer`` blocks. Unrolled, it runs only those blocks; with ``scan_layers`` the
scan cannot stop early, so it runs all ``L`` blocks and stacks their outputs (``[L, B, T, D]`` of
extra memory before indexing): prefer ``scan_layers=False`` for middle-layer objectives.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unlearn_jax import _validate

NORMS = ("rmsnorm", "layernorm")
MLPS = ("gelu", "swiglu")
DTYPES = ("float32", "bfloat16")

# Logical axis names of the parameters; unlearn_jax.sharding maps them to mesh axes.
VOCAB, EMBED, HEADS, KV, MLP_AXIS, NORM, LAYERS = (
    "vocab",
    "embed",
    "heads",
    "kv",
    "mlp",
    "norm",
    "layers",
)


def rope(x: jax.Array, positions: jax.Array, base: float = 10_000.0) -> jax.Array:
    r"""Rotary position embedding of queries or keys ``x [B, T, H, Dh]`` at ``positions [T]``.

    The feature pairs :math:`(x_i, x_{i + Dh/2})`, :math:`i < Dh/2`, are rotated by the angle
    :math:`p\,\theta_i`, :math:`\theta_i = \text{base}^{-2i/Dh}`, at position :math:`p`:

    .. math::
        x'_i = x_i \cos(p\theta_i) - x_{i+Dh/2} \sin(p\theta_i), \qquad
        x'_{i+Dh/2} = x_{i+Dh/2} \cos(p\theta_i) + x_i \sin(p\theta_i).

    Rotations compose, so the score of a rotated query at position :math:`m` and key at :math:`n`,
    :math:`\langle R_m q, R_n k \rangle = \langle q, R_{n-m} k \rangle`, depends on :math:`n - m`
    only: shifting every position by the same offset leaves attention scores unchanged.

    Args:
      x: ``[B, T, H, Dh]`` with ``Dh`` even.
      positions: ``[T]`` integer or float positions.
      base: the wavelength base (10000 in the original paper).

    Returns:
      ``[B, T, H, Dh]`` in ``x``'s dtype; the rotation is computed in float32.

    Raises:
      ValueError: if ``Dh`` is odd or ``positions`` does not have shape ``[T]``.

    References:
      Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021.
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"rope needs an even head dimension, got {head_dim=}.")
    if positions.shape != (x.shape[1],):
        raise ValueError(
            f"positions must have shape [T] = ({x.shape[1]},) for x of shape {x.shape}, got "
            f"{positions.shape}."
        )
    half = head_dim // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / head_dim)  # [Dh/2]
    angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]  # [T, Dh/2]
    sin = jnp.sin(angles)[None, :, None, :]  # [1, T, 1, Dh/2]
    cos = jnp.cos(angles)[None, :, None, :]
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


def _logical(init: Any, names: tuple[str, ...]) -> Any:
    return nn.with_logical_partitioning(init, names)


def _norm(kind: str, dtype: Any, name: str) -> nn.Module:
    if kind == "rmsnorm":
        return nn.RMSNorm(
            epsilon=1e-6, dtype=dtype, scale_init=_logical(nn.initializers.ones, (NORM,)), name=name
        )
    return nn.LayerNorm(
        epsilon=1e-6,
        dtype=dtype,
        scale_init=_logical(nn.initializers.ones, (NORM,)),
        bias_init=_logical(nn.initializers.zeros, (NORM,)),
        name=name,
    )


class CausalSelfAttention(nn.Module):
    r"""Multi-head causal self-attention with RoPE on ``h [B, T, D]``.

    .. math::
        q, k, v = h W_Q, h W_K, h W_V \in \mathbb{R}^{T \times H \times Dh}, \quad
        A_{h,t,s} = \operatorname{softmax}_{s \le t}
        \Big(\tfrac{\langle \operatorname{rope}(q)_{t,h}, \operatorname{rope}(k)_{s,h}\rangle}
        {\sqrt{Dh}}\Big), \quad
        \text{out}_t = \textstyle\sum_h \sum_s A_{h,t,s}\, v_{s,h} W_{O,h}.

    Scores and softmax are computed in float32 whatever the compute dtype.
    """

    num_heads: int
    head_dim: int
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        d_model = h.shape[-1]
        seq_len = h.shape[1]
        init = nn.initializers.lecun_normal()

        def project(name: str) -> jax.Array:
            return nn.DenseGeneral(
                features=(self.num_heads, self.head_dim),
                use_bias=False,
                dtype=self.dtype,
                kernel_init=_logical(init, (EMBED, HEADS, KV)),
                name=name,
            )(h)

        positions = jnp.arange(seq_len)
        q = rope(project("query"), positions, self.rope_base)
        k = rope(project("key"), positions, self.rope_base)
        v = project("value")
        scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        scores = scores / np.sqrt(self.head_dim).astype(np.float32)
        causal = jnp.tril(jnp.ones((seq_len, seq_len), dtype=bool))
        scores = jnp.where(causal[None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        mixed = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
        return nn.DenseGeneral(
            features=d_model,
            axis=(-2, -1),
            use_bias=False,
            dtype=self.dtype,
            kernel_init=_logical(init, (HEADS, KV, EMBED)),
            name="out",
        )(mixed)


class FeedForward(nn.Module):
    r"""The position-wise MLP on ``h [B, T, D]``.

    GELU: :math:`\operatorname{gelu}(h W_i) W_o`; SwiGLU:
    :math:`(\operatorname{silu}(h W_{\text{gate}}) \odot h W_{\text{up}}) W_o`, with
    :math:`W_i, W_{\text{gate}}, W_{\text{up}} \in \mathbb{R}^{D \times F}`,
    :math:`W_o \in \mathbb{R}^{F \times D}`.
    """

    mlp_dim: int
    activation: str = "gelu"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        """``[B, T, D] -> [B, T, D]``."""
        init = nn.initializers.lecun_normal()

        def dense(features: int, names: tuple[str, ...], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                use_bias=False,
                dtype=self.dtype,
                kernel_init=_logical(init, names),
                name=name,
            )

        if self.activation == "swiglu":
            gate = dense(self.mlp_dim, (EMBED, MLP_AXIS), "wi_gate")(h)
            up = dense(self.mlp_dim, (EMBED, MLP_AXIS), "wi_up")(h)
            inner = nn.silu(gate) * up
        else:
            inner = nn.gelu(dense(self.mlp_dim, (EMBED, MLP_AXIS), "wi")(h))
        return dense(h.shape[-1], (MLP_AXIS, EMBED), "wo")(inner)


class Block(nn.Module):
    """One pre-norm residual block: ``h + attn(norm(h))``, then ``g + mlp(norm(g))``.

    The call signature ``(h, unused) -> (h, h or None)`` is that of an ``nn.scan`` body: the carry is
    the residual stream ``[B, T, D]``; with ``emit=True`` the block's output is also emitted (the
    scan stacks them), which :meth:`TransformerLM.hidden_states` uses.
    """

    num_heads: int
    head_dim: int
    mlp_dim: int
    norm: str = "rmsnorm"
    mlp: str = "gelu"
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32
    emit: bool = False

    @nn.compact
    def __call__(self, h: jax.Array, unused: Any = None) -> tuple[jax.Array, jax.Array | None]:
        """``h [B, T, D] -> (h' [B, T, D], h' if emit else None)``."""
        del unused
        attn = CausalSelfAttention(
            self.num_heads, self.head_dim, self.rope_base, self.dtype, name="attn"
        )
        h = h + attn(_norm(self.norm, self.dtype, "attn_norm")(h))
        mlp = FeedForward(self.mlp_dim, self.mlp, self.dtype, name="mlp")
        h = h + mlp(_norm(self.norm, self.dtype, "mlp_norm")(h))
        return h, (h if self.emit else None)


class TransformerLM(nn.Module):
    r"""Decoder-only transformer language model: tokens ``[B, T]`` -> next-token logits ``[B, T, V]``.

    See the module docstring for the equations, parameter layout and logical axis names. Its task
    kind is ``"sequence"``: with :func:`unlearn_jax.models.model_task`, the loss of one sequence is
    :math:`-\sum_t w_t \log p_\theta(y_t \mid x_{\le t})` with ``batch["y"]`` the next tokens and
    ``batch["weights"]`` the token mask.

    Attributes:
      num_outputs: ``V``, the vocabulary size (named as every model's output count, so that
        :func:`~unlearn_jax.models.get_model` builds it like the others).
      d_model: ``D``, the width of the residual stream.
      num_layers: ``L``, the number of blocks.
      num_heads: ``H``.
      head_dim: ``Dh`` (even, for RoPE); ``None`` means ``D // H`` (then ``H`` must divide ``D``).
      mlp_dim: ``F``, the MLP's hidden width.
      max_len: the longest accepted sequence ``T`` (RoPE itself has no table; this bounds inputs).
      mlp: ``"gelu"`` or ``"swiglu"``.
      norm: ``"rmsnorm"`` or ``"layernorm"``.
      scan_layers: one ``nn.scan`` over the blocks (compile time independent of ``L``; parameters
        stacked with a leading ``[L]`` axis named ``"layers"``).
      remat: recompute each block's activations in the backward pass (``nn.remat``): memory
        ``O(L B T D)`` of saved residuals instead of every intermediate. Same values and gradients.
      rope_base: RoPE's wavelength base.
      dtype: compute dtype, ``"float32"`` or ``"bfloat16"`` (parameters stay float32; attention
        scores and softmax are computed in float32; logits are returned as float32).
    """

    num_outputs: int
    d_model: int = 128
    num_layers: int = 2
    num_heads: int = 4
    head_dim: int | None = None
    mlp_dim: int = 512
    max_len: int = 128
    mlp: str = "gelu"
    norm: str = "rmsnorm"
    scan_layers: bool = False
    remat: bool = False
    rope_base: float = 10_000.0
    dtype: str = "float32"
    kind: ClassVar[str] = "sequence"

    # ---- public methods -----------------------------------------------------------------------
    def __call__(self, x: jax.Array) -> jax.Array:
        """Next-token logits ``[B, T, V]`` (float32) of tokens ``x [B, T]`` (int)."""
        return self._run(x, upto=None, head=True)

    def features(self, x: jax.Array) -> jax.Array:
        """The final normalised hidden states ``[B, T, D]``: ``logits = features @ E^T``."""
        return self._run(x, upto=None, head=False)

    def hidden_states(self, x: jax.Array, layer: int) -> jax.Array:
        r"""The residual stream :math:`h_\ell` ``[B, T, D]`` after ``layer`` blocks.

        ``layer = 0`` is the scaled embedding :math:`h_0`, ``layer = L`` the last block's output
        (before the final norm). Unrolled, only the first ``layer`` blocks run; with
        ``scan_layers`` all ``L`` run (see the module docstring).

        Raises:
          ValueError: unless ``0 <= layer <= num_layers``.
        """
        if isinstance(layer, bool) or not isinstance(layer, int | np.integer):
            raise ValueError(f"layer must be a Python int, got {layer=!r}.")
        if not 0 <= layer <= self.num_layers:
            raise ValueError(f"{layer=} must lie in [0, num_layers={self.num_layers}].")
        return self._run(x, upto=int(layer), head=False)

    # ---- the network -------------------------------------------------------------------------
    @nn.compact
    def _run(self, x: jax.Array, upto: int | None, head: bool) -> jax.Array:
        self._check_config()
        self._check_input(x)
        dtype = jnp.dtype(self.dtype)
        embed = nn.Embed(
            self.num_outputs,
            self.d_model,
            dtype=dtype,
            embedding_init=_logical(
                nn.initializers.normal(stddev=1.0 / math.sqrt(self.d_model)), (VOCAB, EMBED)
            ),
            name="embed",
        )
        # sqrt(D) * E[x] has unit scale at initialisation while E^T keeps logits of unit scale.
        h = embed(x) * jnp.asarray(math.sqrt(self.d_model), dtype)
        block_kwargs = dict(
            num_heads=self.num_heads,
            head_dim=self._head_dim,
            mlp_dim=self.mlp_dim,
            norm=self.norm,
            mlp=self.mlp,
            rope_base=self.rope_base,
            dtype=dtype,
        )
        block_cls = nn.remat(Block, prevent_cse=not self.scan_layers) if self.remat else Block
        if self.scan_layers:
            h0, emit = h, upto is not None
            stack = nn.scan(
                block_cls,
                variable_axes={"params": 0},
                split_rngs={"params": True},
                length=self.num_layers,
                metadata_params={nn.PARTITION_NAME: LAYERS},
            )(**block_kwargs, emit=emit, name="layers")
            h, emitted = stack(h, None)
            if emit:
                return h0 if upto == 0 else emitted[upto - 1]
        else:
            for i in range(self.num_layers if upto is None else upto):
                h, _ = block_cls(**block_kwargs, name=f"layers_{i}")(h, None)
            if upto is not None:
                return h
        h = _norm(self.norm, dtype, "final_norm")(h)
        if not head:
            return h
        return embed.attend(h).astype(jnp.float32)

    # ---- checks ------------------------------------------------------------------------------
    @property
    def _head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.d_model // self.num_heads

    def _check_config(self) -> None:
        _validate.positive_int(
            num_outputs=self.num_outputs,
            d_model=self.d_model,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            head_dim=self.head_dim,
            mlp_dim=self.mlp_dim,
            max_len=self.max_len,
        )
        _validate.one_of("mlp", self.mlp, MLPS)
        _validate.one_of("norm", self.norm, NORMS)
        _validate.one_of("dtype", self.dtype, DTYPES)
        _validate.positive(rope_base=self.rope_base)
        if self.head_dim is None and self.d_model % self.num_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must divide d_model={self.d_model} when head_dim is "
                "None; pass head_dim explicitly otherwise."
            )
        if self._head_dim % 2:
            raise ValueError(f"the head dimension {self._head_dim} must be even for RoPE.")

    def _check_input(self, x: jax.Array) -> None:
        if x.ndim != 2 or not jnp.issubdtype(x.dtype, jnp.integer):
            raise ValueError(
                f"{type(self).__name__} expects integer token ids of shape [B, T], got shape "
                f"{tuple(x.shape)} and dtype {x.dtype}; pass x[None] for one sequence."
            )
        if x.shape[1] > self.max_len:
            raise ValueError(
                f"sequence length {x.shape[1]} exceeds max_len={self.max_len}; build the model "
                "with a larger max_len or truncate the inputs."
            )


class LMTiny(TransformerLM):
    """``"lm-tiny"``: D 128, 2 layers, 4 heads, MLP 512, max length 128 (0.39M + 128 V parameters)."""


class LM100M(TransformerLM):
    """``"lm-100m"``: D 768, 12 layers, 12 heads, MLP 3072, scanned and rematerialised.

    84.95M parameters in the blocks plus ``768 V`` in the embedding: 109.5M at ``V = 32000``.
    """

    d_model: int = 768
    num_layers: int = 12
    num_heads: int = 12
    mlp_dim: int = 3072
    max_len: int = 1024
    scan_layers: bool = True
    remat: bool = True


class LM1B(TransformerLM):
    """``"lm-1b"``: D 2048, 18 layers, 16 heads (Dh 128), MLP 8192, scanned and rematerialised.

    906M parameters in the blocks plus ``2048 V`` in the embedding: 0.97B at ``V = 32000``.
    """

    d_model: int = 2048
    num_layers: int = 18
    num_heads: int = 16
    mlp_dim: int = 8192
    max_len: int = 2048
    scan_layers: bool = True
    remat: bool = True


def num_params(model: TransformerLM) -> int:
    r"""The parameter count of ``model`` in closed form (no initialisation).

    .. math:: V D + L\,(4 D H D_h + k F D + n D) + n' D,

    with :math:`k = 2` (GELU) or 3 (SwiGLU), :math:`n = 2` norms per block and :math:`n' = 1`
    final norm, each holding :math:`D` (RMSNorm) or :math:`2D` (LayerNorm) parameters.
    """
    d, heads, hd = model.d_model, model.num_heads, model._head_dim
    per_norm = d if model.norm == "rmsnorm" else 2 * d
    mlp_mats = 3 if model.mlp == "swiglu" else 2
    block = 4 * d * heads * hd + mlp_mats * model.mlp_dim * d + 2 * per_norm
    return model.num_outputs * d + model.num_layers * block + per_norm


def stack_layers(params: dict[str, Any], num_layers: int) -> dict[str, Any]:
    """Unrolled parameters (``layers_0 ... layers_{L-1}``) -> scanned ones (``layers`` with ``[L]``).

    ``TransformerLM(scan_layers=True)`` applied to the result computes the same function as
    ``TransformerLM(scan_layers=False)`` applied to ``params``.

    Raises:
      ValueError: if a ``layers_{i}`` subtree is missing.
    """
    names = [f"layers_{i}" for i in range(num_layers)]
    missing = [n for n in names if n not in params]
    if missing:
        raise ValueError(f"params lack the unrolled blocks {missing}; got keys {sorted(params)}.")
    out = {k: v for k, v in params.items() if k not in names}
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *(params[n] for n in names))
    return out


CONFIGS: dict[str, type[TransformerLM]] = {
    "transformer": TransformerLM,
    "lm-tiny": LMTiny,
    "lm-100m": LM100M,
    "lm-1b": LM1B,
}

__all__ = [
    "CONFIGS",
    "LM1B",
    "LM100M",
    "Block",
    "CausalSelfAttention",
    "FeedForward",
    "LMTiny",
    "TransformerLM",
    "num_params",
    "rope",
    "stack_layers",
]
