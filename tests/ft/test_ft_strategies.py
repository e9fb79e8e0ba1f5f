"""Recovery strategies by name: each strategy's rules on small cases, the registry, the policy over it."""

from __future__ import annotations

import typing
from types import MappingProxyType

import pytest

from spotpipe.config import FT_STRATEGIES, FTConfig, StrategyName
from spotpipe.ft import policy
from spotpipe.ft.policy import (
    EXACT_STRATEGIES,
    plan_recovery,
    rebuilds,
    recovery_enabled,
    swap_schedule_on,
    tried_strategies,
    uses_mirrors,
)
from spotpipe.ft.strategies import REGISTRY, UnknownStrategyError, get_strategy
from spotpipe.ft.strategies import checkfree, checkfree_plus, checkpoint, mirror, replica
from spotpipe.ft.strategies.base import RecoveryPlan, StageBytes, Survivors, Worker

pytestmark = pytest.mark.timeout(30)

MODULES = (replica, mirror, checkfree_plus, checkfree, checkpoint)


def survivors(lost: list[Worker], num_stages: int = 4, replicas: int = 1, *, mirrors: dict | None = None,
              lag: dict | None = None, swap: bool = False, extra_sources: tuple[Worker, ...] = ()) -> Survivors:
    live = frozenset((s, r) for s in range(num_stages) for r in range(replicas)) - set(lost)
    return Survivors(num_stages, replicas, live, live | set(extra_sources), mirrors or {}, lag or {}, swap)


# ---------------------------------------------------------------------------------------------
# The registry


def test_registry_is_exhaustive_over_the_config_literal():
    names = set(typing.get_args(StrategyName)) - {"none", "auto"}
    assert names == set(REGISTRY)
    assert set(FT_STRATEGIES) == names | {"none", "auto"}


def test_registry_order_is_the_priority_order_and_names_match_modules():
    assert list(REGISTRY) == ["replica", "mirror", "checkfree+", "checkfree", "checkpoint"]
    for module in MODULES:
        assert REGISTRY[module.NAME] is module.STRATEGY and module.STRATEGY.name == module.NAME
    assert [s.name for s in tried_strategies("auto")] == ["replica", "mirror", "checkfree+", "checkfree"]
    assert isinstance(REGISTRY, MappingProxyType)  # read-only: registration is in the package, once


def test_get_strategy_knows_only_strategies():
    assert get_strategy("mirror") is mirror.STRATEGY
    for not_a_strategy in ("auto", "none", "stop", "magic"):
        with pytest.raises(UnknownStrategyError, match="no recovery strategy called"):
            get_strategy(not_a_strategy)


def test_strategy_facts():
    facts = {name: (s.exact, s.lr_scale, s.payload, s.rebuilds) for name, s in REGISTRY.items()}
    assert facts == {
        "replica": (True, 1.0, "full_state", True),
        "mirror": (True, 1.0, "mirror", True),
        "checkfree+": (False, 1.0, "full_state", True),
        "checkfree": (False, 1.1, "blocks", True),
        "checkpoint": (False, 1.0, "none", False),
    }
    assert checkfree.CHECKFREE_LR_SCALE == 1.1 == policy.CHECKFREE_LR_SCALE
    assert EXACT_STRATEGIES == ("replica", "mirror")
    assert checkfree_plus.STRATEGY.includes == ("checkfree",)
    assert [n for n, s in REGISTRY.items() if s.needs_mirrors] == ["mirror"]
    assert [n for n, s in REGISTRY.items() if s.needs_swap_schedule] == ["checkfree+"]


# ---------------------------------------------------------------------------------------------
# Each strategy: applies or why not, sources


def test_replica():
    s = replica.STRATEGY
    assert all(s.covers(stage, 4) for stage in range(4))
    p = s.plan((2, 1), survivors([(2, 1)], replicas=3))
    assert p is not None and p.sources == ((2, 0),) and p.exact and p.lr_scale == 1.0 and p.strategy == "replica"
    lost = [(2, 0), (2, 1)]
    assert s.plan((2, 0), survivors(lost, replicas=2)) is None
    assert s.why_not((2, 0), survivors(lost, replicas=2)) == "no live replica"
    # a replica rebuilt exactly in this decision serves as a source
    p = s.plan((2, 0), survivors(lost, replicas=2, extra_sources=((2, 1),)))
    assert p is not None and p.sources == ((2, 1),)
    assert s.plan((1, 0), survivors([(1, 0)])) is None
    assert s.why_not((1, 0), survivors([(1, 0)])) == "no replicas (pipeline.replicas = 1)"


def test_mirror():
    s = mirror.STRATEGY
    assert mirror.mirror_holder(0, 1, 4) == (3, 1) and mirror.mirror_holder(2, 0, 4) == (1, 0)
    p = s.plan((2, 0), survivors([(2, 0)], mirrors={(2, 0): (1, 0)}))
    assert p is not None and p.sources == ((1, 0),) and p.exact and "(exact)" in p.why
    p = s.plan((2, 0), survivors([(2, 0)], mirrors={(2, 0): (1, 0)}, lag={(2, 0): 1}))
    assert p is not None and not p.exact and "1 step behind" in p.why
    assert s.plan((2, 0), survivors([(2, 0)])) is None
    assert s.why_not((2, 0), survivors([(2, 0)])) == "no fresh mirror"
    # the holder was lost (even if rebuilt exactly in this decision): its mirror is gone
    lost = [(1, 0), (2, 0)]
    view = survivors(lost, mirrors={(2, 0): (1, 0)}, extra_sources=((1, 0),))
    assert s.plan((2, 0), view) is None
    assert s.why_not((2, 0), view) == "its mirror holder (stage 1 replica 0) is lost too"


def test_checkfree():
    s = checkfree.STRATEGY
    assert [s.covers(stage, 5) for stage in range(5)] == [False, True, True, True, False]
    assert s.scope_reason(0, 5) == "CheckFree cannot rebuild an edge stage (ft.strategy = checkfree+ can)"
    p = s.plan((2, 0), survivors([(2, 0)], 5))
    assert p is not None and p.sources == ((1, 0), (3, 0)) and not p.exact and p.lr_scale == 1.1
    assert "lr x1.1" in p.why
    assert s.plan((0, 0), survivors([(0, 0)], 5)) is None  # edge
    # neighbours of the same replica first, else another replica's
    view = survivors([(2, 1), (1, 1)], 5, replicas=2)
    p = s.plan((2, 1), view)
    assert p is not None and p.sources == ((1, 0), (3, 1))
    view = survivors([(1, 0), (2, 0)], 5)
    assert s.plan((2, 0), view) is None
    assert s.why_not((2, 0), view) == "adjacent stage 1 lost together with it, so CheckFree has no two neighbours"
    view = survivors([(1, 0), (2, 0), (3, 0)], 5)
    assert s.why_not((2, 0), view) == "adjacent stages 1 and 3 lost together with it, so CheckFree has no two neighbours"


def test_checkfree_plus():
    s = checkfree_plus.STRATEGY
    assert [checkfree_plus.swap_partner(stage, 5) for stage in range(5)] == [1, None, None, None, 3]
    assert [s.covers(stage, 5) for stage in range(5)] == [True, False, False, False, True]
    p = s.plan((4, 0), survivors([(4, 0)], 5, swap=True))
    assert p is not None and p.sources == ((3, 0),) and not p.exact and p.lr_scale == 1.0
    assert "final norm and LM head" in p.why
    p = s.plan((0, 0), survivors([(0, 0)], 5, swap=True))
    assert p is not None and p.sources == ((1, 0),) and "embedding" in p.why
    assert s.plan((0, 0), survivors([(0, 0)], 5)) is None
    assert s.why_not((0, 0), survivors([(0, 0)], 5)) == "the CheckFree+ swap schedule is off (ft.swap_edges = false)"
    assert s.plan((0, 0), survivors([(0, 0)], 3, swap=True)) is None
    assert s.why_not((0, 0), survivors([(0, 0)], 3, swap=True)) == "CheckFree+ needs >= 4 stages, the job has 3"
    view = survivors([(0, 0), (1, 0)], 5, swap=True)
    assert s.plan((0, 0), view) is None and s.why_not((0, 0), view) == "its swap partner stage 1 is lost too"


def test_checkpoint_rolls_back_or_stops():
    s = checkpoint.STRATEGY
    assert not s.rebuilds and not any(s.covers(stage, 4) for stage in range(4))
    assert s.plan((1, 0), survivors([(1, 0)])) is None
    plans = checkpoint.rollback([(1, 0), (2, 0)], 12, "because")
    assert [(p.worker, p.strategy, p.checkpoint_step) for p in plans] == [((1, 0), "checkpoint", 12), ((2, 0), "checkpoint", 12)]
    assert all("checkpoint of step 12: because" in p.why for p in plans)
    stops = checkpoint.rollback([(1, 0)], None, "because")
    assert [p.strategy for p in stops] == ["stop"] and "no checkpoint" in stops[0].why


# ---------------------------------------------------------------------------------------------
# Bytes moved


def test_bytes_each_source_sends():
    params = (100, 250, 250, 150)  # parameters per rank, float32
    sizes = StageBytes(weights=tuple(4 * n for n in params), blocks=(200, 1000, 900, 300))
    assert sizes.full(1) == 12 * 250  # weights + 2 AdamW moments: 12 bytes per float32 parameter

    def plan(strategy: str, stage: int, sources: tuple[Worker, ...]) -> RecoveryPlan:
        return RecoveryPlan(stage, 0, strategy, "test", sources=sources)

    assert REGISTRY["replica"].source_bytes(plan("replica", 1, ((1, 1),)), sizes) == (3000,)
    assert REGISTRY["mirror"].source_bytes(plan("mirror", 2, ((1, 0),)), sizes) == (3000,)
    assert REGISTRY["checkfree+"].source_bytes(plan("checkfree+", 3, ((2, 0),)), sizes) == (1800,)  # the lost stage's size
    assert REGISTRY["checkfree"].source_bytes(plan("checkfree", 1, ((0, 0), (2, 0))), sizes) == (200, 900)  # their blocks
    assert REGISTRY["checkpoint"].source_bytes(plan("checkpoint", 1, ()), sizes) == ()


# ---------------------------------------------------------------------------------------------
# The policy over the registry


def test_plan_carries_the_strategy_lr_scale():
    (p,) = plan_recovery([(2, 0)], 6, strategy="checkfree")
    assert p.strategy == "checkfree" and p.lr_scale == 1.1 == REGISTRY["checkfree"].lr_scale
    for kwargs in (dict(replicas=2), dict(mirrors={(2, 0): (1, 0)}), dict(strategy="checkfree+", swap_edges=True)):
        lost = [(0, 0)] if kwargs.get("swap_edges") else [(2, 0)]
        (p,) = plan_recovery(lost, 6, **kwargs)
        assert p.strategy in ("replica", "mirror", "checkfree+") and p.lr_scale == 1.0


def test_auto_follows_the_registry_order(monkeypatch):
    mirrors = {(3, 0): (2, 0)}
    (p,) = plan_recovery([(3, 0)], 6, mirrors=mirrors)
    assert p.strategy == "mirror"
    reordered = {name: REGISTRY[name] for name in ("checkfree", "replica", "mirror", "checkfree+", "checkpoint")}
    monkeypatch.setattr(policy, "REGISTRY", MappingProxyType(reordered))
    (p,) = plan_recovery([(3, 0)], 6, mirrors=mirrors)
    assert p.strategy == "checkfree"


def test_modes_and_helpers():
    names = {mode: [s.name for s in tried_strategies(mode)] for mode in FT_STRATEGIES}
    assert names == {"auto": ["replica", "mirror", "checkfree+", "checkfree"], "replica": ["replica"], "mirror": ["mirror"],
                     "checkfree": ["checkfree"], "checkfree+": ["checkfree+", "checkfree"], "checkpoint": [], "none": []}
    assert [m for m in FT_STRATEGIES if uses_mirrors(m)] == ["auto", "mirror"]
    assert uses_mirrors(FTConfig(strategy="mirror")) and not uses_mirrors(FTConfig(strategy="checkfree"))
    assert [m for m in FT_STRATEGIES if not recovery_enabled(m)] == ["none"]
    assert [m for m in FT_STRATEGIES if swap_schedule_on(FTConfig(strategy=m))] == ["checkfree+"]
    assert swap_schedule_on(FTConfig(strategy="auto", swap_edges=True))
    with pytest.raises(policy.PolicyError, match="ft.strategy must be one of"):
        uses_mirrors("magic")
    plans = plan_recovery([(1, 0), (2, 0)], 6, mirrors={(2, 0): (1, 0)}, checkpoint_step=3)
    assert [rebuilds(p) for p in plans] == [False, False]  # rollback
    plans = plan_recovery([(2, 0)], 6, mirrors={(2, 0): (1, 0)})
    assert [rebuilds(p) for p in plans] == [True]
    assert not rebuilds(plan_recovery([(2, 0)], 6, strategy="none")[0])


def test_why_not_names_the_covering_strategies_only():
    # an edge stage under checkfree+: CheckFree+ speaks for it, CheckFree (middle stages) does not
    (p,) = plan_recovery([(0, 0)], 6, strategy="checkfree+", checkpoint_step=3)
    assert "swap schedule is off" in p.why and "CheckFree cannot" not in p.why
    # a middle stage under checkfree+: CheckFree speaks, CheckFree+ (edges) does not
    plans = plan_recovery([(2, 0), (3, 0)], 6, strategy="checkfree+", swap_edges=True, checkpoint_step=3)
    assert "so CheckFree has no two neighbours" in plans[0].why and "CheckFree+" not in plans[0].why
    # no strategy tried covers the position: why each is out of scope
    (p,) = plan_recovery([(0, 0)], 6, strategy="checkfree", checkpoint_step=3)
    assert "(CheckFree cannot rebuild an edge stage (ft.strategy = checkfree+ can))" in p.why
    # auto on an edge without the swap schedule: replica, mirror and CheckFree+ each say why
    (p,) = plan_recovery([(5, 0)], 6, checkpoint_step=3)
    assert ("cannot be rebuilt by ft.strategy = auto (no replicas (pipeline.replicas = 1), no fresh mirror, "
            "the CheckFree+ swap schedule is off (ft.swap_edges = false))") in p.why
