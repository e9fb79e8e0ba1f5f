"""Stage state on the wire (issue 5): flat rank state, CheckFree install, tied copies, P2P.

The controller decides (:mod:`spotpipe.runtime.control.recovery`); each worker of the new generation
carries the decision out (:mod:`spotpipe.runtime.worker.recovery`) with these pieces. A rank's
state travels as one flat float tensor (every chunk's state-dict tensors, then AdamW's
``exp_avg`` and ``exp_avg_sq`` per parameter, then a tail of per-chunk ``step``, ``lr_scale``
and "has optimizer state" flags). Both ends build the same layout from their own chunks, which
have identical shapes, so nothing but the numbers moves. The transfers use the new generation's
world group (gloo/NCCL point-to-point), the path checkpointless training takes (SageMaker
HyperPod, 2025: peer-to-peer state, fresh communicators, processes kept).

Strategies, as the worker executes them (the rules are in :mod:`spotpipe.ft.policy`):

- ``replica``: the live replica of the same stage sends its full state (exact).
- ``mirror``: the previous stage's worker sends the copy it keeps (:mod:`spotpipe.runtime.worker.mirror`).
- ``checkfree+``: the swap partner sends its full state; its blocks become the lost edge
  stage's, its embedding or norm + head copy is the exact original (CheckFree+, section 3.2).
- ``checkfree``: both neighbours send their blocks and their last pre-clip gradient norm; the
  replacement installs :func:`spotpipe.runtime.state.rules.checkfree_rebuild`, fresh optimizer state and
  ``lr x 1.1`` (CheckFree; Blagoev, Ersoy, Chen 2025, section 3.1).
- ``checkpoint``: every worker loads the last complete checkpoint (the fallback when adjacent
  stages are lost together: never continue with garbage weights).
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Iterable
from typing import Any

import torch

from spotpipe.runtime.state.rules import BLOCK_PREFIX, checkfree_rebuild, complete_state

TAG_BASE = 900_000


# ----------------------------------------------------------------------------------------------
# Flat rank state


def _optim_tensors(optimizer: torch.optim.Optimizer, p: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    st = optimizer.state.get(p) or {}
    return st.get("exp_avg"), st.get("exp_avg_sq")


def rank_numel(chunks: dict[int, Any], blocks_only: bool = False) -> int:
    """Length of the flat state of these chunks (full, or blocks only for CheckFree)."""
    n = 0
    for s in sorted(chunks):
        sd = chunks[s].state_dict()
        for k, v in sd.items():
            if not blocks_only or k.startswith(BLOCK_PREFIX):
                n += v.numel()
        if not blocks_only:
            n += 2 * sum(p.numel() for p in chunks[s].parameters())
    return n + (3 * len(chunks) if not blocks_only else 1)


def flatten_rank(chunks: dict[int, Any], optimizers: dict[int, Any], lr_scale: dict[int, float]) -> torch.Tensor:
    """Weights, AdamW moments and per-chunk (step, lr_scale, has_state) as one float32 CPU tensor."""
    parts: list[torch.Tensor] = []
    tail: list[float] = []
    for s in sorted(chunks):
        parts += [v.detach().reshape(-1).float().cpu() for v in chunks[s].state_dict().values()]
        step, has = 0.0, 0.0
        for p in chunks[s].parameters():
            a, b = _optim_tensors(optimizers[s], p)
            if a is None or b is None:
                parts += [torch.zeros(p.numel()), torch.zeros(p.numel())]
            else:
                has = 1.0
                parts += [a.detach().reshape(-1).float().cpu(), b.detach().reshape(-1).float().cpu()]
                st = optimizers[s].state[p].get("step", 0.0)
                step = float(st.item() if isinstance(st, torch.Tensor) else st)
        tail += [step, float(lr_scale.get(s, 1.0)), has]
    parts.append(torch.tensor(tail, dtype=torch.float32))
    return torch.cat(parts)


def unflatten_rank(flat: torch.Tensor, chunks: dict[int, Any], optimizers: dict[int, Any], lr_scale: dict[int, float]) -> None:
    """Install a flat state made by :func:`flatten_rank` (in place: ``.grad`` views stay)."""
    off = 0
    pending: list[tuple[int, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]]] = []
    with torch.no_grad():
        for s in sorted(chunks):
            for v in chunks[s].state_dict().values():
                n = v.numel()
                v.copy_(flat[off : off + n].view_as(v).to(v.dtype))
                off += n
            moments = []
            for p in chunks[s].parameters():
                n = p.numel()
                a = flat[off : off + n].view_as(p).to(p.dtype).clone()
                b = flat[off + n : off + 2 * n].view_as(p).to(p.dtype).clone()
                off += 2 * n
                moments.append((p, a, b))
            pending.append((s, moments))
    for j, (s, moments) in enumerate(pending):
        step, scale, has = (float(x) for x in flat[off + 3 * j : off + 3 * j + 3])
        lr_scale[s] = float(torch.tensor(scale, dtype=torch.float32))  # what the flat state carries, exactly
        opt = optimizers[s]
        for p, a, b in moments:
            opt.state.pop(p, None)
            if has > 0:
                opt.state[p] = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": a, "exp_avg_sq": b}
    if off + 3 * len(pending) != flat.numel():
        raise ValueError(f"flat state has {flat.numel()} numbers, the chunks need {off + 3 * len(pending)}")


def flatten_blocks(chunks: dict[int, Any], omega: float) -> torch.Tensor:
    """The block tensors of every chunk, then the gradient norm omega (CheckFree's weight)."""
    parts = [v.detach().reshape(-1).float().cpu() for s in sorted(chunks)
             for k, v in chunks[s].state_dict().items() if k.startswith(BLOCK_PREFIX)]
    parts.append(torch.tensor([omega], dtype=torch.float32))
    return torch.cat(parts)


def install_checkfree(prev: torch.Tensor, nxt: torch.Tensor, chunks: dict[int, Any], optimizers: dict[int, Any],
                      lr_scale: dict[int, float], scale: float) -> tuple[float, float]:
    """CheckFree rebuild of every chunk from the neighbours' flat blocks; fresh AdamW state."""
    w_prev, w_next = float(prev[-1]), float(nxt[-1])
    off = 0
    for s in sorted(chunks):
        sd = chunks[s].state_dict()
        pa: dict[str, torch.Tensor] = {}
        pb: dict[str, torch.Tensor] = {}
        for k, v in sd.items():
            if k.startswith(BLOCK_PREFIX):
                n = v.numel()
                pa[k] = prev[off : off + n].view_as(v)
                pb[k] = nxt[off : off + n].view_as(v)
                off += n
        rebuilt = checkfree_rebuild({"model": pa}, {"model": pb}, w_prev, w_next)
        model = {k: (rebuilt[k] if k in rebuilt else v) for k, v in sd.items()}
        complete_state({"model": sd}, {"model": model})
        with torch.no_grad():
            for k, v in rebuilt.items():
                sd[k].copy_(v.to(sd[k].dtype))
        optimizers[s].state.clear()
        lr_scale[s] = float(torch.tensor(scale, dtype=torch.float32))  # what the flat state carries, exactly
    return w_prev, w_next


def params_numel(params: list[torch.nn.Parameter]) -> int:
    """Length of :func:`flatten_params` of ``params``."""
    return 3 * sum(q.numel() for q in params) + 2


def flatten_params(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> torch.Tensor:
    """Weights and AdamW moments of some parameters (a CheckFree+ copy), then (step, has_state)."""
    parts: list[torch.Tensor] = []
    step, has = 0.0, 0.0
    for q in params:
        a, b = _optim_tensors(optimizer, q)
        parts.append(q.detach().reshape(-1).float().cpu())
        if a is None or b is None:
            parts += [torch.zeros(q.numel()), torch.zeros(q.numel())]
        else:
            has = 1.0
            parts += [a.detach().reshape(-1).float().cpu(), b.detach().reshape(-1).float().cpu()]
            st = optimizer.state[q].get("step", 0.0)
            step = float(st.item() if isinstance(st, torch.Tensor) else st)
    parts.append(torch.tensor([step, has], dtype=torch.float32))
    return torch.cat(parts)


def install_params(flat: torch.Tensor, params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> None:
    """Install :func:`flatten_params` output into the same-shaped ``params`` and their AdamW state."""
    if flat.numel() != params_numel(params):
        raise ValueError(f"flat parameter state has {flat.numel()} numbers, the parameters need {params_numel(params)}")
    step, has = (float(x) for x in flat[-2:])
    off = 0
    with torch.no_grad():
        for q in params:
            n = q.numel()
            q.copy_(flat[off : off + n].view_as(q).to(q.dtype))
            a = flat[off + n : off + 2 * n].view_as(q).to(q.dtype).clone()
            b = flat[off + 2 * n : off + 3 * n].view_as(q).to(q.dtype).clone()
            off += 3 * n
            optimizer.state.pop(q, None)
            if has > 0:
                optimizer.state[q] = {"step": torch.tensor(step, dtype=torch.float32), "exp_avg": a, "exp_avg_sq": b}


# ----------------------------------------------------------------------------------------------
# Point-to-point over the new generation's world group


def p2p(gen: Any, sends: Iterable[tuple[torch.Tensor, int, int]], recvs: Iterable[tuple[torch.Tensor, int, int]],
        timeout_s: float) -> None:
    """Post every send and receive ``(tensor, world rank, tag)``, then wait for all of them."""
    works = [gen.world.send([t], dst, tag) for t, dst, tag in sends]
    works += [gen.world.recv([t], src, tag) for t, src, tag in recvs]
    for w in works:
        w.wait(datetime.timedelta(seconds=timeout_s))


def wait_key(store: Any, key: str, timeout_s: float, stop: Any = None) -> bytes:
    """Poll ``key`` until it exists (``stop()`` true or timeout: raise TimeoutError)."""
    deadline = time.monotonic() + timeout_s
    while not store.check([key]):
        if time.monotonic() > deadline or (stop is not None and stop()):
            raise TimeoutError(f"store key {key} did not appear within {timeout_s:g} s")
        time.sleep(0.005)
    return bytes(store.get(key))
