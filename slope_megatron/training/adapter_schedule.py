"""When the lazy adapters switch on, and what the loop says about it and about a resume that
changes train.iters.

A resume may change train.iters (to extend or shorten a run): the trainer says so in one
warning (old and new totals, the learning rate on both schedules, when the adapter phase
starts), because the LR schedule then continues on the new total's schedule and the adapter
switch point moves with it.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

from ..config import Config
from .optimizer import lr_at


def adapter_phase(cfg: Config, adapters_on: bool = False,
                  adapters_since: Optional[int] = None, start: int = 0) -> str:
    """The start banner's words for the adapter phase: from which iteration, or why none.

    On a resume with the adapters already on (`adapters_on`) it says since when, as the
    warning of a resume with another train.iters does (`adapters_since`, from
    adapters_on_since), not this run's switch point; on a resume at `start` past a switch
    point they have not reached, that they switch on at once, as the warning says."""
    if not cfg.sparsity.enabled:
        return "no adapters (dense run: sparsity.enabled=false)"
    if not cfg.adapters.enabled:
        return "no adapters (adapters.enabled=false)"
    if adapters_on:
        if adapters_since is None:
            return "adapters on (already on at the resumed checkpoint)"
        return f"adapters on since iter {adapters_since}"
    if cfg.adapter_start_iter >= cfg.train.iters:
        f, n = cfg.adapters.fraction, cfg.train.iters
        return (f"no adapter phase (adapters.fraction {f:g} x train.iters {n} = {f * n:.3g}, "
                f"less than one iteration)")
    if start > cfg.adapter_start_iter:  # train.iters changed on a resume: switched at once
        return (f"adapters from iter {start} (the switch point, iter {cfg.adapter_start_iter}, "
                f"has passed)")
    return f"adapters from iter {cfg.adapter_start_iter}"


def adapters_on_since(cfg: Config, recorded_since: Optional[int],
                      old_iters: Optional[int]) -> Optional[int]:
    """The iteration at which the adapters of a resumed run (with them on) switched on: as its
    checkpoint recorded it (`recorded_since`, client state 'adapters_since'), else - a
    checkpoint from before it was saved there - the switch point of the run that wrote it,
    on its train.iters (`old_iters`, previous_train_iters); None if that is unknown too."""
    if recorded_since is not None or old_iters is None:
        return recorded_since
    return replace(cfg, train=replace(cfg.train, iters=old_iters)).adapter_start_iter


def previous_train_iters(client: dict, recorded: dict) -> Optional[int]:
    """train.iters of the run that wrote the resumed checkpoint: from its client state, else
    (a checkpoint from before it was saved there) from run_config.yaml; None if unknown."""
    if client.get("train_iters") is not None:
        return int(client["train_iters"])
    value = (recorded.get("train") or {}).get("iters")
    return value if isinstance(value, int) else None


def iters_change_warning(cfg: Config, old_iters: Optional[int], start: int, skipped: int,
                         adapters_on: bool, adapters_since: Optional[int]) -> Optional[str]:
    """The one warning of a resume with another train.iters (None when it is unchanged or
    unknown): old and new totals, the LR schedule, and when the adapter phase starts."""
    iters = cfg.train.iters
    if old_iters is None or old_iters == iters:
        return None
    old = replace(cfg, train=replace(cfg.train, iters=old_iters))
    pos = start - skipped  # skipped steps do not advance the schedule
    said = (f"warning: train.iters changed from {old_iters} to {iters} on resume at iteration "
            f"{start}: the LR schedule continues on the {iters}-iteration schedule from here "
            f"(lr {lr_at(old, pos):.2e} on the old schedule -> {lr_at(cfg, pos):.2e})")
    switch = cfg.adapter_start_iter
    if adapters_on:
        since = adapters_on_since(cfg, adapters_since, old_iters)
        return said + f"; the adapters are already on since iteration {since} and stay on"
    if not (cfg.sparsity.enabled and cfg.adapters.enabled):
        return said
    if switch >= iters:
        return said + f"; there is {adapter_phase(cfg)}"
    if switch <= start:
        return said + (f"; the adapter phase starts now, at iteration {start} (the "
                       f"{iters}-iteration switch point, iteration {switch}, has passed)")
    return said + f"; the adapter phase starts at iteration {switch}"
