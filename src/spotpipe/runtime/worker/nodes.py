"""What a worker does as one node of a SkipPipe run (``pipeline.stage_nodes``).

The controller plans the paths once (:mod:`spotpipe.runtime.control.nodeplan`) and hands every
worker the :class:`~spotpipe.schedule.nodepaths.NodePlan`. Node ``n`` holds a copy of model
stage ``chunk_stage[n]`` (schedule stage ``n``); a stage-0 node also holds the head (final norm,
LM head, loss) of the microbatches it feeds. The worker plays the plan's schedules with the same
executor, commit protocol, checkpoints and events as every other schedule; this module only
answers the questions whose answers differ from a full pipeline:

* which chunks to build (:meth:`NodeRole.build_chunks`);
* which schedule an iteration plays: the train paths, or full paths every
  ``pipeline.full_every``-th iteration (:meth:`NodeRole.schedule_name`);
* which microbatches' tokens this node reads (the ones it is the origin of);
* by how much the stage's summed gradient is scaled (:meth:`NodeRole.gradient_scale`).

**The gradient rule.** Every microbatch's loss is scaled by ``1 / M`` before its backward
(``M`` microbatches per iteration), and the nodes of a stage sum their gradients (all-reduce). A
stage visited by ``V_s < M`` microbatches would then get ``V_s / M`` of a full step: with half
the stages skipped, the non-first stages would learn at about half the rate, and differently from
stage 0 and the head, which every microbatch visits. So the stage's sum is multiplied by
``M / V_s``: each stage's gradient is the mean over the microbatches that actually visited it,
an estimate of the same full-batch gradient with the same scale (SkipPipe, Blagoev, Chen, Ersoy
2025, keeps every non-first stage's visit count equal, its TC1, for this to be fair). With no
skips ``V_s = M`` and the factor is exactly 1, so a skip ratio of 0 trains as 1F1B does.
"""

from __future__ import annotations

from typing import Any

from spotpipe.config import JobConfig
from spotpipe.schedule.ir import Schedule
from spotpipe.schedule.nodepaths import NodePlan, gradient_scales, paths_of_step


class NodeRole:
    """One node's part of a SkipPipe run.

    Args:
        cfg: The job.
        plan: The controller's node plan.
        node: This worker's node (its pipeline rank).
    """

    def __init__(self, cfg: JobConfig, plan: NodePlan, node: int) -> None:
        self.cfg = cfg
        self.plan = plan
        self.node = node
        chunk_stage = plan.train.chunk_stage
        assert chunk_stage is not None
        self.num_model_stages = cfg.pipeline.stages
        self.model_stage = chunk_stage[node]
        self.schedules: dict[str, Schedule] = {"train": plan.train, "full": plan.full}
        self.microbatches = plan.train.num_microbatches
        # Fixed for the plan: read every step, computed once.
        self._origins = {name: [j for j in range(s.num_microbatches) if s.stage_to_rank[s.path(j)[0]] == node]
                         for name, s in self.schedules.items()}
        self._scales = {name: gradient_scales(s)[self.model_stage] for name, s in self.schedules.items()}

    def schedule_name(self, step: int) -> str:
        """Which schedule iteration ``step`` plays: ``full`` every ``pipeline.full_every``-th
        iteration (steps ``n-1, 2n-1, ...``, as the reference's training loop), else ``train``.

        Args:
            step: The step, 0-based.

        Returns:
            ``"train"`` or ``"full"``.
        """
        return paths_of_step(step, self.cfg.pipeline.full_every)

    def build_chunks(self, device: Any) -> dict[int, Any]:
        """This node's chunks: its model stage (without the head) and, on a stage-0 node, the head.

        Args:
            device: Where to put them.

        Returns:
            Schedule stage -> module (:class:`~spotpipe.model.stages.StageModule` or
            :class:`~spotpipe.model.stages.HeadModule`).
        """
        from spotpipe.model.stages import build_head, build_stage

        m, seed, S = self.cfg.model, self.cfg.train.seed, self.num_model_stages
        chunk_stage = self.plan.train.chunk_stage
        assert chunk_stage is not None
        out: dict[int, Any] = {}
        for s in self.plan.train.stages_of_rank(self.node):
            if chunk_stage[s] == S:
                out[s] = build_head(m, seed, S, device=device)
            else:
                out[s] = build_stage(m, seed, chunk_stage[s], S, device=device, head_apart=True)
        return out

    def origin_microbatches(self, name: str = "train") -> list[int]:
        """The microbatches whose path starts (and ends) on this node: it reads their tokens.

        Args:
            name: The schedule (``train`` or ``full``; both have the same origins).

        Returns:
            Microbatch indices, ascending.
        """
        return self._origins[name]

    def gradient_scale(self, name: str) -> float:
        """The factor on this node's all-reduced gradient: ``M / V_s`` (see the module docstring).

        Args:
            name: The schedule the iteration played.

        Returns:
            ``microbatches / visits of this node's model stage`` (1.0 without skips; the head and
            stage 0 are visited by every microbatch).
        """
        return self._scales[name]
