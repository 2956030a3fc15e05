"""cuSPARSELt plans cached per (m, k, n, dtype, device), algorithm searched once per shape.

Why: building a plan costs as much as a small matmul, and the default algorithm runs slower
than dense cuBLAS while a searched one runs faster (numbers: docs/KERNELS.md). So each shape gets
one plan for the life of the process, and the first call with real operands runs
cusparseLtMatmulSearch. The winning (algorithm, split-k) is stored in a JSON file keyed by GPU
name, cuSPARSELt version, dtype and shape, so later processes skip the search.

Environment: SLOPE_CSLT_SEARCH=0 keeps the default algorithm (no search);
SLOPE_CSLT_ALGO_CACHE=<path> moves the file ('' disables persistence).
"""
from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path

import torch

from ..io import write_text_atomic

log = logging.getLogger(__name__)

_DEFAULT_FILE = os.path.join(os.path.expanduser("~"), ".cache", "slope_megatron",
                             "cslt_algos.json")
_DTYPES = {torch.bfloat16: "bfloat16", torch.float16: "float16"}


def dtype_name(dtype: torch.dtype) -> str:
    if dtype not in _DTYPES:
        raise ValueError(f"cuSPARSELt plans support {list(_DTYPES.values())}, got {dtype}")
    return _DTYPES[dtype]


class CachedPlan:
    """A native plan plus whether its algorithm is settled (searched or loaded)."""

    __slots__ = ("plan", "key", "tuned")

    def __init__(self, plan, key: str):
        self.plan, self.key, self.tuned = plan, key, False


class PlanCache:
    """All plans of one process. `get` is cheap after the first call for a shape."""

    def __init__(self, ext, path: str | None = None, search: bool | None = None):
        self.ext = ext
        self.path = _DEFAULT_FILE if path is None else path
        env_path = os.environ.get("SLOPE_CSLT_ALGO_CACHE")
        if env_path is not None:
            self.path = env_path
        self.search = (os.environ.get("SLOPE_CSLT_SEARCH", "1") != "0") if search is None else search
        self._plans: dict[tuple, CachedPlan] = {}
        self._lock = threading.Lock()
        self._stored = self._read()
        self._prefix: dict[int, str] = {}

    # ---- persistence -----------------------------------------------------------------
    def _read(self) -> dict:
        if not self.path or not os.path.isfile(self.path):
            return {}
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError) as e:
            log.warning("ignoring unreadable cuSPARSELt algorithm cache %s: %s", self.path, e)
            return {}

    def _write(self) -> None:
        if not self.path:
            return
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            write_text_atomic(Path(self.path), json.dumps(self._stored, indent=1, sort_keys=True))
        except OSError as e:
            log.warning("could not write cuSPARSELt algorithm cache %s: %s", self.path, e)

    def _key_prefix(self, device: int) -> str:
        if device not in self._prefix:
            name = torch.cuda.get_device_name(device)
            self._prefix[device] = f"{name}|cusparselt-{self.ext.library_version(device)}"
        return self._prefix[device]

    # ---- plans -----------------------------------------------------------------------
    def get(self, m: int, k: int, n: int, dtype: torch.dtype, device: int,
            bias: bool = False) -> CachedPlan:
        """The plan for D[n, m] = B[n, k] @ A[m, k]^T (+ bias per row of A; A 2:4 sparse);
        created on first use, with the stored algorithm for this GPU/library/shape if any."""
        key = (m, k, n, dtype, device, bias)
        cp = self._plans.get(key)
        if cp is None:
            with self._lock:
                cp = self._plans.get(key)
                if cp is None:
                    cp = self._plans[key] = self._create(m, k, n, dtype, device, bias)
        return cp

    def _create(self, m, k, n, dtype, device, bias) -> CachedPlan:
        skey = f"{self._key_prefix(device)}|{dtype_name(dtype)}|{m}x{k}x{n}"
        if bias:
            skey += "|bias"
        stored = self._stored.get(skey)
        if stored is not None:
            try:
                plan = self.ext.Plan(m, k, n, dtype_name(dtype), device, stored["alg"],
                                     stored["split_k"], stored["split_k_mode"],
                                     stored["split_k_buffers"], bias)
                cp = CachedPlan(plan, skey)
                cp.tuned = True
                return cp
            except (RuntimeError, KeyError, TypeError) as e:
                log.warning("stored cuSPARSELt config for %s rejected (%s); searching again",
                            skey, e)
        return CachedPlan(self.ext.Plan(m, k, n, dtype_name(dtype), device, with_bias=bias), skey)

    def tune(self, cp: CachedPlan, a_comp: torch.Tensor, b: torch.Tensor) -> None:
        """Settle cp's algorithm by a search on these operands (once; stored to the file).
        A search that raises (out of memory above all) leaves cp untuned: the next call
        searches again instead of keeping the default algorithm for the process's life."""
        if cp.tuned:
            return
        if not self.search:
            cp.tuned = True
            return
        alg, sk, mode, skb, max_alg = cp.plan.search(a_comp, b)
        cp.tuned = True
        log.info("cuSPARSELt search %s -> alg %d/%d split_k %d", cp.key, alg, max_alg, sk)
        self._stored[cp.key] = {"alg": alg, "split_k": sk, "split_k_mode": mode,
                                "split_k_buffers": skb}
        self._write()

    def matmul(self, a_comp: torch.Tensor, m: int, k: int, b: torch.Tensor,
               c: torch.Tensor | None = None, beta: float = 0.0,
               bias: torch.Tensor | None = None) -> torch.Tensor:
        """D[n, m] = B @ A^T (+ beta C) (+ bias) with A (m, k) given compressed; B (n, k)."""
        cp = self.get(m, k, b.shape[0], b.dtype, b.device.index, bias is not None)
        if not cp.tuned:
            self.tune(cp, a_comp, b)
        return cp.plan.matmul(a_comp, b, c, beta, bias)

    def configs(self) -> dict:
        """Settled configurations of this process's plans (for logs and benchmarks)."""
        return {cp.key: dict(zip(("alg", "split_k", "split_k_mode", "split_k_buffers", "max_alg"),
                                 cp.plan.config())) for cp in self._plans.values()}
