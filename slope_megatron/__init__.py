"""slope_megatron: SLoPe sparse pretraining (arXiv 2405.16325) on Megatron-style parallelism
and DeepSpeed. Importable on a CPU-only machine; CUDA kernels load lazily."""
__version__ = "0.1.0"
