#!/usr/bin/env python
"""Build the cuSPARSELt binding into TORCH_EXTENSIONS_DIR where there is no GPU (docker build).

`slope_megatron.kernels.cslt_loader.load_extension()` builds the binding on first use and refuses to when
CUDA is not available, so that a CPU process never compiles it. At `docker build` time there
is a CUDA toolkit but no GPU, and the build itself needs none (the binding and the native layer
step: three C++ files and one CUDA file compiled against the CUDA and cuSPARSELt headers for
TORCH_CUDA_ARCH_LIST, then linked). This runs the loader's own build with that one
check lifted, so the sources, flags and extension cache entry are exactly the loader's: the
first training step on a GPU then finds the binding built and only re-checks it (ninja: no
work to do).

    python docker/prebuild_kernels.py            # exit 1 if the binding cannot be built
    python docker/prebuild_kernels.py --lenient  # report and exit 0 (it builds at first use)

TORCH_CUDA_ARCH_LIST defaults to "8.0;9.0" (A100, H100) so that no GPU is queried.
The Triton kernels (kernels/nm_triton.py) are compiled by Triton for the GPU they run on, at
first use, into TRITON_CACHE_DIR; they cannot be built ahead without that GPU.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout


def main(argv: list[str]) -> int:
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    import torch

    from slope_megatron.kernels import cslt_loader

    if torch.version.cuda is None:
        print("prebuild_kernels: this torch is a CPU build; nothing to build", file=sys.stderr)
        return 0 if "--lenient" in argv else 1
    torch.cuda.is_available = lambda: True  # the loader's only GPU check; the build needs none
    start = time.time()
    try:
        module = cslt_loader.load_extension()
    except cslt_loader.CusparseltUnavailable as e:
        print(f"prebuild_kernels: cuSPARSELt binding not built: {e}\n"
              "it will be built on first use on a GPU", file=sys.stderr)
        return 0 if "--lenient" in argv else 1
    ext_dir = os.environ.get("TORCH_EXTENSIONS_DIR", "(torch's default cache)")
    print(f"prebuild_kernels: cuSPARSELt binding built in {time.time() - start:.0f} s "
          f"({module.__file__}; TORCH_EXTENSIONS_DIR={ext_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
