"""A LLaMA-style decoder: RMSNorm, rotary position embeddings, SwiGLU MLP, grouped-query attention.

The architecture follows Touvron et al. 2023, "LLaMA: Open and Efficient Foundation Language
Models", section 2: pre-normalisation with RMSNorm (Zhang & Sennrich 2019), the SwiGLU activation
(Shazeer 2020), rotary position embeddings (Su et al. 2021, "RoFormer"), no biases. Grouped-query
attention (Ainslie et al. 2023, "GQA") shares each key/value head among ``heads / kv_heads``
query heads. Causal attention runs through ``torch.nn.functional.scaled_dot_product_attention``.

Initialisation is reproducible per module: the embedding, every block and the LM head each draw
from their own ``torch.Generator`` seeded from ``(seed, module name)`` (:func:`module_seed`). So a
pipeline stage that builds only its own blocks (:func:`spotpipe.model.stages.build_stage`) gets
exactly the weights the same blocks have in the whole model, without building the rest, and
building a model leaves torch's global random state untouched. Weights are normal with standard
deviation 0.02; the two projections that write into the residual stream (attention output, MLP
down) use ``0.02 / sqrt(2 * layers)`` (Radford et al. 2019, GPT-2, section 2.3).
"""

from __future__ import annotations

import hashlib
import math

import torch
import torch.nn.functional as F
from torch import nn

from spotpipe.config import ModelConfig
from spotpipe.errors import ConfigError
from spotpipe.model.partition import ffn_hidden_size, head_dim, kv_heads

INIT_STD = 0.02

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


def module_seed(seed: int, name: str) -> int:
    """A 63-bit seed for module ``name`` (e.g. ``"embed"``, ``"block.3"``, ``"head"``) of run ``seed``.

    Args:
        seed: Run seed (``train.seed``).
        name: Module name.

    Returns:
        A seed in ``[0, 2**63)``, from the first 8 bytes of a SHA-256 of ``seed`` and ``name``.
    """
    digest = hashlib.sha256(f"spotpipe:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generator(seed: int, name: str) -> torch.Generator:
    gen = torch.Generator(device="cpu")
    gen.manual_seed(module_seed(seed, name))
    return gen


def _linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free Linear whose weights are left uninitialised (they are set by an init_* below)."""
    return torch.nn.utils.skip_init(nn.Linear, in_features, out_features, bias=False)


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Zhang & Sennrich 2019), computed in float32."""

    def __init__(self, dim: int, eps: float) -> None:
        """A norm over the last dimension with a learned gain, initialised to ones.

        Args:
            dim: Width of the normalised (last) dimension, ``d_model``.
            eps: Added to the mean square before the square root (``model.norm_eps``).
        """
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise ``x`` by its root mean square over the last dimension, in float32.

        Args:
            x: Tensor ``[..., dim]`` of any floating dtype.

        Returns:
            ``x / rms(x) * weight``, same shape and dtype as ``x``.
        """
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Rotary(nn.Module):
    """Rotary position embedding tables (RoFormer, Su et al. 2021, eq. 34).

    Dimension pair ``(i, i + head_dim/2)`` of the vector at position ``p`` is rotated by the angle
    ``p * theta ** (-2 i / head_dim)``, so the dot product of a rotated query at position ``m`` and a
    rotated key at position ``n`` depends on the positions only through ``m - n``. The tables are
    computed in float64, kept in float32 and cached per (length, device); they are not
    parameters and not part of the state dict.
    """

    def __init__(self, head_dim: int, theta: float) -> None:
        """Tables for heads of width ``head_dim``, computed lazily.

        Args:
            head_dim: Width of one attention head, even.
            theta: Base of the angle frequencies (``model.rope_theta``, 10000 in RoFormer).

        Raises:
            ConfigError: if ``head_dim`` is odd.
        """
        super().__init__()
        if head_dim % 2:
            raise ConfigError(f"rotary embeddings need an even head width, got {head_dim}")
        self.head_dim = head_dim
        self.theta = theta
        self._cache: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}

    def tables(self, length: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """``(cos, sin)``, each ``[length, head_dim / 2]`` float32 on ``device``.

        Args:
            length: Sequence length ``T``, in tokens.
            device: Device of the tables.

        Returns:
            The cached ``(cos, sin)`` pair.
        """
        key = (length, str(device))
        if key not in self._cache:
            half = self.head_dim // 2
            inv_freq = self.theta ** (-torch.arange(half, dtype=torch.float64) * 2 / self.head_dim)
            angles = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)
            self._cache[key] = (
                angles.cos().float().to(device),
                angles.sin().float().to(device),
            )
        return self._cache[key]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` of shape ``[B, H, T, head_dim]`` by the tables ``cos, sin`` (``[T, head_dim/2]``).

    Args:
        x: Queries or keys ``[B, H, T, head_dim]``.
        cos: Cosines ``[T, head_dim/2]`` from :meth:`Rotary.tables`.
        sin: Sines ``[T, head_dim/2]`` from :meth:`Rotary.tables`.

    Returns:
        The rotated tensor, same shape and dtype as ``x`` (computed in float32).
    """
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.to(x.dtype)


class Attention(nn.Module):
    """Causal multi-head attention with rotary embeddings and optional grouped-query heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        """The four bias-free projections ``wq``, ``wk``, ``wv``, ``wo`` (weights set by :func:`init_block`).

        Args:
            cfg: Model sizes (``d_model``, ``heads``, ``kv_heads``).
        """
        super().__init__()
        self.heads = cfg.heads
        self.kv_heads = kv_heads(cfg)
        self.head_dim = head_dim(cfg)
        d_kv = self.kv_heads * self.head_dim
        self.wq = _linear(cfg.d_model, cfg.d_model)
        self.wk = _linear(cfg.d_model, d_kv)
        self.wv = _linear(cfg.d_model, d_kv)
        self.wo = _linear(cfg.d_model, cfg.d_model)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Causal self-attention of ``x`` with rotary queries and keys.

        Args:
            x: Normalised hidden states ``[B, T, d_model]``.
            cos: Rotary cosines ``[T, head_dim/2]``.
            sin: Rotary sines ``[T, head_dim/2]``.

        Returns:
            The attention output after ``wo``, ``[B, T, d_model]``.
        """
        b, t, d = x.shape
        q = self.wq(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.wk(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.wv(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        if self.kv_heads != self.heads:  # query head h reads key/value head h // group
            group = self.heads // self.kv_heads
            k = k.repeat_interleave(group, dim=1)
            v = v.repeat_interleave(group, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(out.transpose(1, 2).reshape(b, t, d))


class SwiGLU(nn.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020, eq. 6)."""

    def __init__(self, cfg: ModelConfig) -> None:
        """The three bias-free projections ``w_gate``, ``w_up``, ``w_down``.

        Args:
            cfg: Model sizes (``d_model``, ``ffn_hidden``; see :func:`ffn_hidden_size`).
        """
        super().__init__()
        hidden = ffn_hidden_size(cfg)
        self.w_gate = _linear(cfg.d_model, hidden)
        self.w_up = _linear(cfg.d_model, hidden)
        self.w_down = _linear(hidden, cfg.d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The gated MLP of ``x``.

        Args:
            x: Normalised hidden states ``[B, T, d_model]``.

        Returns:
            The MLP output, ``[B, T, d_model]``.
        """
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class Block(nn.Module):
    """One pre-norm decoder block: ``x + attn(norm(x))``, then ``x + mlp(norm(x))``."""

    def __init__(self, cfg: ModelConfig) -> None:
        """Two RMSNorms, the attention and the MLP of one block.

        Args:
            cfg: Model sizes.
        """
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Apply the block to ``x``.

        Args:
            x: Hidden states ``[B, T, d_model]``.
            cos: Rotary cosines ``[T, head_dim/2]``.
            sin: Rotary sines ``[T, head_dim/2]``.

        Returns:
            The block's output, ``[B, T, d_model]``.
        """
        x = x + self.attn(self.attn_norm(x), cos, sin)
        return x + self.mlp(self.mlp_norm(x))


# ----------------------------------------------------------------------------------------------
# Construction with per-module seeds


@torch.no_grad()
def init_embedding(embed: nn.Embedding, seed: int) -> None:
    """Initialise the token embedding from its own generator (``(seed, "embed")``).

    Args:
        embed: The embedding ``[vocab_size, d_model]``, overwritten in place.
        seed: Run seed (``train.seed``).
    """
    embed.weight.normal_(0.0, INIT_STD, generator=_generator(seed, "embed"))


@torch.no_grad()
def init_block(block: Block, seed: int, layer: int, num_layers: int) -> None:
    """Initialise block ``layer`` (global index) from its own generator (``(seed, "block.<layer>")``).

    Args:
        block: The block, overwritten in place.
        seed: Run seed (``train.seed``).
        layer: Global index of the block, 0-based.
        num_layers: ``model.layers``; scales the residual projections' standard deviation.
    """
    gen = _generator(seed, f"block.{layer}")
    residual_std = INIT_STD / math.sqrt(2 * num_layers)
    for lin in (block.attn.wq, block.attn.wk, block.attn.wv):
        lin.weight.normal_(0.0, INIT_STD, generator=gen)
    block.attn.wo.weight.normal_(0.0, residual_std, generator=gen)
    block.mlp.w_gate.weight.normal_(0.0, INIT_STD, generator=gen)
    block.mlp.w_up.weight.normal_(0.0, INIT_STD, generator=gen)
    block.mlp.w_down.weight.normal_(0.0, residual_std, generator=gen)
    block.attn_norm.weight.fill_(1.0)
    block.mlp_norm.weight.fill_(1.0)


@torch.no_grad()
def init_head(head: nn.Linear, seed: int) -> None:
    """Initialise the LM head from its own generator (``(seed, "head")``).

    Args:
        head: The LM head ``[vocab_size, d_model]``, overwritten in place.
        seed: Run seed (``train.seed``).
    """
    head.weight.normal_(0.0, INIT_STD, generator=_generator(seed, "head"))


def make_embedding(cfg: ModelConfig, seed: int) -> nn.Embedding:
    """The token embedding, initialised from ``(seed, "embed")``.

    Args:
        cfg: Model sizes (``vocab_size``, ``d_model``).
        seed: Run seed (``train.seed``).

    Returns:
        An ``nn.Embedding`` with weight ``[vocab_size, d_model]`` in float32 on the CPU.
    """
    embed = torch.nn.utils.skip_init(nn.Embedding, cfg.vocab_size, cfg.d_model)
    init_embedding(embed, seed)
    return embed


def make_block(cfg: ModelConfig, seed: int, layer: int) -> Block:
    """Block number ``layer`` (global index), initialised from ``(seed, "block.<layer>")``.

    Args:
        cfg: Model sizes.
        seed: Run seed (``train.seed``).
        layer: Global index of the block, 0-based.

    Returns:
        The block, in float32 on the CPU.
    """
    block = Block(cfg)
    init_block(block, seed, layer, cfg.layers)
    return block


def make_head(cfg: ModelConfig, seed: int) -> nn.Linear:
    """The LM head (untied), initialised from ``(seed, "head")``.

    Args:
        cfg: Model sizes (``vocab_size``, ``d_model``).
        seed: Run seed (``train.seed``).

    Returns:
        A bias-free ``nn.Linear`` with weight ``[vocab_size, d_model]`` in float32 on the CPU.
    """
    head = _linear(cfg.d_model, cfg.vocab_size)
    init_head(head, seed)
    return head


def finish(module: nn.Module, cfg: ModelConfig, device: torch.device | str | None) -> None:
    """Cast to ``model.dtype`` and move to ``device`` (weights are always drawn on the CPU).

    Args:
        module: The module, changed in place.
        cfg: Model sizes (``dtype``).
        device: Where to move it; ``None`` leaves it where it is.

    Raises:
        ConfigError: if ``model.dtype`` is not one of :data:`TORCH_DTYPES`.
    """
    dtype = TORCH_DTYPES.get(cfg.dtype)
    if dtype is None:
        raise ConfigError(f"model.dtype must be one of {', '.join(TORCH_DTYPES)}, got {cfg.dtype!r}")
    module.to(dtype=dtype)
    if device is not None:
        module.to(device=device)


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token cross-entropy (computed in float32) of ``logits [B, T, V]`` against ``targets [B, T]``.

    Args:
        logits: Logits ``[B, T, V]``.
        targets: Next-token ids ``[B, T]`` (int64).

    Returns:
        A float32 scalar tensor.
    """
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


class Transformer(nn.Module):
    """The whole decoder in one module: ``embed``, ``blocks``, ``norm``, ``head``.

    Construct with :func:`build_model` for seeded weights; ``Transformer(cfg)`` alone draws them
    from seed 0.
    """

    def __init__(self, cfg: ModelConfig, seed: int = 0) -> None:
        """Build every module with its own seeded weights, in float32 on the CPU.

        Args:
            cfg: Model sizes.
            seed: Run seed for the per-module generators.
        """
        super().__init__()
        self.cfg = cfg
        self.embed = make_embedding(cfg, seed)
        self.blocks = nn.ModuleList(make_block(cfg, seed, i) for i in range(cfg.layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.tie_embeddings:
            self.head = _linear(cfg.d_model, cfg.vocab_size)
            self.head.weight = self.embed.weight
        else:
            self.head = make_head(cfg, seed)
        self.rotary = Rotary(head_dim(cfg), cfg.rope_theta)

    def hidden(self, tokens: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states ``[B, T, d_model]`` of ``tokens [B, T]``.

        Args:
            tokens: Token ids ``[B, T]`` (int64).

        Returns:
            Hidden states after the final RMSNorm.
        """
        cos, sin = self.rotary.tables(tokens.shape[1], tokens.device)
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x, cos, sin)
        return self.norm(x)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` for ``tokens [B, T]`` (int64).

        Args:
            tokens: Token ids ``[B, T]``.

        Returns:
            The logits, in the model's dtype.
        """
        return self.head(self.hidden(tokens))

    def loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Scalar mean token cross-entropy of predicting ``targets [B, T]`` from ``tokens [B, T]``.

        Args:
            tokens: Token ids ``[B, T]`` (int64).
            targets: Next-token ids ``[B, T]`` (int64).

        Returns:
            A float32 scalar tensor.
        """
        return lm_loss(self.forward(tokens), targets)


def build_model(cfg: ModelConfig, seed: int, device: torch.device | str | None = None) -> Transformer:
    """The whole model with per-module seeded weights, in ``model.dtype``, on ``device`` (CPU default).

    Its blocks hold the same initial weights as the chunks of
    :func:`spotpipe.model.stages.build_stage` with the same ``seed``.

    Args:
        cfg: Model sizes and ``model.dtype``.
        seed: Run seed (``train.seed``).
        device: Where to put the model; ``None`` keeps it on the CPU.

    Returns:
        The :class:`Transformer`.

    Raises:
        ConfigError: if ``model.dtype`` is unknown, or on a bad head width (odd ``head_dim``).
    """
    model = Transformer(cfg, seed)
    finish(model, cfg, device)
    return model
