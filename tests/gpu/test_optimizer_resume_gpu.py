"""A bf16 resume on one GPU takes the config's optimizer settings (BF16_Optimizer restores the
checkpoint's gradient clipping; the CPU cases are in tests/integration/test_optimizer_resume.py)."""
import pytest
from helpers.dist import run_distributed
from helpers.optimizer_resume import NEW, OLD, _expected, _resume_worker

pytestmark = pytest.mark.gpu


def test_bf16_optimizer_takes_the_configs_gradient_clipping(tmp_path):
    """BF16_Optimizer (DeepSpeed's choice for bf16 at ZeRO-1 with fp32 accumulation, the GPU
    default) restores `clip_grad` from the checkpoint; the config's is put back over it."""
    r = run_distributed(_resume_worker, 1, 1, str(tmp_path / "checkpoints"), "bf16")[0]
    assert r["type"] == "BF16_Optimizer"
    assert r["loaded"]["clip_grad"] == OLD["grad_clip"]
    assert r["applied"] == _expected(NEW, NEW["grad_clip"])
    assert "optimizer.grad_clip: 1.0 (checkpoint) -> 0.5 (config)" in r["notes"]
