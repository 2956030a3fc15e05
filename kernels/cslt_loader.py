"""Build-on-first-use loader for the cuSPARSELt binding (`cslt_binding.cpp`).

Why a loader: the binding links against the cuSPARSELt shipped in the `nvidia-cusparselt-cu*`
wheel (torch's own wheel depends on it), so it is compiled with
torch.utils.cpp_extension.load against that wheel's header and library on the first call and
cached by torch's extension cache afterwards. Every failure is turned into one clear message,
which the backend reports when it falls back to the reference path. The build's lock file is
slope_megatron/build_lock.py's: a lock left by a killed build does not hang later runs.
"""
from __future__ import annotations

import functools
import glob
import os

_DIR = os.path.dirname(os.path.abspath(__file__))
# the binding, the native layer step (C++ autograd functions) and its CUDA gather/scatter
_SOURCES = [os.path.join(_DIR, name) for name in ("cslt_binding.cpp", "slope_step.cpp",
                                                   "nm_ops.cpp", "nm_cuda.cu")]


class CusparseltUnavailable(RuntimeError):
    """The cuSPARSELt binding cannot be built or loaded here (the message says why)."""


def cusparselt_dirs() -> tuple[str, str]:
    """(include dir, lib dir) of the cuSPARSELt wheel; raises CusparseltUnavailable if absent."""
    try:
        import nvidia.cusparselt as ncl  # the wheel torch's CUDA builds depend on
    except ImportError as e:
        raise CusparseltUnavailable(
            "the nvidia-cusparselt wheel is not installed (pip install nvidia-cusparselt-cu13, "
            f"or -cu12 for CUDA 12 builds of torch): {e}") from e
    for root in list(getattr(ncl, "__path__", [])):
        inc, lib = os.path.join(root, "include"), os.path.join(root, "lib")
        if os.path.isfile(os.path.join(inc, "cusparseLt.h")) and glob.glob(
                os.path.join(lib, "libcusparseLt.so*")):
            return inc, lib
    raise CusparseltUnavailable(
        f"nvidia.cusparselt at {list(getattr(ncl, '__path__', []))} has no include/cusparseLt.h "
        "and lib/libcusparseLt.so*")


@functools.lru_cache(maxsize=None)
def load_extension():
    """Compile (first time only) and import the binding; cached for the process."""
    import torch
    from torch.utils.cpp_extension import load

    from slope_megatron.build_lock import install as install_build_lock

    install_build_lock()  # a lock left by a build that was killed is cleared, not waited on
    if not torch.cuda.is_available():
        raise CusparseltUnavailable("CUDA is not available")
    inc, lib = cusparselt_dirs()
    so = sorted(glob.glob(os.path.join(lib, "libcusparseLt.so*")))[0]
    try:
        return load(
            name="slope_cslt_binding",
            sources=_SOURCES,
            extra_include_paths=[inc],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            extra_ldflags=[f"-L{lib}", f"-l:{os.path.basename(so)}", f"-Wl,-rpath,{lib}"],
            with_cuda=True,
            verbose=bool(os.environ.get("SLOPE_KERNELS_VERBOSE")),
        )
    except Exception as e:  # compiler missing, header mismatch, ...
        raise CusparseltUnavailable(f"building the cuSPARSELt binding failed: {e}") from e
