"""`python -m benchmarks.cslt_meta_probe` on a CPU stand-in for cuSPARSELt that writes either
the layout the decode kernel reads in place or another one: it tells the two apart, and its
layout search recovers the modelled layout's formula term by term."""
import torch
from helpers.fake_cusparselt import FakeExt

from benchmarks import cslt_meta_probe as probe


def _fake(layout: str):
    ext = FakeExt(layout)

    def compressed(mask, values):
        out, inp = mask.shape
        dense = torch.zeros(out, inp, dtype=torch.bfloat16)
        dense[mask] = values.reshape(-1)
        meta = out * inp // 8 if layout == "sm90" else out * inp // 2
        buf = torch.zeros(out * inp + meta, dtype=torch.uint8)
        ext.compress(dense, buf)
        return buf
    return compressed


def test_the_probe_tells_the_modelled_layout_from_another(monkeypatch):
    monkeypatch.setattr(probe, "compressed", _fake("sm90"))
    assert probe.check_shape(128, 96, device="cpu")["in_place"]
    monkeypatch.setattr(probe, "compressed", _fake("positions"))
    row = probe.check_shape(128, 96, device="cpu")
    assert row["modelled"] and not row["in_place"]


def test_the_layout_search_recovers_the_modelled_formula(monkeypatch):
    """In bits after the values: row bits 1, 2, 4 step 8 bytes each doubling, row 8 the high
    nibble, rows 16 and 32 the 64-byte blocks, row 64 a slab (8 * in bytes); group bits 1, 2
    step 2 and 4 bytes, group 4 one byte, groups 8 and up 256 bytes per 32-column chunk."""
    monkeypatch.setattr(probe, "compressed", _fake("sm90"))
    found = probe.find_layout(128, 256, device="cpu")
    assert found["groups_located"] == found["groups"] == 128 * 64
    assert found["bit_offset_of_group_0"] == 0 and found["terms_explain_every_group"]
    assert found["second_position_2_bits_above_first"]
    assert found["row_bit_terms"] == {1: 64, 2: 128, 4: 256, 8: 4, 16: 512, 32: 1024,
                                      64: 8 * 256 * 8}
    assert found["group_bit_terms"] == {1: 16, 2: 32, 4: 8, 8: 2048, 16: 4096, 32: 8192}
    monkeypatch.setattr(probe, "compressed", _fake("positions"))  # a byte per kept position
    other = probe.find_layout(64, 32, device="cpu")
    assert other["terms_explain_every_group"] and other["row_bit_terms"][1] == 8 * 16
    assert other["bit_offset_of_group_0"] == 0 and other["group_bit_terms"][1] == 16
    assert not other["second_position_2_bits_above_first"]  # the next byte, 8 bits above
