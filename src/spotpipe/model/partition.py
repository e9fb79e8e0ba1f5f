"""How the decoder is cut into pipeline chunks, and what each chunk costs (no torch import).

A model with ``L`` transformer blocks is cut into ``n`` contiguous chunks. Chunk 0 also holds the
token embedding; the last chunk also holds the final RMSNorm and the LM head (and the loss). The
simulator's cost model and the memory model read :func:`model_shapes`, so this module stays pure
Python: it must never import torch.

FLOP counts follow the accounting of PaLM (Chowdhery et al. 2022, appendix B): a forward pass
costs ``2 * N`` FLOPs per token for the ``N`` weights of the matrix multiplications, plus
``4 * d_model * T`` per layer per token for the attention scores (``Q K^T``) and their product
with ``V`` over a context of ``T`` tokens (counted as if non-causal, as PaLM does). The backward
pass costs about twice the forward.

Activation bytes per sequence count the tensors autograd keeps for the backward pass of the
reference implementation in :mod:`spotpipe.model.transformer` (see
:func:`block_activation_elements`), in the spirit of Korthikanti et al. 2022, "Reducing
Activation Recomputation in Large Transformer Models", section 4.1, adapted to RMSNorm, rotary
embeddings and SwiGLU, with the attention probabilities materialised (the CPU math path).
"""

from __future__ import annotations

from dataclasses import dataclass

from spotpipe.config import ModelConfig
from spotpipe.errors import ConfigError

DTYPE_BYTES: dict[str, int] = {"float32": 4, "bfloat16": 2, "float16": 2}

ADAMW_MOMENTS = 2  # exp_avg and exp_avg_sq per parameter (AdamW; Loshchilov and Hutter 2019)


def optimizer_bytes_per_param(dtype_bytes: int) -> int:
    """Optimizer-state bytes per parameter of a model whose weights take ``dtype_bytes`` each:
    AdamW's two moments in float32 (8), plus 4 for the float32 master weight when the weights are
    16-bit (mixed precision: Micikevicius et al. 2018; :mod:`spotpipe.runtime.state.master`).

    Args:
        dtype_bytes: Bytes per weight element of ``model.dtype`` (4, or 2 for 16-bit).

    Returns:
        Bytes of optimizer state per parameter: 8, or 12 for 16-bit weights.
    """
    return 4 * ADAMW_MOMENTS + (4 if dtype_bytes < 4 else 0)


def partition_layers(num_layers: int, num_chunks: int) -> list[tuple[int, int]]:
    """Cut ``num_layers`` blocks into ``num_chunks`` contiguous, balanced ``[start, end)`` ranges.

    Chunk sizes differ by at most one; the earlier chunks take the remainder (chunk 0 also holds
    the embedding, which is cheap, while the last chunk holds the LM head, which is not).

    Args:
        num_layers: Number of transformer blocks (``model.layers``), >= 1.
        num_chunks: Number of chunks (pipeline stages x virtual stages), 1..num_layers.

    Returns:
        One ``(start, end)`` pair per chunk, covering ``0..num_layers`` in order.

    Raises:
        ConfigError: if ``num_chunks`` is not in ``[1, num_layers]``.
    """
    if num_layers < 1:
        raise ConfigError(f"model.layers must be >= 1, got {num_layers}")
    if not 1 <= num_chunks <= num_layers:
        raise ConfigError(
            f"cannot cut model.layers ({num_layers}) into {num_chunks} chunks: the number of "
            f"chunks (pipeline.stages x virtual stages) must be in [1, {num_layers}]"
        )
    base, extra = divmod(num_layers, num_chunks)
    ranges: list[tuple[int, int]] = []
    start = 0
    for i in range(num_chunks):
        end = start + base + (1 if i < extra else 0)
        ranges.append((start, end))
        start = end
    return ranges


def ffn_hidden_size(cfg: ModelConfig) -> int:
    """SwiGLU hidden width: ``model.ffn_hidden``, or 8/3 x d_model rounded up to a multiple of 32.

    The 8/3 factor keeps the parameter count of a 4x GELU MLP with three matrices instead of two
    (Shazeer 2020, "GLU Variants Improve Transformer"; Touvron et al. 2023, LLaMA, section 2).

    Args:
        cfg: Model sizes (``d_model``, ``ffn_hidden``).

    Returns:
        The MLP hidden width, in elements.
    """
    if cfg.ffn_hidden > 0:
        return cfg.ffn_hidden
    raw = -(-8 * cfg.d_model // 3)  # ceil(8 d / 3)
    return -(-raw // 32) * 32


def kv_heads(cfg: ModelConfig) -> int:
    """Number of key/value heads (``model.kv_heads``, 0 meaning one per query head).

    Args:
        cfg: Model sizes (``heads``, ``kv_heads``).

    Returns:
        The number of key/value heads, 1..heads.
    """
    return cfg.kv_heads or cfg.heads


def head_dim(cfg: ModelConfig) -> int:
    """Width of one attention head.

    Args:
        cfg: Model sizes (``d_model``, ``heads``).

    Returns:
        ``d_model // heads``, in elements.
    """
    return cfg.d_model // cfg.heads


def block_params(cfg: ModelConfig) -> int:
    """Parameters of one transformer block: attention, SwiGLU MLP and two RMSNorm gains.

    Args:
        cfg: Model sizes.

    Returns:
        The number of parameters of one block.
    """
    d, f = cfg.d_model, ffn_hidden_size(cfg)
    d_kv = kv_heads(cfg) * head_dim(cfg)
    attention = d * d + 2 * d * d_kv + d * d  # wq, wk, wv, wo
    mlp = 3 * d * f  # w_gate, w_up, w_down
    return attention + mlp + 2 * d


def block_activation_elements(cfg: ModelConfig, context: int) -> int:
    """Elements one block keeps for backward, per sequence of ``context`` tokens.

    Per token: the RMSNorm inputs and outputs (4 d), q/k/v before rotation (d + 2 d_kv), q and k
    after rotation (d + d_kv), the attention output (d), the four SwiGLU tensors (gate, up,
    silu(gate), product: 4 f); plus the attention probabilities, ``heads x T`` per token.

    Args:
        cfg: Model sizes.
        context: Sequence length ``T``, in tokens.

    Returns:
        The number of elements one block keeps per sequence (multiply by the dtype's bytes).
    """
    d, f = cfg.d_model, ffn_hidden_size(cfg)
    d_kv = kv_heads(cfg) * head_dim(cfg)
    per_token = 4 * d + (d + 2 * d_kv) + (d + d_kv) + d + 4 * f + cfg.heads * context
    return per_token * context


@dataclass(frozen=True)
class ChunkShape:
    """Size and cost of one model chunk, for the cost and memory models.

    Attributes:
        index: Chunk number, 0-based.
        layer_start: First block of the chunk.
        layer_end: One past the last block.
        params: Number of parameters the chunk holds.
        forward_flops_per_token: Forward FLOPs per token (PaLM accounting; backward ~2x).
        activation_bytes_per_sequence: Bytes kept for backward per sequence of ``model.context``
            tokens, in ``model.dtype`` (the last chunk includes logits and log-probabilities).
        boundary_bytes_per_sequence: Bytes of the hidden state this chunk sends forward (and of
            the gradient it receives back) per sequence; 0 for the last chunk.
        dtype_bytes: Bytes per element of ``model.dtype``.
    """

    index: int
    layer_start: int
    layer_end: int
    params: int
    forward_flops_per_token: int
    activation_bytes_per_sequence: int
    boundary_bytes_per_sequence: int
    dtype_bytes: int

    @property
    def num_layers(self) -> int:
        """Number of transformer blocks in the chunk."""
        return self.layer_end - self.layer_start

    @property
    def param_bytes(self) -> int:
        """Bytes of the chunk's weights in ``model.dtype``."""
        return self.params * self.dtype_bytes


def model_shapes(cfg: ModelConfig, num_chunks: int) -> list[ChunkShape]:
    """Per-chunk parameter count, forward FLOPs per token and activation bytes per sequence.

    Args:
        cfg: Model sizes.
        num_chunks: Number of contiguous chunks (see :func:`partition_layers`).

    Returns:
        One :class:`ChunkShape` per chunk. ``sum(s.params)`` equals the parameter count of the
        whole model built by :func:`spotpipe.model.transformer.build_model`, except that with
        ``model.tie_embeddings`` the last chunk counts the head (shared with the embedding) only
        when it is also the first chunk.
    """
    ranges = partition_layers(cfg.layers, num_chunks)
    nbytes = DTYPE_BYTES.get(cfg.dtype, 4)
    d, v, t = cfg.d_model, cfg.vocab_size, cfg.context
    per_block_params = block_params(cfg)
    per_block_matmul = per_block_params - 2 * d  # norm gains do no matmul
    per_block_flops = 2 * per_block_matmul + 4 * d * t
    per_block_act = block_activation_elements(cfg, t)
    shapes: list[ChunkShape] = []
    for i, (start, end) in enumerate(ranges):
        n = end - start
        first, last = i == 0, i == num_chunks - 1
        params = n * per_block_params
        flops = n * per_block_flops
        act = n * per_block_act
        if first:
            params += v * d
        if last:
            params += d  # final norm
            if not (cfg.tie_embeddings and first):
                params += v * d
            flops += 2 * v * d
            act += 2 * d * t + 2 * v * t  # final norm in/out, logits, log-softmax
        shapes.append(
            ChunkShape(
                index=i,
                layer_start=start,
                layer_end=end,
                params=params,
                forward_flops_per_token=flops,
                activation_bytes_per_sequence=act * nbytes,
                boundary_bytes_per_sequence=0 if last else d * t * nbytes,
                dtype_bytes=nbytes,
            )
        )
    return shapes
