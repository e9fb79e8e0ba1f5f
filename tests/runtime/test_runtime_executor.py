"""The executor plays every schedule to the same gradients as single-process training.

All ranks run in threads of this process over the in-process QueueTransport, so these tests
check the executor and stage runner alone (no sockets); tests/integration runs real processes.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch

from spotpipe.config import JobConfig, apply_overrides
from spotpipe.data.sampler import microbatch_ids
from spotpipe.data.tokens import TokenFile, prepare_tokens
from spotpipe.model.stages import build_stage
from spotpipe.runtime.pipeline.executor import Executor, compile_rank
from spotpipe.schedule.build import job_schedule
from spotpipe.runtime.inprocess.local import LocalTrainer
from spotpipe.runtime.pipeline.stage_runner import StageRunner
from spotpipe.runtime.comm.transport import CommError, LocalHub, PeerTimeout
from spotpipe.schedule.ir import Action, Op, Schedule

DATA = Path(__file__).resolve().parents[2] / ".." / "shared" / "data" / "tinyshakespeare" / "input.txt"


pytestmark = pytest.mark.usefixtures("one_thread")  # ranks run as threads


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> TokenFile:
    if not DATA.is_file():
        pytest.skip(f"reference data {DATA} is absent")
    return prepare_tokens([DATA], tmp_path_factory.mktemp("tok") / "ts", "byte")


def tiny(schedule: str, stages: int = 4, microbatches: int = 4, replicas: int = 1) -> JobConfig:
    return apply_overrides(
        JobConfig(),
        [
            "model.layers=8", "model.d_model=32", "model.heads=2", "model.context=16",
            f"pipeline.schedule={schedule}", f"pipeline.stages={stages}", "pipeline.virtual_stages=2",
            f"pipeline.microbatches={microbatches}", f"pipeline.replicas={replicas}",
            f"train.batch_size={8 * replicas}", "train.steps=4",
        ],
    ).validate()


def play_step(cfg: JobConfig, token_file: TokenFile, step_ids: list[int]) -> tuple[dict[str, torch.Tensor], float]:
    """One step of every rank in threads: gradients per global parameter name, mean loss."""
    sched = job_schedule(cfg)
    p = cfg.pipeline
    n_chunks = sched.num_stages
    hub = LocalHub(p.stages)
    trainer_sampler = LocalTrainer(cfg, token_file).sampler
    grads: dict[str, torch.Tensor] = {}
    losses: list[tuple[float, int]] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def rank_main(rank: int) -> None:
        try:
            chunks = {s: build_stage(cfg.model, cfg.train.seed, s, n_chunks) for s in sched.stages_of_rank(rank)}
            runner = StageRunner(chunks, 1.0 / p.microbatches)
            inputs, targets = [], []
            for mb in range(p.microbatches):
                ids = microbatch_ids(step_ids, 1, p.microbatches, 0, mb)
                data = torch.from_numpy(trainer_sampler.batch(token_file, ids))
                inputs.append(data[:, :-1])
                targets.append(data[:, 1:])
            rows = cfg.train.batch_size // p.microbatches
            ex = Executor(
                compile_rank(sched, rank, lambda stage: sched.stage_to_rank[stage]),
                runner, hub.transport(rank), (rows, cfg.model.context, cfg.model.d_model), torch.float32, 20.0,
            )
            loss = ex.run(inputs, targets, label="step 0")
            with lock:
                losses.append(loss)
                for s, c in chunks.items():
                    for name, q in c.named_parameters():
                        grads[f"{s}.{name}"] = q.grad.clone()
        except BaseException as exc:  # noqa: BLE001 - surfaced below
            errors.append(exc)
            hub.abort_all()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(p.stages)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    total = sum(s for s, _ in losses)
    count = sum(n for _, n in losses)
    return grads, total / count


@pytest.mark.timeout(120)
@pytest.mark.parametrize("schedule,stages", [("gpipe", 4), ("1f1b", 4), ("interleaved", 4), ("1f1b", 1), ("interleaved", 2)])
def test_executor_gradients_equal_local_trainer(token_file: TokenFile, schedule: str, stages: int) -> None:
    cfg = tiny(schedule, stages=stages)
    trainer = LocalTrainer(cfg, token_file)
    step_ids = trainer.sampler.next_ids(cfg.train.batch_size)
    ref_losses = trainer.compute_gradients(step_ids)
    ref = {f"{i}.{n}": q.grad for i, c in enumerate(trainer.chunks) for n, q in c.named_parameters()}
    grads, loss = play_step(cfg, token_file, step_ids)
    assert set(grads) == set(ref)
    assert loss == pytest.approx(sum(ref_losses) / len(ref_losses), rel=1e-6)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-7, msg=f"gradient of {name}")


def test_forward_only_program_keeps_only_forward_actions() -> None:
    cfg = tiny("1f1b")
    sched = job_schedule(cfg)
    program = compile_rank(sched, 1, lambda s: s, forward_only=True)
    ops = {ins.action.op for ins in program}
    assert ops == {Op.F, Op.SEND_F, Op.RECV_F}
    assert len([i for i in program if i.action.op is Op.F]) == cfg.pipeline.microbatches


@pytest.mark.timeout(30)
def test_missing_message_times_out_naming_peer_and_action() -> None:
    """Rank 1 waits for an activation rank 0 never sends: the error names both."""
    cfg = tiny("1f1b", stages=2, microbatches=1)
    sched = Schedule.from_rank_texts(["0F0 0B0", "1RECV_F0 1F0 1B0"], num_microbatches=1)
    chunks = {1: build_stage(cfg.model, 0, 1, 2)}
    hub = LocalHub(2)
    transport = hub.transport(1, {0: "worker 7 (stage 0, replica 0)"})
    targets = [torch.zeros(8, cfg.model.context, dtype=torch.long)]
    ex = Executor(compile_rank(sched, 1, lambda s: s), StageRunner(chunks, 1.0), transport, (8, 16, 32), torch.float32, 0.2)
    with pytest.raises(PeerTimeout) as info:
        ex.run([], targets, label="step 3")
    text = str(info.value)
    assert "worker 7 (stage 0, replica 0)" in text and "1RECV_F0 of step 3" in text and "run.timeout_s" in text
    assert isinstance(info.value, CommError) and info.value.peer == 0
    ex.discard()
    assert ex.runner.pending == 0


def test_abort_wakes_pending_wait() -> None:
    hub = LocalHub(2)
    t = hub.transport(1)
    buf = torch.empty(3)
    handle = t.irecv(buf, 0, Action(0, Op.SEND_F, 0).tag(1))
    threading.Timer(0.1, t.abort).start()
    with pytest.raises(CommError, match="aborted"):
        handle.wait(10.0)
