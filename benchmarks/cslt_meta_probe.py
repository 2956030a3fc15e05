"""Is this GPU's cuSPARSELt metadata in the layout the decode kernel reads in place?

    python -m benchmarks.cslt_meta_probe [--shapes 4096x4096 11008x4096 ...] [--json FILE]

The decode kernel reads a layer's 2-bit positions from cuSPARSELt's compressed operand where
its bytes are the layout `kernels/decode24_cslt_meta.py` models (the inference backend checks
every layer at load and keeps its own copy otherwise: +0.0625x of the dense weight bytes).
This tool says which shapes match here, through the project's own binding (the operand's
descriptor as inference builds it), on a random 2:4 mask per shape (OUTxIN).

Where one does not match, it finds the layout instead, on a small shape (`--find 128x256`):
every (row, group of four columns) gets a number j; a first call keeps positions (0, 1) in
every group (nibble 0x4), and call b keeps (0, 2) (nibble 0x8) in the groups whose j + 1 has
bit b set, which flips bits 2 and 3 of exactly their nibbles. Which calls flipped a metadata bit
spells j + 1 for the group that owns it: about 1 + log2(out * in / 4) compress calls. It
prints where each row bit and group bit moves a nibble (the terms of the layout's formula)
and whether those terms explain every group.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from benchmarks.common import require_cuda, run_environment

DEFAULT_SHAPES = ["4096x4096", "12288x4096", "11008x4096", "4096x11008", "22016x4096",
                  "1536x8960", "128x256"]


def compressed(mask, values):
    """The project's cuSPARSELt operand (uint8, on the CPU) of W = values at mask's places."""
    import torch

    from slope_megatron.sparsity.backends.cusparselt_runtime import runtime
    rt = runtime()
    out, inp = mask.shape
    dense = torch.zeros(out, inp, dtype=torch.bfloat16, device=mask.device)
    dense[mask] = values.reshape(-1)
    buf = rt.compressed_buffer(out, inp, torch.bfloat16, dense.device)
    rt.ext.compress(dense, buf)
    return buf.cpu()


def check_shape(out: int, inp: int, device: str = "cuda") -> dict:
    """One random 2:4 mask compressed: does `in_place_meta` accept its metadata?"""
    import torch

    from slope_megatron.kernels.decode24_cslt_meta import fits, in_place_meta, meta_bytes
    gen = torch.Generator(device=device).manual_seed(out + inp)
    mask = (torch.rand(out, inp // 4, 4, generator=gen, device=device).argsort(-1) < 2)
    mask = mask.view(out, inp)  # two random places of every four
    values = torch.randn(out, inp // 2, device=device).to(torch.bfloat16)
    values[values == 0] = 1
    buf = compressed(mask, values)
    return {"shape": f"{out}x{inp}", "buffer_bytes": buf.numel(),
            "values_and_meta_bytes": out * inp + meta_bytes(out, inp),
            "modelled": fits(out, inp),
            "in_place": in_place_meta(buf, mask.cpu()) is not None}


def find_layout(out: int, inp: int, device: str = "cuda") -> dict:
    """The bit-plane search of the module docstring: each group's nibble address (bit offset
    after the values) and the per-bit terms of the layout's formula."""
    import torch
    groups = out * inp // 4
    nbits = groups.bit_length()
    ids = torch.arange(1, groups + 1, device=device)  # j + 1: every group flips in some call
    values = (torch.arange(out * inp // 2, device=device) % 251 + 1).to(torch.bfloat16)

    def meta_bits(keep_02):  # the metadata bits with groups keeping (0, 2) where keep_02
        mask = torch.zeros(groups, 4, dtype=torch.bool, device=device)
        mask[:, 0] = True
        mask[:, 1], mask[:, 2] = ~keep_02, keep_02
        buf = compressed(mask.view(out, inp), values).to(torch.int64)[out * inp:]
        return ((buf[:, None] >> torch.arange(8)) & 1).view(-1)

    base = meta_bits(torch.zeros(groups, dtype=torch.bool, device=device))
    code = torch.zeros_like(base)
    for b in range(nbits):
        code |= (meta_bits(((ids >> b) & 1).bool()) ^ base) << b
    # a group's nibble bits 2 (set in the first call: 0x4) and 3 flip in its calls
    nibble_of = {}
    for place in ((code != 0) & (base == 1)).nonzero().view(-1).tolist():
        nibble_of.setdefault(int(code[place]) - 1, place - 2)
    located = len(nibble_of) == groups and 0 in nibble_of
    result = {"shape": f"{out}x{inp}", "compress_calls": nbits + 1, "groups": groups,
              "groups_located": len(nibble_of)}
    if not located:
        return result
    row_terms = {1 << i: nibble_of[(1 << i) * (inp // 4)] - nibble_of[0]
                 for i in range((out - 1).bit_length())}
    group_terms = {1 << j: nibble_of[1 << j] - nibble_of[0]
                   for j in range((inp // 4 - 1).bit_length())}
    explained = all(
        nibble_of[j] - nibble_of[0]
        == sum(t for bit, t in row_terms.items() if (j // (inp // 4)) & bit)
        + sum(t for bit, t in group_terms.items() if (j % (inp // 4)) & bit)
        for j in range(groups))
    result.update({"bit_offset_of_group_0": nibble_of[0],
                   "row_bit_terms": row_terms, "group_bit_terms": group_terms,
                   "terms_explain_every_group": explained})
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cslt_meta_probe",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="OUTxIN")
    p.add_argument("--find", default="128x256",
                   help="OUTxIN to find the layout on where a shape does not match "
                        "(powers of two: the terms are per bit)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    require_cuda("benchmarks.cslt_meta_probe")
    rows = []
    for shape in args.shapes:
        out, inp = map(int, shape.split("x"))
        rows.append(check_shape(out, inp))
        print(json.dumps(rows[-1]))
    found = None
    if not all(r["in_place"] for r in rows if r["modelled"]):
        out, inp = map(int, args.find.split("x"))
        found = find_layout(out, inp)
        print(json.dumps(found, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": run_environment(), "shapes": rows, "found": found}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
