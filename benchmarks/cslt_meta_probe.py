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
bit b set, which flips exactly the bits that hold their second position. Which calls flipped
a metadata bit spells j + 1 for the group that owns it. The same again for the first
position ((0, 3) -> (1, 3)): about 2 log2(out * in / 4) compress calls in all. It prints
where each row bit and group bit moves a group's positions (the terms of the layout's
formula), whether those terms explain every group, and whether a group's two positions form
one nibble. Exit status 1 where a modelled shape does not match.
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

    from slope_megatron.kernels.decode24_cslt_meta import in_place_meta, layout_covers, meta_bytes
    gen = torch.Generator(device=device).manual_seed(out + inp)
    mask = (torch.rand(out, inp // 4, 4, generator=gen, device=device).argsort(-1) < 2)
    mask = mask.view(out, inp)  # two random places of every four
    values = torch.randn(out, inp // 2, device=device).to(torch.bfloat16)
    values[values == 0] = 1
    buf = compressed(mask, values)
    return {"shape": f"{out}x{inp}", "buffer_bytes": buf.numel(),
            "values_and_meta_bytes": out * inp + meta_bytes(out, inp),
            "modelled": layout_covers(out, inp),
            "in_place": in_place_meta(buf, mask.cpu()) is not None}


def find_layout(out: int, inp: int, device: str = "cuda") -> dict:
    """The bit-plane search of the module docstring, twice: moving the first kept position
    ((0, 3) -> (1, 3) flips its low bit) and the second ((0, 1) -> (0, 2) flips both of its
    bits). Returns where each group's first position starts (bits after the values), whether
    its second sits two bits above (one nibble), and the per-bit terms of that address."""
    import torch
    groups = out * inp // 4
    nbits = groups.bit_length()
    ids = torch.arange(1, groups + 1, device=device)  # j + 1: every group moves in some call
    values = (torch.arange(out * inp // 2, device=device) % 251 + 1).to(torch.bfloat16)
    rows = torch.arange(groups, device=device)

    def meta_bits(first, second):  # the metadata bits of a mask keeping these positions
        mask = torch.zeros(groups, 4, dtype=torch.bool, device=device)
        mask[rows, first] = True
        mask[rows, second] = True
        buf = compressed(mask.view(out, inp), values).to(torch.int64)[out * inp:]
        return ((buf[:, None] >> torch.arange(8)) & 1).view(-1)

    def owners(base, moved):  # for each metadata bit: 1 + the group whose move flips it, or 0
        def pairs(sel):
            return [torch.where(sel, moved[i], base[i]) for i in (0, 1)]
        first = meta_bits(*pairs(torch.zeros(groups, dtype=torch.bool, device=device)))
        code = torch.zeros_like(first)
        for b in range(nbits):
            code |= (meta_bits(*pairs(((ids >> b) & 1).bool())) ^ first) << b
        lowest = {}
        for place in (code != 0).nonzero().view(-1).tolist():  # ascending: the lowest first
            lowest.setdefault(int(code[place]) - 1, place)
        return lowest

    first_at = owners((0, 3), (1, 3))
    second_at = owners((0, 1), (0, 2))
    every = set(range(groups))
    result = {"shape": f"{out}x{inp}", "compress_calls": 2 * (nbits + 1), "groups": groups,
              "groups_located": len(set(first_at) & set(second_at) & every)}
    if not set(first_at) == set(second_at) == every:
        return result
    per_row = inp // 4
    row_terms = {1 << i: first_at[(1 << i) * per_row] - first_at[0]
                 for i in range((out - 1).bit_length())}
    group_terms = {1 << j: first_at[1 << j] - first_at[0]
                   for j in range((per_row - 1).bit_length())}
    explained = all(
        first_at[j] - first_at[0]
        == sum(t for bit, t in row_terms.items() if (j // per_row) & bit)
        + sum(t for bit, t in group_terms.items() if (j % per_row) & bit)
        for j in range(groups))
    result.update({"bit_offset_of_group_0": first_at[0],
                   "second_position_2_bits_above_first": all(
                       second_at[j] == first_at[j] + 2 for j in range(groups)),
                   "row_bit_terms": row_terms, "group_bit_terms": group_terms,
                   "terms_explain_every_group": explained})
    return result


def shape(text: str) -> tuple:
    """OUTxIN -> (out, in), for argparse."""
    try:
        out, inp = (int(n) for n in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not OUTxIN (e.g. 4096x11008)") from None
    if out < 1 or inp < 4 or inp % 4:
        raise argparse.ArgumentTypeError(f"{text}: needs out >= 1 and in a multiple of 4")
    return out, inp


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.cslt_meta_probe",
                                description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", type=shape, default=[shape(s) for s in DEFAULT_SHAPES],
                   help=f"OUTxIN (default: {' '.join(DEFAULT_SHAPES)})")
    p.add_argument("--find", type=shape, default="128x256",
                   help="OUTxIN to find the layout on where a shape does not match "
                        "(powers of two: the terms are per bit)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    require_cuda("benchmarks.cslt_meta_probe")
    rows = []
    for out, inp in args.shapes:
        rows.append(check_shape(out, inp))
        print(json.dumps(rows[-1]))
    found = None
    matches = all(r["in_place"] for r in rows if r["modelled"])
    if not matches:
        found = find_layout(*args.find)
        print(json.dumps(found, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(
            {"environment": run_environment(), "shapes": rows, "found": found}, indent=2))
    print("every modelled shape matches: the decode kernel reads cuSPARSELt's metadata in place"
          if matches else "a modelled shape does not match: the decode kernel keeps its own "
          "copy of the metadata on this GPU")
    return 0 if matches else 1


if __name__ == "__main__":
    sys.exit(main())
