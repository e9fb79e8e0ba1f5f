"""The control plane's wire protocol: store keys and the token handshake, shared by controller and worker.

The controller (one per job, inside ``spotpipe train``) runs a ``torch.distributed.TCPStore``
server; every worker is a client. Everything the two sides say goes through these keys:

=============================  ==========================================================
``job/id``                     random job id (public; part of every join proof)
``join`` (queue)               join requests: JSON {nonce, proof, host, pid, listen_host}
``join/resp/<nonce>``          the grant {worker, stage, replica, config, ...} or {refused}
``hb/<worker>``                heartbeat counter, +1 every ``run.heartbeat_s``
``gen/current``                the current generation number (set when membership is complete)
``gen/<g>/plan``               membership of generation g (:class:`GenerationPlan` JSON)
``gen/<g>/abort``              set by the controller to abort generation g's communication
``gen/<g>/arrived/<rank>``     a member is building generation g's groups (all wait for all)
``gen/<g>/...``                PrefixStore roots of generation g's process groups
``ctl/stop``                   set when the run must stop (Ctrl-C, time limit, failure)
``step/<k>/w/<worker>``        a worker's report of step k (loss, times, checkpoint file)
``step/<k>/done``              counter of workers that finished step k
``step/<k>/commit``            set by the last worker to finish step k: the step commits
``err/<worker>``               why a worker gave up (one line), before it exits
``bye/<worker>``               a worker finished cleanly
``gen/<g>/step/<k>/ready``     counter: workers whose step barrier of step k returned
``gen/<g>/step/<k>/decide``    ``commit`` | ``abort`` (compare_set, first writer wins)
``gen/<g>/survivor/<worker>``  a survivor of g aborted its step and waits for g+1
``gen/<g>/recovery``           the recovery decision that generation g starts with
``gen/<g>/recovered/<worker>`` a worker finished its part of that recovery
``spare/<worker>``             the role handed to a waiting spare; ``ctl/end``: the job is over
=============================  ==========================================================

Token handshake. The controller makes a random token per run and hands it to local workers in
their environment (``SPOTPIPE_TOKEN``; never on a command line) and prints it for remote ones. A
worker never sends the token itself: it sends ``HMAC-SHA256(token, job_id:nonce)`` for a fresh
nonce, which the controller checks before it grants a role. A wrong or missing proof is refused
and logged as a ``join_refused`` event. The store itself is not encrypted or authenticated: run
the controller on a private network (the default address is 127.0.0.1).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spotpipe.errors import SpotpipeError
from spotpipe.fsutil import read_text

TOKEN_ENV = "SPOTPIPE_TOKEN"
STORE_VALUE_LIMIT = 64 * 2**10
"""The largest value spotpipe writes to the controller's store (bytes). The store is the control
plane: small records only (DESIGN.md, "Control plane and data plane"); tensors go peer to peer.
:class:`GuardedStore` enforces it, so a change that puts bulk data on the control plane fails
every test that runs a job."""
LOCAL_INDEX_ENV = "SPOTPIPE_LOCAL_INDEX"  # set for the workers the controller starts: their index
CONTROLLER_PID_ENV = "SPOTPIPE_CONTROLLER_PID"  # ... and the pid of the controller, their parent
TOKEN_RE = re.compile(r"^[0-9a-f]{32,128}$")

JOB_ID = "job/id"
JOIN_QUEUE = "join"
STOP = "ctl/stop"
GEN_CURRENT = "gen/current"


def join_response_key(nonce: str) -> str:
    """The store key of the controller's answer to the join request ``nonce``.

    Args:
        nonce: The request's random nonce (hex).

    Returns:
        The key.
    """
    return f"join/resp/{nonce}"


def heartbeat_key(worker: int) -> str:
    """The store counter worker ``worker`` increments as its heartbeat.

    Args:
        worker: Worker id.

    Returns:
        The key.
    """
    return f"hb/{worker}"


def plan_key(generation: int) -> str:
    """The store key of generation ``generation``'s plan (JSON, :class:`GenerationPlan`).

    Args:
        generation: Generation number.

    Returns:
        The key.
    """
    return f"gen/{generation}/plan"


def node_plan_key(generation: int) -> str:
    """The store key of the SkipPipe node plan generation ``generation`` plays (JSON,
    :class:`~spotpipe.schedule.nodepaths.NodePlan`; node runs only).

    Args:
        generation: Generation number.

    Returns:
        The key.
    """
    return f"gen/{generation}/node_plan"


def abort_key(generation: int) -> str:
    """The store key set (to the reason) when generation ``generation`` is aborted.

    Args:
        generation: Generation number.

    Returns:
        The key.
    """
    return f"gen/{generation}/abort"


def leave_key(generation: int) -> str:
    """Set (to a step number ``k``) when generation ``generation`` ends at a step boundary for a
    planned change (an elastic grow): every member leaves it before running step ``k``.

    Args:
        generation: Generation number.

    Returns:
        The key.
    """
    return f"gen/{generation}/leave"


def step_report_key(step: int, worker: int) -> str:
    """The store key of worker ``worker``'s report of step ``step`` (JSON).

    Args:
        step: Step, 0-based.
        worker: Worker id.

    Returns:
        The key.
    """
    return f"step/{step}/w/{worker}"


def step_done_key(step: int) -> str:
    """The store counter of workers that reported step ``step``.

    Args:
        step: Step, 0-based.

    Returns:
        The key.
    """
    return f"step/{step}/done"


def step_commit_key(step: int) -> str:
    """The store key set (to the generation number) once step ``step`` is committed.

    Args:
        step: Step, 0-based.

    Returns:
        The key.
    """
    return f"step/{step}/commit"


def error_key(worker: int) -> str:
    """The store key of worker ``worker``'s fatal error (JSON).

    Args:
        worker: Worker id.

    Returns:
        The key.
    """
    return f"err/{worker}"


def bye_key(worker: int) -> str:
    """The store key worker ``worker`` sets when it leaves normally.

    Args:
        worker: Worker id.

    Returns:
        The key.
    """
    return f"bye/{worker}"


# Stage recovery (see spotpipe.runtime.control.recovery and spotpipe.runtime.worker.recovery).


def step_ready_key(generation: int, step: int) -> str:
    """Counter of workers whose world all-reduce of ``step`` returned (phase 2 done).

    Args:
        generation: Generation number.
        step: Step, 0-based.

    Returns:
        The key.
    """
    return f"gen/{generation}/step/{step}/ready"


def step_decide_key(generation: int, step: int) -> str:
    """``commit`` or ``abort``, set once with compare_set: every survivor applies ``step`` or none.

    Args:
        generation: Generation number.
        step: Step, 0-based.

    Returns:
        The key.
    """
    return f"gen/{generation}/step/{step}/decide"


def survivor_key(generation: int, worker: int) -> str:
    """A survivor of generation g aborted its step: JSON {step, sampler, mirror}.

    Args:
        generation: Generation number.
        worker: Worker id.

    Returns:
        The key.
    """
    return f"gen/{generation}/survivor/{worker}"


def recovery_key(generation: int) -> str:
    """The controller's recovery decision for generation g (published before gen/current).

    Args:
        generation: Generation number.

    Returns:
        The key.
    """
    return f"gen/{generation}/recovery"


def recovered_key(generation: int, worker: int) -> str:
    """A worker finished its part of generation g's recovery: JSON {bytes, seconds}.

    Args:
        generation: Generation number.
        worker: Worker id.

    Returns:
        The key.
    """
    return f"gen/{generation}/recovered/{worker}"


END = "ctl/end"  # the job is over (spares waiting for a role exit)


def spare_key(worker: int) -> str:
    """The grant that turns waiting spare ``worker`` into a member (JSON, like a join grant).

    Args:
        worker: Worker id.

    Returns:
        The key.
    """
    return f"spare/{worker}"


def spare_warm_key(worker: int) -> str:
    """Set by waiting spare ``worker`` once it has imported torch and built a stage: a grow of an
    elastic job waits for it, so the new generation never waits on a spare's start-up.

    Args:
        worker: Worker id.

    Returns:
        The key.
    """
    return f"spare/{worker}/warm"


def fault_key(worker: int) -> str:
    """Phase fault a worker is about to kill itself with: JSON {step, phase, time}.

    Args:
        worker: Worker id.

    Returns:
        The key.
    """
    return f"fault/{worker}"


# ----------------------------------------------------------------------------------------------
# The value limit


class StoreValueTooLarge(SpotpipeError):
    """Something tried to write more than :data:`STORE_VALUE_LIMIT` bytes under one store key."""


class StoreBytes:
    """Bytes this process wrote to the store (keys and values), shared by a client and its clones."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, n: int) -> None:
        """Count ``n`` more bytes (thread-safe).

        Args:
            n: Bytes written.
        """
        with self._lock:
            self.total += n


def _size(value: str | bytes) -> int:
    return len(value.encode() if isinstance(value, str) else value)


class GuardedStore:
    """A store client that refuses values over ``limit`` bytes and counts the bytes written.

    Wraps a ``torch.distributed.TCPStore`` (server or client); every other method passes through.
    Process-group rendezvous (gloo, NCCL) needs the c10d object itself: :attr:`raw` (it writes a
    few hundred bytes of addresses per member).

    Args:
        raw: The c10d store.
        limit: Largest value, bytes.
        written: The counter to add to (a clone shares its parent's).

    Raises (from the writing methods):
        StoreValueTooLarge: naming the key, the value's size and the limit.
    """

    def __init__(self, raw: Any, limit: int = STORE_VALUE_LIMIT, written: StoreBytes | None = None) -> None:
        self.raw = raw
        self.limit = limit
        self.written = written if written is not None else StoreBytes()

    def _guard(self, key: str, value: str | bytes) -> None:
        n = _size(value)
        if n > self.limit:
            raise StoreValueTooLarge(
                f"refusing to write {n} bytes under store key {key!r}: the controller's store carries control "
                f"records of at most {self.limit} bytes (tensors go peer to peer over the process groups)"
            )
        self.written.add(n + len(key))

    def set(self, key: str, value: str | bytes) -> None:
        """Set ``key`` to ``value``.

        Args:
            key: Store key.
            value: At most :attr:`limit` bytes.

        Raises:
            StoreValueTooLarge: if ``value`` is over the limit.
        """
        self._guard(key, value)
        self.raw.set(key, value)

    def compare_set(self, key: str, expected: str | bytes, desired: str | bytes) -> bytes:
        """Set ``key`` to ``desired`` if it holds ``expected`` (or is missing and ``expected`` is empty).

        Args:
            key: Store key.
            expected: The value the key must hold.
            desired: The new value, at most :attr:`limit` bytes.

        Returns:
            The key's value after the call.

        Raises:
            StoreValueTooLarge: if ``desired`` is over the limit.
        """
        self._guard(key, desired)
        return bytes(self.raw.compare_set(key, expected, desired))

    def queue_push(self, key: str, value: str | bytes) -> None:
        """Append ``value`` to the store queue ``key``.

        Args:
            key: Store key of the queue.
            value: At most :attr:`limit` bytes.

        Raises:
            StoreValueTooLarge: if ``value`` is over the limit.
        """
        self._guard(key, value)
        self.raw.queue_push(key, value)

    def add(self, key: str, amount: int) -> int:
        """Add ``amount`` to the counter ``key`` (counted as the key plus 8 bytes written).

        Args:
            key: Store key of the counter.
            amount: What to add; 0 reads the counter.

        Returns:
            The counter's new value.
        """
        self.written.add(len(key) + 8)
        return int(self.raw.add(key, amount))

    def clone(self) -> GuardedStore:
        """A new connection to the same store, counting into the same total."""
        return GuardedStore(self.raw.clone(), self.limit, self.written)

    def __getattr__(self, name: str) -> Any:  # get, check, multi_get, delete_key, port, ...
        return getattr(self.raw, name)


# ----------------------------------------------------------------------------------------------
# Tokens


def new_token() -> str:
    """A fresh random job token (32 hex characters)."""
    return secrets.token_hex(16)


def join_proof(token: str, job_id: str, nonce: str) -> str:
    """What a worker presents instead of the token: HMAC-SHA256(token, ``job_id:nonce``).

    Args:
        token: The job token (32 hex characters).
        job_id: The job's id from the store.
        nonce: The join request's nonce.

    Returns:
        The HMAC, 64 hex digits.
    """
    return hmac.new(token.encode(), f"{job_id}:{nonce}".encode(), hashlib.sha256).hexdigest()


def check_proof(token: str, job_id: str, nonce: str, proof: str) -> bool:
    """Whether ``proof`` is :func:`join_proof` of the token (compared in constant time).

    Args:
        token: The job token.
        job_id: The job's id.
        nonce: The join request's nonce.
        proof: What the worker presented.

    Returns:
        True for a matching, non-empty proof.
    """
    return bool(proof) and hmac.compare_digest(join_proof(token, job_id, nonce), proof)


def read_token(token_file: str | None) -> str | None:
    """The job token from ``--token-file`` (if given) or ``$SPOTPIPE_TOKEN``; ``None`` if neither.

    Args:
        token_file: ``--token-file``, or None.

    Returns:
        The token (32 hex characters), or None.

    Raises:
        SpotpipeError: the token file is missing, unreadable or malformed.
    """
    if token_file:
        path = Path(token_file).expanduser()
        text = read_text(path, "token file").strip()
        if not TOKEN_RE.match(text):
            raise SpotpipeError(
                f"token file {path} is malformed: expected the job token printed by `spotpipe train` (32 hex characters)"
            )
        return text
    env = os.environ.get(TOKEN_ENV, "").strip()
    if env and not TOKEN_RE.match(env):
        raise SpotpipeError(f"${TOKEN_ENV} is malformed: expected the job token printed by `spotpipe train` (32 hex characters)")
    return env or None


def write_private_file(path: Path, text: str) -> None:
    """Write ``text`` to a file only its owner can read (mode 0600).

    Args:
        path: The file (created or truncated).
        text: Its text; a newline is added.

    Raises:
        OSError: if the file cannot be written.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")


# ----------------------------------------------------------------------------------------------
# Store connection


def parse_address(text: str) -> tuple[str, int]:
    """``HOST:PORT`` -> (host, port), with a clear error.

    Args:
        text: ``HOST:PORT``; an IPv6 host may be in brackets.

    Returns:
        ``(host, port)``, port in 1..65535.

    Raises:
        SpotpipeError: naming ``--join`` when the text is not ``HOST:PORT``.
    """
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SpotpipeError(f"--join {text!r}: expected HOST:PORT, e.g. 10.0.0.5:29400")
    return host.strip("[]"), int(port)


CONNECT_POLL_S = 0.2
"""How often a worker tries again to reach a controller that does not listen (yet)."""


def connect_store(host: str, port: int, timeout_s: float, give_up: Callable[[], str] | None = None) -> Any:
    """A TCPStore client of the controller at ``host:port`` (a :class:`GuardedStore`), within ``timeout_s`` seconds.

    Tries for up to ``timeout_s`` seconds (the controller may start after a remote worker). Each
    try is a plain TCP connection first, so a controller that is not listening costs no store
    error (and no C++ log line); between tries ``give_up`` may end the wait. The store client's
    constructor then waits for the server's answer to its first message without a deadline, so a
    port that accepts connections and never answers (not a spotpipe controller, a hung one) would
    block it forever: it runs in a daemon thread that is abandoned at the deadline. Every later
    store call has the store's own timeout (``timeout_s``).

    Args:
        host: The controller's address.
        port: Its store's port.
        timeout_s: How long to keep trying, and the client's timeout afterwards (seconds).
        give_up: Returns a reason to stop trying (e.g. the local controller's process ended), or "".

    Returns:
        The connected :class:`GuardedStore`.

    Raises:
        ControllerGone: ``give_up`` gave a reason.
        SpotpipeError: naming the address, when no store answers within ``timeout_s``.
    """
    from torch.distributed import TCPStore

    deadline = time.monotonic() + timeout_s
    why = ""
    while True:
        try:
            with socket.create_connection((host, port), timeout=max(0.05, min(2.0, deadline - time.monotonic()))):
                pass
            break
        except OSError as exc:
            why = exc.strerror or type(exc).__name__
        reason = give_up() if give_up is not None else ""
        if reason:
            raise ControllerGone(reason)
        if time.monotonic() >= deadline:
            raise SpotpipeError(f"cannot reach the controller at {host}:{port} within {timeout_s:g} s: {why}")
        time.sleep(CONNECT_POLL_S)
    result: dict[str, Any] = {}

    def connect() -> None:
        try:
            result["store"] = GuardedStore(TCPStore(host, port, None, False, datetime.timedelta(seconds=timeout_s)))
        except Exception as exc:  # c10d raises its own error types
            result["error"] = exc

    thread = threading.Thread(target=connect, name="store-connect", daemon=True)
    thread.start()
    thread.join(max(0.1, deadline - time.monotonic()))
    if "store" in result:
        return result["store"]
    if "error" in result:
        reason = " ".join(str(result["error"]).split())[:120]
    else:
        reason = "the port accepts connections but nothing answers like a spotpipe controller"
    raise SpotpipeError(f"cannot reach the controller at {host}:{port} within {timeout_s:g} s: {reason}")


class ControllerGone(SpotpipeError):
    """The controller is known to be gone (not merely slow to answer)."""


def describe_store_error(exc: BaseException, limit: int = 120) -> str:
    """A store client's error as a short reason: ``Connection reset by peer``, ``Broken pipe``.

    Drops the C++ source location torch prefixes and its advice after the first sentence.

    Args:
        exc: The store client's exception.
        limit: Most characters.

    Returns:
        The reason, at most ``limit`` characters; the exception's type name when it has no text.
    """
    text = " ".join(str(exc).split())
    if text.startswith("[") and "] " in text[:300]:
        text = text.split("] ", 1)[1]
    text = text.split(". ", 1)[0].rstrip(".")
    text = text or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def local_address_towards(host: str, port: int) -> str:
    """The address of this machine that ``host`` sees (the interface that routes to it).

    Args:
        host: The controller's host.
        port: Its port (no packet is sent: a UDP socket is only connected).

    Returns:
        An IP address, ``127.0.0.1`` for a local controller, or this machine's host name when no
        route is found.
    """
    if host in ("127.0.0.1", "localhost", "::1"):
        return "127.0.0.1"
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((host, port))
            return str(s.getsockname()[0])
    except OSError:
        return socket.gethostname()


# ----------------------------------------------------------------------------------------------
# Join (worker side)


@dataclass(frozen=True)
class Grant:
    """A role granted to a worker.

    Attributes:
        worker: Worker id (unique in the job, never reused).
        stage: Pipeline rank.
        replica: Data-parallel replica.
        info: Everything else the controller sends: ``config`` (TOML text), ``run_dir``,
            ``token_dir``, ``token_sha256``, ``resume`` (checkpoint files or None), ``threads``.
    """

    worker: int
    stage: int
    replica: int
    info: dict[str, Any]


class JoinRefused(SpotpipeError):
    """The controller refused this worker."""


def request_join(store: Any, token: str | None, *, listen_host: str, timeout_s: float) -> Grant:
    """Ask the controller for a role; block until it answers.

    Args:
        store: A client of the controller's store.
        token: The job token, or None (an empty proof is sent).
        listen_host: The address other workers reach this one on.
        timeout_s: Seconds to wait for the answer.

    Returns:
        The grant: worker id, role and job information.

    Raises:
        JoinRefused: with the controller's reason (bad or missing token, job full, ...).
        SpotpipeError: no answer within ``timeout_s``.
    """
    deadline = time.monotonic() + timeout_s
    try:
        job_id = store.get(JOB_ID).decode()
    except Exception as exc:  # the store's own timeout (c10d error types)
        raise SpotpipeError(
            f"the controller did not answer within {timeout_s:g} s: {' '.join(str(exc).split())[:120]}"
        ) from None
    nonce = secrets.token_hex(8)
    request = {
        "nonce": nonce,
        "proof": join_proof(token, job_id, nonce) if token else "",
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "listen_host": listen_host,
    }
    store.queue_push(JOIN_QUEUE, json.dumps(request))
    key = join_response_key(nonce)
    while not store.check([key]):
        if time.monotonic() > deadline:
            raise SpotpipeError(f"the controller did not answer the join request within {timeout_s:g} s")
        time.sleep(0.02)
    answer = json.loads(store.get(key))
    if "refused" in answer:
        raise JoinRefused(f"the controller refused this worker: {answer['refused']}")
    return Grant(int(answer["worker"]), int(answer["stage"]), int(answer["replica"]), answer)
