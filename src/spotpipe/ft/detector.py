"""Failure detection as a pure function of (now, last heartbeat per worker, config, reports).

The controller receives a heartbeat from every worker every ``run.heartbeat_s`` seconds and
transport errors or timeouts that workers report about their peers. :func:`detect` turns these
into a set of suspects, each with a one-line reason for the event log. It reads no clock and
keeps no state: the runtime passes ``time.monotonic()``, the simulator its virtual clock, so the
simulator measures exactly the rule that ships (the seam "failure detection and policy are pure
functions" of DESIGN.md; heartbeat timeouts as in SageMaker HyperPod's health monitoring and
the Meta cluster study of Kokolis et al. 2025, where most failures surface as lost heartbeats or
collective timeouts).

Rules:

1. **Silence.** A worker whose last heartbeat is at least ``timeout_s`` old is suspected. A
   worker that dies right after a heartbeat is therefore found ``timeout_s`` (2 s by default,
   ``ft.detect_timeout_s``) after its death at the latest, plus the caller's polling interval;
   :func:`next_deadline` tells the caller when to look next so nothing waits on polling.
2. **Transport evidence.** A peer named in a transport error (connection reset, closed socket) or
   a timeout that a worker reported is suspected at once, *unless it has sent a heartbeat since
   the report*: a live worker clears itself within one heartbeat period, a dead one cannot. This
   finds a dead peer in the middle of a step without waiting for the heartbeat timeout.

A suspect is not yet confirmed: the caller confirms (a local process that exited, or the silence
rule, which is conclusive by definition) and emits ``failure_suspected`` / ``failure_confirmed``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from spotpipe.config import FTConfig
from spotpipe.errors import ConfigError

TRANSPORT_KINDS = ("error", "timeout")


@dataclass(frozen=True)
class DetectorConfig:
    """Detector settings.

    Attributes:
        timeout_s: Heartbeat silence after which a worker is suspected (``ft.detect_timeout_s``).
    """

    timeout_s: float = 2.0

    def __post_init__(self) -> None:
        if not self.timeout_s > 0:
            raise ConfigError(f"ft.detect_timeout_s must be > 0, got {self.timeout_s}")

    @staticmethod
    def from_ft(ft: FTConfig) -> DetectorConfig:
        """The detector settings of a job's ``[ft]`` section.

        Args:
            ft: The job's ``[ft]`` section (reads ``detect_timeout_s``, seconds).

        Returns:
            A :class:`DetectorConfig` with ``timeout_s = ft.detect_timeout_s``.

        Raises:
            ConfigError: if ``ft.detect_timeout_s`` is not > 0.
        """
        return DetectorConfig(timeout_s=ft.detect_timeout_s)


@dataclass(frozen=True)
class TransportReport:
    """A worker's report that talking to ``peer`` failed.

    Attributes:
        reporter: Worker id that saw the failure.
        peer: Worker id it was talking to.
        kind: ``"error"`` (reset, closed, refused) or ``"timeout"`` (a wait ran past run.timeout_s).
        at: Time of the failure on the detector's clock.
        detail: Free text for the event log (the failing action, the exception).
    """

    reporter: int
    peer: int
    kind: str
    at: float
    detail: str = ""

    def __post_init__(self) -> None:
        if self.kind not in TRANSPORT_KINDS:
            raise ValueError(f"TransportReport.kind must be one of {', '.join(TRANSPORT_KINDS)}, got {self.kind!r}")


@dataclass(frozen=True)
class Detection:
    """Result of :func:`detect`.

    Attributes:
        suspects: Suspected worker ids, ascending.
        reasons: One line per suspect, for ``failure_suspected`` events.
        silent: The suspects found by heartbeat silence (conclusive on their own).
    """

    suspects: tuple[int, ...] = ()
    reasons: dict[int, str] = field(default_factory=dict)
    silent: frozenset[int] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.suspects)


def _timeout(config: FTConfig | DetectorConfig) -> float:
    if isinstance(config, DetectorConfig):
        return config.timeout_s
    return DetectorConfig.from_ft(config).timeout_s


def detect(
    now: float,
    last_heartbeat: Mapping[int, float],
    config: FTConfig | DetectorConfig,
    transport_errors: Iterable[TransportReport] = (),
) -> Detection:
    """Workers suspected dead at time ``now``.

    Args:
        now: Current time on the caller's clock (monotonic seconds, or simulated seconds).
        last_heartbeat: Last heartbeat time of every live member; a worker that just joined
            should be entered with its join time.
        config: The ``[ft]`` section or a :class:`DetectorConfig`.
        transport_errors: Reports of failed sends/receives/collectives. Reports about workers
            not in ``last_heartbeat`` (already removed) are ignored.

    Returns:
        The suspects, each with a reason naming the evidence.
    """
    timeout_s = _timeout(config)
    reasons: dict[int, str] = {}
    silent: set[int] = set()
    for worker, seen in last_heartbeat.items():
        age = now - seen
        if age >= timeout_s:
            silent.add(worker)
            reasons[worker] = f"no heartbeat for {age:.2f} s (ft.detect_timeout_s = {timeout_s:g} s)"
    for report in sorted(transport_errors, key=lambda r: (r.at, r.reporter, r.peer)):
        peer_seen = last_heartbeat.get(report.peer)
        if peer_seen is None or report.peer in reasons or report.peer == report.reporter:
            continue
        if peer_seen > report.at:
            continue  # the peer spoke after the failure: alive
        what = "transport error" if report.kind == "error" else "transport timeout"
        text = f"{what} reported by worker {report.reporter} at t={report.at:.2f}"
        if report.detail:
            text += f" ({report.detail})"
        reasons[report.peer] = text + f"; no heartbeat since t={peer_seen:.2f}"
    suspects = tuple(sorted(reasons))
    return Detection(suspects=suspects, reasons={w: reasons[w] for w in suspects}, silent=frozenset(silent))


def next_deadline(last_heartbeat: Mapping[int, float], config: FTConfig | DetectorConfig) -> float | None:
    """Earliest time at which :func:`detect` would suspect a silent worker (``None``: no workers).

    A discrete-event simulator schedules its next check here; the runtime may sleep until then
    (or until a heartbeat arrives, which moves the deadline).

    Args:
        last_heartbeat: Last heartbeat time (seconds, on the caller's clock) of every live member.
        config: The ``[ft]`` section or a :class:`DetectorConfig` (its timeout, seconds).

    Returns:
        The oldest heartbeat plus the timeout, in seconds on the same clock; ``None`` without workers.
    """
    if not last_heartbeat:
        return None
    return min(last_heartbeat.values()) + _timeout(config)
