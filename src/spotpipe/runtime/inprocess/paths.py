"""The single-process reference of a SkipPipe node run: every microbatch along its planned path.

:class:`NodePathTrainer` is :class:`~spotpipe.runtime.inprocess.local.LocalTrainer` with the cut
of a node run: chunks ``0..S-1`` hold the blocks (chunk 0 the embedding too) and chunk ``S`` is
the head (final norm, LM head, loss; :class:`~spotpipe.model.stages.HeadModule`). A step plays
the node plan's schedule of that iteration (the train paths, or full paths every
``pipeline.full_every``-th iteration, :meth:`spotpipe.runtime.worker.nodes.NodeRole.schedule_name`):
microbatch ``j`` gets the same samples as on the workers, runs through the model stages its path
names, in its order, then the head; its loss is scaled by ``1 / M``; after the last microbatch
each stage's gradient is multiplied by ``M / visits`` (the gradient rule of
:mod:`spotpipe.runtime.worker.nodes`). Clipping, the learning rate and AdamW are LocalTrainer's.
So the multi-process node run and this reference compute the same numbers up to the order of
float additions (an integration test holds them to 1e-4), and quality studies of skip ratios can
run in one process. Evaluation (:meth:`LocalTrainer.evaluate`, ``validation_loss`` with stages
left out) chains every chunk, the head last.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from spotpipe.config import JobConfig
from spotpipe.data.sampler import microbatch_ids
from spotpipe.model.stages import build_head, build_stage
from spotpipe.runtime.inprocess.local import LocalTrainer, _to_tensor
from spotpipe.schedule.ir import Schedule
from spotpipe.schedule.nodepaths import NodePlan, gradient_scales, paths_of_step


class NodePathTrainer(LocalTrainer):
    """One process playing a node plan's paths (see the module docstring).

    Args:
        cfg: The job (``pipeline.stage_nodes`` set; ``pipeline.full_every`` read).
        token_file: The token file.
        plan: The node plan the workers would play
            (:func:`spotpipe.runtime.control.nodeplan.plan_nodes`).
        device: Where to compute.
        gradient_rule: Scale each stage's gradient by ``M / visits`` (False: leave it, to see
            what the rule changes).
    """

    def __init__(self, cfg: JobConfig, token_file: Any, plan: NodePlan, device: torch.device | str | None = None,
                 gradient_rule: bool = True) -> None:
        self.plan = plan
        self.gradient_rule = gradient_rule
        super().__init__(cfg, token_file, num_chunks=cfg.pipeline.stages + 1, device=device)

    def build_chunk(self, index: int) -> Any:
        """Chunk ``index`` as a node builds it: blocks without the head, or (``index = S``) the head.

        Args:
            index: ``0..S``.

        Returns:
            The :class:`~spotpipe.model.stages.StageModule` or :class:`~spotpipe.model.stages.HeadModule`.
        """
        S = self.num_chunks - 1
        if index == S:
            return build_head(self.cfg.model, self.cfg.train.seed, S, device=self.device)
        return build_stage(self.cfg.model, self.cfg.train.seed, index, S, device=self.device, head_apart=True)

    def schedule_of_step(self, step: int) -> Schedule:
        """The node schedule iteration ``step`` plays (full paths every ``pipeline.full_every``-th).

        Args:
            step: The step, 0-based.

        Returns:
            ``plan.full`` or ``plan.train``.
        """
        return self.plan.full if paths_of_step(step, self.cfg.pipeline.full_every) == "full" else self.plan.train

    def forward_path(self, tokens: torch.Tensor, targets: torch.Tensor, stages: Sequence[int]) -> torch.Tensor:
        """Loss of one microbatch through ``stages`` (model stages, in path order), then the head.

        Args:
            tokens: Token ids ``[rows, context]`` (int64).
            targets: Next-token ids ``[rows, context]`` (int64).
            stages: Model stages of the path, stage 0 first.

        Returns:
            The float32 scalar mean token cross-entropy, with autograd.
        """
        x = tokens
        for s in stages:
            x = self.chunks[s](x)
        loss: torch.Tensor = self.chunks[-1](x, targets)
        return loss

    def compute_gradients(self, step_ids: Sequence[int]) -> list[float]:
        """Forward and backward of every microbatch along its path; the gradient rule applied.

        Args:
            step_ids: The step's ``train.batch_size`` sample ids.

        Returns:
            The unscaled microbatch losses, in microbatch order.
        """
        schedule = self.schedule_of_step(self.step)
        chunk_stage = schedule.chunk_stage
        assert chunk_stage is not None
        M = schedule.num_microbatches
        for q in self._params():
            q.grad = None
        losses: list[float] = []
        for j in range(M):
            tokens, targets = _to_tensor(self.sampler.batch(self.token_file, microbatch_ids(step_ids, 1, M, 0, j)),
                                         self.device)
            loss = self.forward_path(tokens, targets, [chunk_stage[x] for x in schedule.path(j)[:-1]])
            (loss / M).backward()
            losses.append(float(loss.detach()))
        if self.gradient_rule:
            for s, scale in enumerate(gradient_scales(schedule)):
                if scale != 1.0:
                    for q in self.chunks[s].parameters():
                        if q.grad is not None:
                            q.grad.mul_(scale)
        return losses
