"""Plot a study JSON as a small PNG (matplotlib, Agg backend; `pip install -e .[plots]`).

    python -m benchmarks.plot_results quality.json [--out quality.png]
    python -m benchmarks.plot_results bench_train.json [--out bench_train.png]
    python -m benchmarks.plot_results small.json medium.json 1p3b.json --out scaling.png \\
        [--arm slope]
    python -m benchmarks.plot_results small.json ... 4p6b.json --memory --out memory.png \\
        [--arm slope]

- a quality-study JSON (`python -m benchmarks.quality_study --json`): validation loss against
  iteration for every arm, and each sparse arm's gap to dense at the same iteration; the title
  gives the study's ratio gap(slope-adapters) / gap(static-2to4) when all its arms are present.
- a bench-train JSON (`python -m benchmarks.bench train --json`): training throughput relative
  to dense and peak GPU memory per arm, as bars.
- several bench-train JSONs (one model size each): an arm's throughput and model-state memory
  relative to dense against the dense model's size (GEMM parameters, from each JSON's config
  and overrides), with the dense arm's MFU at each point; with --memory instead, the peak
  GPU memory and model state of dense and the arm at each size, as bars, a size at which an
  arm ran out of GPU memory drawn as a hatched bar up to the GPU's capacity.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from benchmarks.common import ROOT

DPI = 110
COLORS = {"dense": "black", "static-2to4": "tab:red", "slope": "tab:blue",
          "slope-adapters": "tab:green", "slope-reference": "tab:purple",
          "slope-kept": "tab:cyan", "slope-per-call": "tab:orange"}


ACCEPTS = ("a quality-study JSON (benchmarks.quality_study --json) or a bench-train JSON "
           "(benchmarks.bench train --json); several bench-train JSONs for the by-model-size "
           "plot")
IMAGE_SUFFIXES = (".png", ".svg", ".pdf")  # what --out may be (matplotlib's format by name)


class PlotError(Exception):
    """A problem with the files or flags given; main() prints it as one `error:` line."""


def pyplot():
    """matplotlib.pyplot on the Agg backend, or a clear error when it is not installed."""
    try:
        import matplotlib
    except ImportError:
        raise PlotError("plotting needs matplotlib, which is not installed; run "
                        "`pip install -e .[plots]` (or `pip install 'matplotlib>=3.8'`)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def plot_quality(study: dict, out: Path) -> None:
    plt = pyplot()
    arms = study["arms"]
    fig, (ax_loss, ax_gap) = plt.subplots(1, 2, figsize=(10, 4))
    dense = {p["iter"]: p["val_loss"] for p in arms.get("dense", {}).get("curve", [])}
    for name, r in arms.items():
        pts = [(p["iter"], p["val_loss"]) for p in r["curve"] if _finite(p["val_loss"])]
        if not pts:
            continue
        color = COLORS.get(name)
        ax_loss.plot(*zip(*pts), marker=".", label=name, color=color)
        gaps = [(i, v - dense[i]) for i, v in pts if name != "dense" and _finite(dense.get(i))]
        if gaps:
            ax_gap.plot(*zip(*gaps), marker=".", label=name, color=color)
    ax_loss.set(xlabel="iteration", ylabel="validation loss", title="validation loss")
    ax_gap.axhline(0.0, color="black", linewidth=0.8)
    ax_gap.set(xlabel="iteration", ylabel="val loss - dense val loss", title="gap to dense")
    for ax in (ax_loss, ax_gap):
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    ratio = study.get("summary", {}).get("gap_ratio")
    title = Path(study.get("config", "")).name
    if _finite(ratio):
        title += (f" - gap(slope-adapters) / gap(static-2to4) = {ratio:.2f} "
                  f"(goal <= {study['summary'].get('goal_ratio', 0.6):.2f})")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def plot_bench_train(report: dict, out: Path) -> None:
    plt = pyplot()
    results = report["results"]
    names = [r["arm"] for r in results]
    colors = [COLORS.get(n, "tab:gray") for n in names]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.6))
    speed = [r.get("vs_dense") for r in results]
    ax_speed.bar(names, [v or 0.0 for v in speed], color=colors)
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    ax_speed.set(ylabel="tokens/s vs dense", title="training throughput")
    for i, v in enumerate(speed):
        ax_speed.text(i, v or 0.0, f"{v:.2f}x" if v else "n/a", ha="center", va="bottom",
                      fontsize=8)
    width = 0.4
    for shift, key, label, alpha in ((-width / 2, "max_mem_gb", "peak", 0.45),
                                      (width / 2, "resident_mem_gb", "model state", 1.0)):
        mem = [r.get(key) for r in results]
        xs = [i + shift for i in range(len(results))]
        ax_mem.bar(xs, [m or 0.0 for m in mem], width, color=colors, alpha=alpha, label=label)
        dense = next((r.get(key) for r in results if r["arm"] == "dense"), None)
        for x, m in zip(xs, mem):
            text = "n/a" if not m else f"{m:.1f}" + (f"\n{m / dense:.2f}x" if dense else "")
            ax_mem.text(x, m or 0.0, text, ha="center", va="bottom", fontsize=7)
    ax_mem.set_xticks(range(len(results)), names)
    top = max([r.get("max_mem_gb") or 0.0 for r in results] + [1.0])
    ax_mem.set_ylim(0, top * 1.18)
    ax_mem.legend(fontsize=7, loc="lower right")
    ax_mem.set(ylabel="GiB", title="GPU memory: peak (light), model state (dark)")
    for ax in (ax_speed, ax_mem):
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    gpu = (report.get("environment") or {}).get("gpu") or "no GPU"
    shape = " ".join(o.split(".", 1)[1] for o in report.get("overrides") or []
                     if o.startswith(("model.", "zero.stage", "train.micro_batch_size")))
    fig.suptitle(f"{Path(report.get('config', '')).name} on {gpu}\n{shape}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def model_label(report: dict) -> tuple[float, str]:
    """(dense GEMM parameters, 'h2048 L24') of a bench-train JSON's model (its config file
    with its overrides, as the run resolved them)."""
    from slope_megatron.config import ffn_hidden_size, load_config
    if not report.get("config"):
        raise PlotError("a bench-train JSON records no 'config'; the by-model-size plot needs "
                        "it for the model's size")
    config = Path(report["config"])
    if not config.is_absolute() and not config.exists():  # recorded relative to the checkout
        config = ROOT / config
    from slope_megatron.errors import SlopeError
    try:
        cfg = load_config(config, [o for o in report.get("overrides") or []
                                   if o.startswith("model.")])
    except SlopeError as e:
        raise PlotError(f"the model size of a bench-train JSON cannot be read from its config "
                        f"({e})") from None
    m = cfg.model
    ffn = ffn_hidden_size(m)
    mlp = 3 * m.hidden_size * ffn if m.arch == "llama" else 2 * m.hidden_size * ffn
    vocab = m.vocab_size or cfg.data.tokenizer_vocab_size  # unset: the tokenizer's
    params = m.num_layers * (4 * m.hidden_size ** 2 + mlp) + m.hidden_size * vocab
    return float(params), f"h{m.hidden_size} L{m.num_layers}"


def dense_and_arm(reports: list[dict], arm: str) -> list[tuple[dict, dict, dict]]:
    """(report, its dense result, its `arm` result) for each bench-train JSON of a by-size
    plot; one that lacks either arm stops the plot with a message."""
    rows = []
    for report in reports:
        by_arm = {r["arm"]: r for r in report["results"]}
        if arm not in by_arm or "dense" not in by_arm:
            raise PlotError(f"a bench-train JSON ({report.get('config')}, "
                            f"{report.get('overrides')}) lacks the dense or the {arm!r} arm; "
                            f"choose another --arm (it has {', '.join(by_arm)})")
        rows.append((report, by_arm["dense"], by_arm[arm]))
    return rows


def plot_scaling(reports: list[dict], out: Path, arm: str = "slope") -> None:
    """`arm` vs dense across model sizes: throughput and model state, dense MFU annotated."""
    plt = pyplot()
    points = []
    for report, dense, sparse in dense_and_arm(reports, arm):
        params, label = model_label(report)
        if dense.get("out_of_memory") or sparse.get("out_of_memory"):  # no ratio to plot
            print(f"note: {label}: left out of the scaling plot (an arm ran out of GPU memory)",
                  file=sys.stderr)
            continue
        state = (sparse.get("resident_mem_gb") or 0) / (dense.get("resident_mem_gb") or 1)
        points.append((params, label, sparse.get("vs_dense") or 0.0, state, dense.get("mfu")))
    if not points:
        raise PlotError("no model size with both arms measured (out of GPU memory)")
    points.sort()
    xs = [p[0] / 1e9 for p in points]
    fig, (ax_speed, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.6))
    ax_speed.plot(xs, [p[2] for p in points], marker="o", color=COLORS.get(arm, "tab:blue"))
    ax_speed.axhline(1.0, color="black", linewidth=0.8)
    for i, (x, p) in enumerate(zip(xs, points)):
        mfu = f"\ndense MFU {100 * p[4]:.0f}%" if _finite(p[4]) else ""
        ax_speed.annotate(f"{p[2]:.2f}x {p[1]}{mfu}", (x, p[2]), fontsize=7,
                          textcoords="offset points", xytext=(-20, -26 if i % 2 else 8))
    ax_speed.set(xscale="log", xlabel="dense GEMM parameters (billions)",
                 ylabel="tokens/s vs dense", title=f"{arm}: training throughput")
    ax_mem.plot(xs, [p[3] for p in points], marker="o", color=COLORS.get(arm, "tab:blue"))
    for x, p in zip(xs, points):
        ax_mem.annotate(f"{p[3]:.2f}x", (x, p[3]), fontsize=7, textcoords="offset points",
                        xytext=(4, 4))
    ax_mem.set(xscale="log", xlabel="dense GEMM parameters (billions)",
               ylabel="model state vs dense", title=f"{arm}: model-state memory")
    for ax in (ax_speed, ax_mem):
        ax.grid(alpha=0.3)
        ax.set_xlim(min(xs) / 1.6, max(xs) * 2.2)
    lo = min([p[2] for p in points] + [p[3] for p in points] + [0.5])
    ax_speed.set_ylim(min(lo, 0.9) - 0.15, max([p[2] for p in points] + [1.0]) + 0.2)
    ax_mem.set_ylim(0, 1.1)
    gpu = (reports[0].get("environment") or {}).get("gpu") or "no GPU"
    fig.suptitle(f"{arm} vs dense by model size on {gpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def _capacity_gib(results: list[dict]) -> float | None:
    """The GPU's capacity as PyTorch's out-of-memory message gave it, if an arm ran out."""
    for r in results:
        text = r.get("error") or ""
        if "total capacity of " in text:
            number = text.split("total capacity of ", 1)[1].split(" GiB", 1)[0]
            try:
                return float(number)
            except ValueError:
                pass
    return None


def plot_memory_by_size(reports: list[dict], out: Path, arm: str = "slope") -> None:
    """Peak GPU memory (light) and model state (dark) of dense and `arm` at each model size;
    an arm that did not fit is a hatched bar to the GPU's capacity labelled as such."""
    plt = pyplot()
    sizes = []
    for report, dense, sparse in dense_and_arm(reports, arm):
        params, label = model_label(report)
        extra = [f"mb {o.split('=', 1)[1]}" for o in report.get("overrides") or []
                 if o.startswith("train.micro_batch_size=")]
        if "train.activation_checkpointing=true" in (report.get("overrides") or []):
            extra.append("recompute")
        label += "\n" + " ".join(extra) if extra else ""
        sizes.append((params, label, dense, sparse, report["results"]))
    sizes.sort(key=lambda size: size[0])
    capacity = max((c for c in (_capacity_gib(s[4]) for s in sizes) if c), default=None)
    fig, ax = plt.subplots(figsize=(9, 3.8))
    width = 0.38
    for i, (params, label, *arms, _) in enumerate(sizes):
        for shift, name, r in ((-width / 2, "dense", arms[0]), (width / 2, arm, arms[1])):
            color = COLORS.get(name, "tab:gray")
            if r.get("out_of_memory"):
                ax.bar(i + shift, capacity or 0.0, width, color="none", edgecolor=color,
                       hatch="//")
                ax.text(i + shift, (capacity or 0.0) / 2, "does not fit", rotation=90,
                        ha="center", va="center", fontsize=7)
                continue
            ax.bar(i + shift, r.get("max_mem_gb") or 0.0, width, color=color, alpha=0.35)
            ax.bar(i + shift, r.get("resident_mem_gb") or 0.0, width, color=color)
            ax.text(i + shift, r.get("max_mem_gb") or 0.0, f"{r.get('max_mem_gb') or 0:.0f}",
                    ha="center", va="bottom", fontsize=7)
    if capacity:
        ax.axhline(capacity, color="black", linewidth=0.8, linestyle="--")
        ax.text(-0.5, capacity, f" GPU capacity {capacity:.0f} GiB", ha="left", va="bottom",
                fontsize=7)
    ax.set_xticks(range(len(sizes)), [f"{s[0] / 1e9:.2f}B {s[1]}" for s in sizes], fontsize=7)
    color = COLORS.get(arm, "tab:gray").replace("tab:", "")
    ax.set(ylabel="GiB", title=f"dense (black) and {arm} ({color}): peak GPU memory (light, "
                               "number on top) and model state (dark)")
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    gpu = (reports[0].get("environment") or {}).get("gpu") or "no GPU"
    fig.suptitle(f"GPU memory by model size on {gpu}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=DPI)
    plt.close(fig)


def read_json(path: Path) -> tuple[str, dict]:
    """(kind, data) of a result file: kind "quality" or "bench-train"; anything else stops
    with a line naming the file and the kinds accepted."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise PlotError(f"{path} does not exist; give {ACCEPTS}") from None
    except IsADirectoryError:
        raise PlotError(f"{path} is a directory; give {ACCEPTS}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path} cannot be read ({e}); give {ACCEPTS}") from None
    except ValueError as e:
        raise PlotError(f"{path} is not JSON ({e}); give {ACCEPTS}") from None
    kind = kind_of(data)
    if kind is None:
        raise PlotError(f"{path} is neither a quality-study JSON (benchmarks.quality_study "
                        f"--json, with 'arms') nor a bench-train JSON (benchmarks.bench train "
                        f"--json, with per-arm 'results'); several bench-train JSONs make the "
                        f"by-model-size plot")
    return kind, data


def kind_of(data) -> str | None:
    """"quality", "bench-train" or None (another result file: a profile, kernels, ...)."""
    if not isinstance(data, dict):
        return None
    arms = data.get("arms")
    if isinstance(arms, dict) and all(isinstance(r, dict) and isinstance(r.get("curve"), list)
                                      for r in arms.values()):
        return "quality"
    results = data.get("results")
    if "environment" in data and isinstance(results, list) and results and all(
            isinstance(r, dict) and "arm" in r and "split_ms" not in r for r in results):
        return "bench-train"
    return None


def main(argv=None) -> int:
    try:
        return _main(argv)
    except PlotError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2  # a usage error (slope_megatron.errors.EXIT_USER_ERROR)


def _main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.plot_results",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("json", nargs="+", help="quality-study or bench-train JSON; several "
                                           "bench-train JSONs give the by-model-size plot")
    p.add_argument("--out", default=None, help="PNG to write (default: the JSON's name, .png)")
    p.add_argument("--arm", default=None, help="the arm the by-model-size plot compares with "
                                               "dense (default: slope)")
    p.add_argument("--memory", action="store_true",
                   help="by model size: GPU memory as bars instead of the speed and state ratios")
    args = p.parse_args(argv)
    src = Path(args.json[0])
    out = Path(args.out) if args.out else src.with_suffix(".png")
    if out.suffix.lower() not in IMAGE_SUFFIXES:
        raise PlotError(f"--out {out}: the image's name must end in "
                        f"{', '.join(IMAGE_SUFFIXES)}")
    files = [(Path(f), *read_json(Path(f))) for f in args.json]  # all checked before plotting
    if len(files) > 1:
        other = [str(f) for f, kind, _ in files if kind != "bench-train"]
        if other:
            raise PlotError(f"the by-model-size plot takes bench-train JSONs only, and "
                            f"{', '.join(other)} {'is a' if len(other) == 1 else 'are'} "
                            f"quality-study JSON{'' if len(other) == 1 else 's'}; plot "
                            f"{'it' if len(other) == 1 else 'each'} on its own")
        reports = [data for _, _, data in files]
        out.parent.mkdir(parents=True, exist_ok=True)
        (plot_memory_by_size if args.memory else plot_scaling)(reports, out, args.arm or "slope")
        print(f"wrote {out}")
        return 0
    flags = [f for f, given in (("--memory", args.memory), ("--arm", args.arm is not None))
             if given]
    if flags:
        many = len(flags) > 1
        raise PlotError(f"{' and '.join(flags)} {'apply' if many else 'applies'} only to the "
                        f"by-model-size plot (several bench-train JSONs, one per model size); "
                        f"leave {'them' if many else 'it'} out for {src} alone")
    _, kind, data = files[0]
    if kind == "quality" and not data["arms"]:
        raise PlotError(f"{src} is a quality-study JSON that holds no arm yet; run some "
                        "with benchmarks.quality_study --json first")
    out.parent.mkdir(parents=True, exist_ok=True)  # after every check: an error leaves nothing
    if kind == "quality":
        plot_quality(data, out)
    else:
        plot_bench_train(data, out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
