"""Plots of a training run, drawn from its event log (matplotlib, imported only when drawing)."""

from __future__ import annotations

from pathlib import Path

from spotpipe.errors import SpotpipeError
from spotpipe.events import EVAL, STEP, read_events


def loss_curve_data(events_path: str | Path) -> tuple[list[int], list[float], list[int], list[float]]:
    """(train steps, train losses, eval steps, val losses) of the last record per step.

    A resumed run logs some steps twice; the later record wins.

    Args:
        events_path: A run's ``events.jsonl``.

    Returns:
        Four lists: 0-based steps and their losses (nats per token), for training and validation.

    Raises:
        SpotpipeError: if the event file is missing or malformed.
    """
    train: dict[int, float] = {}
    val: dict[int, float] = {}
    for record in read_events(events_path):
        if record["event"] == STEP and record.get("loss") is not None:
            train[int(record["step"])] = float(record["loss"])
        elif record["event"] == EVAL and record.get("val_loss") is not None:
            val[int(record["step"])] = float(record["val_loss"])
    ts = sorted(train)
    vs = sorted(val)
    return ts, [train[s] for s in ts], vs, [val[s] for s in vs]


def plot_loss_curve(events_path: str | Path, out_path: str | Path, title: str = "") -> Path:
    """Write a PNG of the training loss (and validation loss) per step.

    Args:
        events_path: A run's ``events.jsonl``.
        out_path: The PNG to write.
        title: The plot's title.

    Returns:
        The path written.

    Raises:
        SpotpipeError: matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SpotpipeError("plotting needs matplotlib: pip install matplotlib (or set run.plot=false)") from None
    ts, tl, vs, vl = loss_curve_data(events_path)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if ts:
        ax.plot([s + 1 for s in ts], tl, label="train loss", linewidth=1.0, color="#1f77b4")
    if vs:
        ax.plot([s + 1 for s in vs], vl, "o-", label="validation loss", color="#d62728", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(True, alpha=0.3)
    if title:
        ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    out = Path(out_path)
    fig.savefig(out)
    plt.close(fig)
    return out
