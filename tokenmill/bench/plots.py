"""PNG plots of a ``tokenmill bench serve`` run (matplotlib, Agg backend, no display needed).
Each function writes one file and returns its path, or None when there is nothing to plot."""

from __future__ import annotations

from pathlib import Path

from tokenmill.bench.metrics import RequestTiming, e2e_s, ttft_s


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_ttft_cdf(timings: list[RequestTiming], path: Path) -> Path | None:
    """Empirical CDF of TTFT (ms) over successful requests."""
    xs = sorted(ttft_s(t) * 1e3 for t in timings if t.ok)
    if not xs:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.step(xs, [(i + 1) / len(xs) for i in range(len(xs))], where="post")
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title="TTFT CDF")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_latency_over_time(timings: list[RequestTiming], path: Path) -> Path | None:
    """TTFT and E2E (ms) of each successful request against its send time; failures as x."""
    ok = [t for t in timings if t.ok]
    failed = [t for t in timings if not t.ok]
    if not timings:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.scatter([t.arrival_s for t in ok], [e2e_s(t) * 1e3 for t in ok], s=4, label="E2E")
    ax.scatter([t.arrival_s for t in ok], [ttft_s(t) * 1e3 for t in ok], s=4, label="TTFT")
    if failed:
        ax.scatter(
            [t.arrival_s for t in failed],
            [0] * len(failed),
            marker="x",
            c="red",
            label=f"failed ({len(failed)})",
        )
    ax.set(xlabel="send time (s)", ylabel="latency (ms)", title="Latency over time")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_worker_load(worker_load: dict, path: Path, metric: str | None = None) -> Path | None:
    """One panel per metric (``metric`` only, when given and present; at most 4, by name), one
    line per worker."""
    samples = worker_load.get("samples") or []
    names = sorted({name for s in samples for name in s["metrics"]})
    names = [metric] if metric in names else names[:4]
    if not names:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(len(names), 1, figsize=(8, 2.5 * len(names) + 0.5), squeeze=False)
    for ax, name in zip(axes[:, 0], names, strict=True):
        _worker_lines(ax, samples, name)
    axes[0, 0].set_title("Per-worker load")
    axes[-1, 0].set_xlabel("time (s)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _worker_lines(ax, samples: list[dict], metric: str) -> None:
    workers = sorted({w for s in samples for w in s["metrics"].get(metric, {})})
    for w in workers:
        pts = [
            (s["t_s"], s["metrics"][metric][w])
            for s in samples
            if w in s["metrics"].get(metric, {})
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=str(w))
    ax.set_ylabel(metric, fontsize="small")
    ax.legend(loc="upper left", fontsize="x-small", ncol=4)
    ax.grid(alpha=0.3)


def plot_replica_timeline(
    timeline: list[dict], path: Path, series: dict[str, list[dict]] | None = None
) -> Path | None:
    """Workers over time of a planned run (``replica_timeline`` samples: ``time_s``, ``up``,
    ``starting``, ``draining``, ``target``) as steps; ``series`` instead: several runs'
    provisioned workers (up + starting) on one plot, by label."""
    runs = series or {"": timeline}
    if not any(runs.values()):
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4))
    for label, samples in runs.items():
        xs = [s["time_s"] for s in samples]
        if series:
            ax.step(xs, [s["up"] + s["starting"] for s in samples], where="post", label=label)
            continue
        ax.step(xs, [s["up"] for s in samples], where="post", label="up")
        ax.step(xs, [s["up"] + s["starting"] for s in samples], where="post", label="up+starting")
        ax.step(xs, [s["draining"] for s in samples], where="post", label="draining")
        ax.step(xs, [s["target"] for s in samples], where="post", ls=":", label="target")
    ax.set(xlabel="time (s)", ylabel="workers", title="replica timeline")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
