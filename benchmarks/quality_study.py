"""The quality study: how much of 2:4 sparsity's loss gap to dense SLoPe recovers (four arms by
default, a fifth, diagnostic, on request).

    python -m benchmarks.quality_study --config configs/quality-gpt2-small-extended.yaml \\
        --out runs/quality --json quality.json [--arms dense static-2to4 slope slope-adapters]

Arms (same config, seed, data order and LR schedule; each a fresh `launch/pretrain.py`
process, as `python -m benchmarks.bench train` runs them):
  dense           sparsity off, no adapters
  static-2to4     2:4 mask, dX = dY (W*M) (no double pruning), no adapters, reference backend
  slope           2:4 mask, double-pruned dX, no adapters
  slope-adapters  SLoPe: double pruning + lazy adapters at rank 2% for the last 1% of iters
and, only when asked for with --arms (a diagnostic, not part of the goal):
  slope-adapters-10pct  the same with adapters for the last 10% (did 1% just run too short?)
Every validation record of each run's metrics.jsonl is collected (the curve), plus the final
validation loss / perplexity, the median training tokens/s over the log windows and the peak
GPU memory. The table gives each arm's gap to dense in final validation loss and the ratio
gap(slope-adapters) / gap(static-2to4); the goal is a ratio <= 0.60.

Split over several invocations (e.g. two device calls of < 10 min): run some arms, then
others with the same --config, --set and --json. The JSON is written after every arm and
merged with an existing one of the same study (same config file contents and --set; anything
else is refused), so the summary covers every arm run so far. An arm is refused if its run
directory (<out>/<arm>) exists or the JSON already holds it: runs are never reused or mixed.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench_train import cpu_notice, speed
from benchmarks.common import ROOT, checkout_env, run_environment
from slope_megatron.cli import Once, add_set_argument
from slope_megatron.cli import config_error as cli_config_error

ARMS = {
    "dense": ["sparsity.enabled=false", "adapters.enabled=false"],
    "static-2to4": ["sparsity.enabled=true", "sparsity.double_prune=false",
                    "sparsity.backend=reference", "adapters.enabled=false"],
    "slope": ["sparsity.enabled=true", "sparsity.double_prune=true", "adapters.enabled=false"],
    "slope-adapters": ["sparsity.enabled=true", "sparsity.double_prune=true",
                       "adapters.enabled=true", "adapters.rank_ratio=0.02", "adapters.rank=null",
                       "adapters.rank_of=hidden", "adapters.fraction=0.01"],
}
STUDY_ARMS = list(ARMS)  # the four the goal is about: the default --arms
ARMS["slope-adapters-10pct"] = [*(o for o in ARMS["slope-adapters"]
                                   if not o.startswith("adapters.fraction=")),
                                 "adapters.fraction=0.1"]
GOAL_RATIO = 0.60  # the goal: gap(slope-adapters) <= 60% of gap(static-2to4)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.quality_study",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--config", action=Once, default="configs/quality-gpt2-small-extended.yaml",
                   help="YAML config every arm trains with (default: %(default)s, fresh "
                        "data from the extended corpus; configs/quality-gpt2-small.yaml "
                        "repeats the default corpus 3 times)")
    p.add_argument("--arms", nargs="+", default=STUDY_ARMS, choices=list(ARMS), metavar="ARM",
                   help=f"arms to run: {', '.join(ARMS)} (default: {' '.join(STUDY_ARMS)})")
    add_set_argument(p, "overrides for every arm (the arms' own sparsity/adapter keys win)")
    p.add_argument("--out", default="runs/quality",
                   help="run directories: <out>/<arm> (default: %(default)s)")
    p.add_argument("--json", default=None,
                   help="write (or merge into) this study JSON after every arm")
    return p.parse_args(argv)


def study_identity(args) -> dict:
    """What two invocations must share for their arms to belong to one study."""
    from slope_megatron.data.order import ORDER_VERSION  # lazily: imports torch

    text = Path(args.config).read_bytes()
    return {"config": args.config, "config_sha256": hashlib.sha256(text).hexdigest(),
            "overrides": list(args.set), "arm_overrides": ARMS, "data_order": ORDER_VERSION}


class StudyError(Exception):
    """The --json given cannot take this invocation's arms (the message says why)."""


def load_study(path: Path | None, ident: dict, arms: list[str]) -> dict:
    """The existing study JSON to merge into (or a new one); refuses a different study."""
    if path is None or not path.exists():
        return {"study": "quality study", **ident, "arms": {}, "invocations": []}
    try:
        study = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise StudyError(f"{path} is not a readable JSON file ({e}); choose another --json")
    if not isinstance(study, dict) or not isinstance(study.get("arms"), dict):
        raise StudyError(f"{path} is not a quality-study JSON (no 'arms'); choose another "
                         "--json")
    # arm_overrides: what each arm sets (a study JSON written before it was recorded ran
    # other settings, e.g. adapter ranks of each layer's input width, and is not continued)
    # data_order: the sample order's version (a study from before it was recorded trained
    # its arms in order 1, and new arms in another order would not compare like for like)
    for key in ("config_sha256", "overrides", "arm_overrides", "data_order"):
        if study.get(key) != ident[key]:
            raise StudyError(f"{path} holds a different study ({key}: {study.get(key)!r} "
                             f"there, {ident[key]!r} here); use the same --config file and "
                             "--set, or another --json")
    again = [a for a in arms if a in study["arms"]]
    if again:
        raise StudyError(f"{path} already holds arm(s) {', '.join(again)}; run only the "
                         "missing ones or use another --json")
    study.setdefault("invocations", [])
    return study


def read_metrics(run_dir: Path) -> dict:
    """Curve, final numbers and throughput of one finished run from its metrics.jsonl."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if line.strip()]
    curve = [{"iter": r["iter"], "val_loss": r["val_loss"], "val_ppl": r.get("val_ppl")}
             for r in records if "val_loss" in r]
    train = [r for r in records if "tokens_per_s" in r]
    if not curve or not train:
        raise SystemExit(f"error: {run_dir}/metrics.jsonl has no validation or train records")
    mem = [r["max_mem_gb"] for r in train if r.get("max_mem_gb") is not None]
    return {"curve": curve, "final_iter": curve[-1]["iter"],
            "final_val_loss": curve[-1]["val_loss"], "final_val_ppl": curve[-1]["val_ppl"],
            "final_train_loss": train[-1].get("loss"),
            "tokens_per_s": speed(train, skip=1)["tokens_per_s"],  # as `bench train`
            "max_mem_gb": max(mem) if mem else None,
            "skipped_steps": train[-1].get("skipped_steps", 0)}


def run_arm(args, arm: str, position: str = "") -> dict:
    out = Path(args.out) / arm
    overrides = [*args.set, *ARMS[arm], f"train.output_dir={out}"]
    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--config", args.config,
           "--set", *overrides]
    env = checkout_env()
    log_file = Path(args.out) / f"{arm}.log"
    print(f"[{arm}]{position} {' '.join(cmd)}\n[{arm}] log: {log_file}", flush=True)
    t0 = time.time()
    with open(log_file, "w") as log:
        code = subprocess.run(cmd, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    wall = time.time() - t0
    if code != 0:
        tail = log_file.read_text()[-3000:]
        raise SystemExit(f"error: arm {arm} failed (exit {code}); the end of {log_file}:\n{tail}")
    result = {"arm": arm, "overrides": ARMS[arm], "command": " ".join(cmd),
              "environment": run_environment(), "wall_s": wall, **read_metrics(out)}
    print(f"[{arm}] done in {wall:.0f} s: final val loss {result['final_val_loss']:.4f} "
          f"(ppl {result['final_val_ppl']:.2f}), {result['tokens_per_s']:,.0f} tokens/s",
          flush=True)
    return result


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def summarize(arms: dict) -> dict:
    """Gaps to dense (final val loss and perplexity) and the goal's ratio
    gap(slope-adapters) / gap(static-2to4)."""
    dense = arms.get("dense")
    summary: dict = {"gap_to_dense": {}, "ppl_gap_to_dense": {}, "goal_ratio": GOAL_RATIO,
                     "gap_ratio": None, "ppl_gap_ratio": None, "goal_met": None}
    if dense is None:
        return summary
    for name, r in arms.items():
        for key, field in (("gap_to_dense", "final_val_loss"), ("ppl_gap_to_dense",
                                                                "final_val_ppl")):
            if _finite(r[field]) and _finite(dense[field]):
                summary[key][name] = r[field] - dense[field]
    for key, ratio in (("gap_to_dense", "gap_ratio"), ("ppl_gap_to_dense", "ppl_gap_ratio")):
        num, den = summary[key].get("slope-adapters"), summary[key].get("static-2to4")
        if num is not None and den is not None and den > 0:
            summary[ratio] = num / den
    if summary["gap_ratio"] is not None:
        summary["goal_met"] = summary["gap_ratio"] <= GOAL_RATIO
    return summary


def ordered(arms: dict) -> dict:
    return {a: arms[a] for a in ARMS if a in arms}


def print_report(study: dict) -> None:
    arms, s = study["arms"], study["summary"]
    print(f"\n{'arm':20s} {'val loss':>9s} {'val ppl':>9s} {'gap to dense':>13s} "
          f"{'tokens/s':>10s} {'mem GiB':>8s}")
    for name, r in arms.items():
        gap = s["gap_to_dense"].get(name)
        fmt = lambda v, spec: format(v, spec) if _finite(v) else "n/a"  # noqa: E731
        print(f"{name:20s} {fmt(r['final_val_loss'], '9.4f'):>9s} "
              f"{fmt(r['final_val_ppl'], '9.2f'):>9s} {fmt(gap, '+13.4f'):>13s} "
              f"{fmt(r['tokens_per_s'], '10,.0f'):>10s} {fmt(r['max_mem_gb'], '8.1f'):>8s}")
    iters = sorted({p["iter"] for r in arms.values() for p in r["curve"]})
    print(f"\nvalidation loss by iteration\n{'iter':>6s} " +
          " ".join(f"{name:>20s}" for name in arms))
    for it in iters:
        row = [next((p["val_loss"] for p in r["curve"] if p["iter"] == it), None)
               for r in arms.values()]
        print(f"{it:6d} " + " ".join(f"{v:20.4f}" if _finite(v) else f"{'-':>20s}" for v in row))
    if s["gap_ratio"] is not None:
        verdict = "met" if s["goal_met"] else "NOT met"
        ppl = f", {s['ppl_gap_ratio']:.3f} in val ppl" if s["ppl_gap_ratio"] is not None else ""
        print(f"\ngap(slope-adapters) / gap(static-2to4) = {s['gap_ratio']:.3f} in val loss"
              f"{ppl} (goal <= {GOAL_RATIO:.2f}: {verdict})")
    else:
        missing = [a for a in ("dense", "static-2to4", "slope-adapters") if a not in arms]
        why = f"missing arms: {', '.join(missing)}" if missing else \
            "static-2to4 is not worse than dense"
        print(f"\ngap ratio not available ({why})")


def config_error(args, arms: list[str]) -> str | None:
    """What is wrong with --config and --set, alone and with each arm's keys (as the arm's
    pretrain.py will load them); None when nothing."""
    return cli_config_error(args.config, args.set, {
        arm: [*args.set, *ARMS[arm], f"train.output_dir={Path(args.out) / arm}"]
        for arm in arms})


def main(argv=None) -> int:
    args = parse_args(argv)
    from slope_megatron.errors import EXIT_USER_ERROR
    from slope_megatron.io import write_text_atomic

    def usage_error(message: str) -> int:
        print(f"error: {message}", file=sys.stderr)
        return EXIT_USER_ERROR

    arms = list(dict.fromkeys(args.arms))
    problem = config_error(args, arms)
    if problem is not None:
        return usage_error(problem)
    taken = [str(Path(args.out) / a) for a in arms if (Path(args.out) / a).exists()]
    if taken:
        return usage_error(f"{', '.join(taken)} {'exists' if len(taken) == 1 else 'exist'}; "
                           "choose another --out or run only other arms (runs are never "
                           "reused)")
    json_path = Path(args.json) if args.json else None
    try:
        study = load_study(json_path, study_identity(args), arms)  # checked before any run
    except StudyError as e:
        return usage_error(str(e))
    cpu_notice("the quality study")
    given = sys.argv[1:] if argv is None else list(argv)
    study["invocations"].append({"date": run_environment()["date"], "arms": arms,
                                 "command": " ".join([sys.executable, "-m",
                                                      "benchmarks.quality_study", *given])})
    Path(args.out).mkdir(parents=True, exist_ok=True)
    for i, arm in enumerate(arms, 1):
        study["arms"][arm] = run_arm(args, arm, f" ({i}/{len(arms)})")
        study["arms"] = ordered(study["arms"])
        study["summary"] = summarize(study["arms"])
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(json_path, json.dumps(study, indent=1))
    print_report(study)
    if json_path is not None:
        print(f"\nwrote {json_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
