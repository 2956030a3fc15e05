"""Inference for SLoPe models: the checkpointed artifact, KV-cached generation, export.

    config, state, tok = load_artifact(find_artifact("runs/demo"))
    model = InferenceModel(config, state, dtype="fp32")
    results = generate(model, [[1, 2, 3]], max_new_tokens=32, sampling=SamplingConfig())
"""
from .artifact import ArtifactError, load_artifact, save_artifact, verify_artifact
from .export import export_checkpoint
from .generate import GenerationResult, generate
from .hf_export import export_hf
from .locate import find_artifact
from .model import InferenceModel, load_slope_state_dict
from .sampling import SamplingConfig
from .tokenizer import load_tokenizer

__all__ = ["ArtifactError", "save_artifact", "load_artifact", "verify_artifact", "find_artifact",
           "InferenceModel", "load_slope_state_dict", "generate", "GenerationResult",
           "SamplingConfig", "export_hf", "export_checkpoint", "load_tokenizer"]
