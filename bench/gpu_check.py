"""One short check of spotpipe on a CUDA machine: exactness, a kill and recovery per strategy, throughput.

Run by ``bench/gpu_check.sh`` (under 8 minutes on one GPU). Three parts, one table:

1. **Exactness**: the default small model, 4 pipeline stages on the GPU(s), 20 steps, against the
   same job on 1 stage (the whole model in one worker, the single-process reference); per-step
   losses must agree within 1e-4 relative (GPU kernels may reduce in another order). The same in
   ``model.dtype = bfloat16`` (float32 master weights) within 2e-2, and a bf16 mirror kill against
   the failure-free bf16 run within 1e-3.
2. **Recovery per strategy** (``bench/strategy_kills.py`` at the 6 M size, on the GPU): stage 1
   killed (SIGKILL) at step 4 under replica, mirror, checkfree, checkpoint and checkfree+; every
   step committed once, survivors keep their processes, replica and mirror reproduce the
   failure-free losses.
3. **Throughput**: ``bench/mirror_scaling.py --quick --sizes 6M,25M`` on the GPU (mirror / none).

Backend: ``run.backend = auto`` picks NCCL with one GPU per worker, else gloo with the workers
sharing the GPU (``spotpipe.runtime.devices``). Exits 1 if a check fails.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from mirror_scaling import COMMON, SIZES, events, train  # noqa: E402
from strategy_kills import losses as step_losses, run_all  # noqa: E402

BASE = ["run.device=cuda", "train.steps=20", "train.eval_every=0", "run.plot=false", "run.progress=false", "model.context=64",
        "train.batch_size=8"]


def losses(run_dir: Path) -> dict[int, float]:
    return step_losses(events(run_dir))


def close(a: dict[int, float], b: dict[int, float], rel: float) -> bool:
    return bool(a) and a.keys() == b.keys() and all(abs(a[k] - b[k]) <= rel * abs(b[k]) for k in a)


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing to check")
        return 1
    src = ROOT / "src"
    rows: list[tuple[str, str, str]] = []
    ok = True
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="spotpipe-gpu-check-") as tmp:
        base = Path(tmp)
        rc4, err4 = train(src, base / "s4", BASE)
        rc1, err1 = train(src, base / "s1", [*BASE, "pipeline.stages=1", "ft.strategy=none"])
        good = rc4 == 0 and rc1 == 0 and close(losses(base / "s4"), losses(base / "s1"), 1e-4)
        ok &= good
        rows.append(("exactness: 4 stages vs 1", "ok" if good else "FAILED", err4 or err1 or f"{len(losses(base / 's4'))} steps"))
        # bfloat16 with float32 master weights: the pipeline against one stage, and a mirror kill
        # against the failure-free run (bf16 rounds differently per reduction order: looser bounds)
        half = [*BASE, "model.dtype=bfloat16"]
        rcb4, errb4 = train(src, base / "b4", half)
        rcb1, errb1 = train(src, base / "b1", [*half, "pipeline.stages=1", "ft.strategy=none"])
        good = rcb4 == 0 and rcb1 == 0 and close(losses(base / "b4"), losses(base / "b1"), 2e-2)
        ok &= good
        rows.append(("bf16 + fp32 masters: 4 stages vs 1", "ok" if good else "FAILED", errb4 or errb1 or f"{len(losses(base / 'b4'))} steps"))
        rck, errk = train(src, base / "bk", [*half, "ft.strategy=mirror"], ("--fail", "stage=1@step=4"))
        rcn, errn = train(src, base / "bn", [*half, "ft.strategy=none"])
        good = rck == 0 and rcn == 0 and close(losses(base / "bk"), losses(base / "bn"), 1e-3)
        ok &= good
        rows.append(("bf16 mirror kill vs failure-free", "ok" if good else "FAILED", errk or errn or "losses within 1e-3"))
        kills = run_all(src, [*COMMON, *SIZES["6M"], "run.device=cuda"], 10, 4, base / "kills")
        for row in kills:
            ok &= row["ok"]
            detail = row["error"] or (f"recovered by {row['recovered_by']}, {(row['bytes_moved'] or 0) / 1e6:.1f} MB, "
                                      f"kill to next commit {row['kill_to_next_commit_s'] or float('nan'):.2f} s, "
                                      f"exact {row['losses_equal_failure_free']}")
            rows.append((f"kill and recover: {row['strategy']}", "ok" if row["ok"] else "FAILED", detail))
        out = base / "scaling.json"
        proc = subprocess.run([sys.executable, str(ROOT / "bench" / "mirror_scaling.py"), "--quick", "--sizes", "6M,25M",
                               "--no-recovery", "--set", "run.device=cuda", "--out", str(out)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode == 0:
            res: dict[str, Any] = json.loads(out.read_text())
            for size, e in res["sizes"].items():
                none = e["runs"]["none"][0].get("step_s")
                rows.append((f"throughput {size} ({e['params']} params)", "ok",
                             f"mirror/none {e['ratio']:.3f}, step {none:.3f} s without mirrors" if e["ratio"] and none else "no ratio"))
        else:
            ok = False
            rows.append(("throughput", "FAILED", (proc.stderr.strip().splitlines() or ["?"])[-1]))
    width = max(len(r[0]) for r in rows)
    print(f"spotpipe GPU check on {torch.cuda.get_device_name(0)} x {torch.cuda.device_count()}, torch {torch.__version__}")
    for what, status, detail in rows:
        print(f"{what:<{width}}  {status:<6}  {detail}")
    print(f"{'all ok' if ok else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
