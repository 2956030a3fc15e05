"""The hybrid decode backend reads cuSPARSELt's metadata in place where it is in the layout
the kernel knows, and keeps its own copy elsewhere. Run on a CPU stand-in for cuSPARSELt
(`helpers/fake_cusparselt.py`) that writes either that layout or another one, with the Triton
kernel in its CPU interpreter; on a GPU, tests/gpu/test_decode_gpu.py checks the real one."""
import pytest
from helpers.interpreter import run_interpreted


def test_the_hybrid_backend_reads_cusparselts_metadata_in_place_where_it_can():
    pytest.importorskip("triton")
    run_interpreted(r'''
import logging
import sys
sys.path.insert(0, "tests")
import torch
import torch.nn.functional as F
from helpers import fake_cusparselt
from slope_megatron.inference.decode24 import HybridDecode24Backend
from slope_megatron.inference.decode24_plans import Decode24Plans
from slope_megatron.sparsity import SlopeLinear
warnings = []
logging.getLogger("slope_megatron.inference.decode24").addHandler(
    type("H", (logging.Handler,), {"emit": lambda self, r: warnings.append(r.getMessage())})())
torch.manual_seed(0)
for layout in ("sm90", "positions"):
    fake_cusparselt.install(layout)
    backend = HybridDecode24Backend(Decode24Plans(always=True))
    for inp, out in ((64, 128), (64, 96), (96, 64)):  # 96 rows: outside the layout's model
        layer = SlopeLinear(inp, out, bias=True)
        dense, bias = layer.dense_weight().detach().clone(), layer.bias.detach().clone()
        backend.compress(layer)
        meta, buf = layer.__dict__["_decode24"], layer.__dict__["_compressed"].buf
        in_place = layout == "sm90" and out % 64 == 0
        assert (meta.dtype == torch.int64) == in_place, (layout, out)
        if in_place:  # a view of the operand's bytes, not a copy
            assert buf.data_ptr() < meta.data_ptr() < buf.data_ptr() + buf.numel()
        for tokens in (1, 3, 16, 80):  # up to 64: the kernel; 80: cuSPARSELt (the fake)
            x = torch.randn(tokens, inp)
            with torch.no_grad():
                got = backend.linear(layer, x)
            torch.testing.assert_close(got, F.linear(x, dense, bias), rtol=1e-5, atol=1e-5)
    assert backend.warned_layout == (layout == "positions"), layout
assert len(warnings) == 1 and "keep a copy" in warnings[0], warnings
print("ok")
''')
