"""Recovery policy: a table over strategies, stage positions, replicas, mirrors and checkpoints."""

from __future__ import annotations

import pytest

from spotpipe.config import FTConfig
from spotpipe.ft.policy import (
    CHECKFREE_LR_SCALE,
    PolicyError,
    job_outcome,
    mirror_holder,
    plan_recovery,
    swap_partner,
)

S = 6


def mirrors_all(replicas: int = 1) -> dict:
    return {(s, r): mirror_holder(s, r, S) for s in range(S) for r in range(replicas)}


# (case, lost, kwargs, expected [(worker, strategy, sources)])
CASES = [
    ("auto: replica first", [(3, 0)], dict(replicas=2, mirrors=mirrors_all(2), checkpoint_step=10),
     [((3, 0), "replica", ((3, 1),))]),
    ("auto: mirror when no replica", [(3, 0)], dict(mirrors=mirrors_all(), checkpoint_step=10),
     [((3, 0), "mirror", ((2, 0),))]),
    ("auto: mirror of stage 0 is held by the last stage", [(0, 0)], dict(mirrors=mirrors_all()),
     [((0, 0), "mirror", ((5, 0),))]),
    ("auto: checkfree for a middle stage", [(2, 0)], dict(checkpoint_step=10),
     [((2, 0), "checkfree", ((1, 0), (3, 0)))]),
    ("auto: checkfree+ for the first stage with the swap schedule", [(0, 0)], dict(swap_edges=True),
     [((0, 0), "checkfree+", ((1, 0),))]),
    ("auto: checkfree+ for the last stage with the swap schedule", [(5, 0)], dict(swap_edges=True),
     [((5, 0), "checkfree+", ((4, 0),))]),
    ("auto: edge stage without swap -> checkpoint", [(0, 0)], dict(checkpoint_step=40),
     [((0, 0), "checkpoint", ())]),
    ("auto: edge stage without swap or checkpoint -> stop", [(5, 0)], dict(),
     [((5, 0), "stop", ())]),
    ("auto: two adjacent middle stages -> checkpoint", [(2, 0), (3, 0)], dict(checkpoint_step=30, swap_edges=True),
     [((2, 0), "checkpoint", ()), ((3, 0), "checkpoint", ())]),
    ("auto: two adjacent, no checkpoint -> stop", [(2, 0), (3, 0)], dict(swap_edges=True),
     [((2, 0), "stop", ()), ((3, 0), "stop", ())]),
    ("auto: edge and its swap partner together -> checkpoint", [(0, 0), (1, 0)], dict(checkpoint_step=5, swap_edges=True),
     [((0, 0), "checkpoint", ()), ((1, 0), "checkpoint", ())]),
    ("auto: two non-adjacent middle stages -> checkfree each", [(1, 0), (3, 0)], dict(),
     [((1, 0), "checkfree", ((0, 0), (2, 0))), ((3, 0), "checkfree", ((2, 0), (4, 0)))]),
    # stage 2's mirror (held by 1) survives; stage 3's mirror holder (2) is lost, so 3 is rebuilt
    # by CheckFree from the exactly recovered 2 and the live 4
    ("auto: adjacent pair, one mirror survives", [(2, 0), (3, 0)], dict(mirrors=mirrors_all()),
     [((2, 0), "mirror", ((1, 0),)), ((3, 0), "checkfree", ((2, 0), (4, 0)))]),
    ("auto: whole stage lost across replicas, mirror then replica", [(2, 0), (2, 1)], dict(replicas=2, mirrors={(2, 0): (1, 0)}),
     [((2, 0), "mirror", ((1, 0),)), ((2, 1), "replica", ((2, 0),))]),
    ("auto: CheckFree prefers neighbours of the same replica", [(2, 1)], dict(replicas=2, alive=[(1, 0), (1, 1), (3, 0), (3, 1), (0, 0), (0, 1), (4, 0), (4, 1), (5, 0), (5, 1)]),
     [((2, 1), "checkfree", ((1, 1), (3, 1)))]),
    ("checkfree: does not use a live replica", [(2, 0)], dict(strategy="checkfree", replicas=2),
     [((2, 0), "checkfree", ((1, 0), (3, 0)))]),
    ("checkfree: edge stage falls back to the checkpoint", [(0, 0)], dict(strategy="checkfree", checkpoint_step=7, swap_edges=True),
     [((0, 0), "checkpoint", ())]),
    ("checkfree+: edge copy", [(5, 0)], dict(strategy="checkfree+", swap_edges=True),
     [((5, 0), "checkfree+", ((4, 0),))]),
    ("checkfree+: middle uses checkfree", [(4, 0)], dict(strategy="checkfree+", swap_edges=True),
     [((4, 0), "checkfree", ((3, 0), (5, 0)))]),
    ("checkfree+: swap schedule off -> checkpoint", [(0, 0)], dict(strategy="checkfree+", checkpoint_step=3),
     [((0, 0), "checkpoint", ())]),
    ("mirror: exact copy", [(4, 0)], dict(strategy="mirror", mirrors=mirrors_all()),
     [((4, 0), "mirror", ((3, 0),))]),
    ("mirror: holder lost too -> checkpoint", [(3, 0), (4, 0)], dict(strategy="mirror", mirrors={(4, 0): (3, 0)}, checkpoint_step=2),
     [((3, 0), "checkpoint", ()), ((4, 0), "checkpoint", ())]),
    ("replica: no replicas -> stop", [(1, 0)], dict(strategy="replica"), [((1, 0), "stop", ())]),
    ("checkpoint: always rolls back", [(2, 0)], dict(strategy="checkpoint", replicas=2, checkpoint_step=50),
     [((2, 0), "checkpoint", ())]),
    ("checkpoint: none yet -> stop", [(2, 0)], dict(strategy="checkpoint"), [((2, 0), "stop", ())]),
    ("none: stop", [(2, 0)], dict(strategy="none", checkpoint_step=5), [((2, 0), "stop", ())]),
]


@pytest.mark.parametrize("case, lost, kwargs, expected", CASES, ids=[c[0] for c in CASES])
def test_policy_table(case, lost, kwargs, expected):
    plans = plan_recovery(lost, S, **kwargs)
    got = [(p.worker, p.strategy, p.sources) for p in plans]
    assert got == expected, case
    for p in plans:
        assert p.why, "every plan says why"
        assert (p.lr_scale == CHECKFREE_LR_SCALE) == (p.strategy == "checkfree")
        if p.strategy == "checkpoint":
            assert p.checkpoint_step == kwargs["checkpoint_step"]
            assert f"step {kwargs['checkpoint_step']}" in p.why


def test_exactness_and_mirror_lag():
    (p,) = plan_recovery([(3, 0)], S, mirrors={(3, 0): (2, 0)}, mirror_lag={(3, 0): 2})
    assert p.strategy == "mirror" and not p.exact and "2 steps behind" in p.why
    (p,) = plan_recovery([(3, 0)], S, mirrors={(3, 0): (2, 0)})
    assert p.exact and "exact" in p.why
    (p,) = plan_recovery([(3, 0)], S)
    assert p.strategy == "checkfree" and not p.exact


def test_adjacent_loss_says_why_and_outcomes():
    plans = plan_recovery([(2, 0), (3, 0)], S, checkpoint_step=30)
    assert job_outcome(plans) == "rollback"
    assert all("adjacent" in p.why and "rolls back to the checkpoint of step 30" in p.why for p in plans)
    stop = plan_recovery([(2, 0), (3, 0)], S)
    assert job_outcome(stop) == "stop" and all("no checkpoint" in p.why for p in stop)
    assert job_outcome(plan_recovery([(2, 0)], S)) == "continue"
    edge = plan_recovery([(0, 0)], S, checkpoint_step=1)
    assert "swap schedule is off" in edge[0].why
    assert plan_recovery([], S) == ()


def test_strategy_from_config_and_bad_input():
    (p,) = plan_recovery([(2, 0)], S, strategy=FTConfig(strategy="checkpoint"), checkpoint_step=4)
    assert p.strategy == "checkpoint"
    with pytest.raises(PolicyError, match="ft.strategy must be one of"):
        plan_recovery([(2, 0)], S, strategy="magic")
    with pytest.raises(PolicyError, match="not a \\(stage, replica\\)"):
        plan_recovery([(6, 0)], S)
    with pytest.raises(PolicyError, match="both lost and alive"):
        plan_recovery([(2, 0)], S, alive=[(2, 0)])


def test_swap_partner_and_mirror_holder():
    assert [swap_partner(s, 6) for s in range(6)] == [1, None, None, None, None, 4]
    assert swap_partner(0, 3) is None
    assert mirror_holder(0, 1, 6) == (5, 1) and mirror_holder(4, 0, 6) == (3, 0)


def test_policy_is_pure():
    import subprocess
    import sys

    code = ("import sys, spotpipe.ft.policy, spotpipe.ft.detector, spotpipe.ft.faults, spotpipe.schedule.swap;"
            "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
