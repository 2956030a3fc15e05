"""`python -m benchmarks.bench inference blocks`: prefill and decode latency of whole transformer
blocks on a GPU, dense vs SLoPe with compressed 2:4 weights (adapters off and at given rank
ratios).

What is timed: `InferenceModel.step` - the real inference forward (embedding, blocks with
KV-cached attention, final norm, last-token LM head) - in bf16, each call captured once in a
CUDA graph and replayed, so the numbers are GPU time, not Python launch time. Prefill: one
sequence of T tokens into an empty cache. Decode: one new token per sequence for a batch of
B sequences whose cache already holds `--context` valid tokens. Medians of
triton.testing.do_bench (CUDA events) after warm-up; cuSPARSELt plans are searched in the
warm-up. Models are random (no zeros), built at the real layer shapes with `--layers` blocks.

Per-block time is (t[L blocks] - t[1 block]) / (L - 1): blocks 2..L are fully sparse (the
first block keeps a dense QKV, as in training), and embedding, head and the first block
cancel out. The whole-model figure is t[1 block] + (num_layers - 1) * per-block, i.e. the
same model at its real depth; weights are counted the same way (InferenceModel.weight_bytes).
In the same run the sparse models' logits are checked against the reference kernels'
(rel. err < 1e-2).
"""
from __future__ import annotations

import datetime
import json
import os
import sys
import time
from pathlib import Path

from benchmarks.common import argument_check_then_cuda, bench_ms, source_identity

# OPT-shaped models use this project's gpt arch (LayerNorm, GELU, learned positions, biases).
PRESETS = {
    "opt-2.7b": dict(arch="gpt", hidden=2560, heads=32, layers=32, vocab=50272, ffn=None),
    "opt-6.7b": dict(arch="gpt", hidden=4096, heads=32, layers=32, vocab=50272, ffn=None),
    "opt-13b": dict(arch="gpt", hidden=5120, heads=40, layers=40, vocab=50272, ffn=None),
    "llama-7b": dict(arch="llama", hidden=4096, heads=32, layers=32, vocab=32000, ffn=11008),
}


def add_arguments(p) -> None:
    p.add_argument("--models", nargs="+", default=list(PRESETS), choices=list(PRESETS),
                   metavar="MODEL", help=f"model shapes to build: {', '.join(PRESETS)}")
    p.add_argument("--prefill", nargs="+", type=int, default=[512, 2048, 8192],
                   help="prompt lengths T (batch 1)")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 8, 64],
                   help="decode batch sizes (one new token per sequence)")
    p.add_argument("--context", type=int, default=512, help="cached tokens when decoding")
    p.add_argument("--ranks", nargs="*", type=float, default=[0.0156, 0.0625],
                   help="adapter rank ratios (of each layer's input width) of the SLoPe arms "
                        "besides adapters-off")
    p.add_argument("--layers", type=int, default=3, help="blocks built per model (>= 2)")
    p.add_argument("--json", default="docs/results/inference_bench.json",
                   help="write the results (with the GPU name and versions) here")


def argument_error(args) -> str | None:
    """What is wrong with the numeric arguments (None when nothing), checked before any
    import of torch or triton."""
    if args.layers < 2:
        return f"--layers must be at least 2 (per-block time is a difference), got {args.layers}"
    for flag, values in (("--prefill", args.prefill), ("--batches", args.batches)):
        bad = [v for v in values if v < 1]
        if bad:
            return f"{flag} takes values of at least 1, got {bad[0]}"
    if args.context < 0:
        return f"--context must be at least 0, got {args.context}"
    bad = [r for r in args.ranks if not 0 < r <= 1]
    if bad:
        return f"--ranks takes rank ratios in (0, 1], got {bad[0]:g}"
    return None


def _config(preset: dict, seq_len: int, sparse: bool, rank: float | None):
    from slope_megatron.config import load_config
    sets = [f"model.arch={preset['arch']}", f"model.hidden_size={preset['hidden']}",
            f"model.num_heads={preset['heads']}", f"model.vocab_size={preset['vocab']}",
            f"model.seq_len={seq_len}", f"sparsity.enabled={str(sparse).lower()}",
            f"adapters.enabled={str(rank is not None).lower()}"]
    if preset["ffn"]:
        sets.append(f"model.ffn_hidden_size={preset['ffn']}")
    if rank is not None:
        sets += [f"adapters.rank_ratio={rank}", "adapters.rank_of=input"]  # as in INFERENCE.md
    return load_config(None, sets)


def random_state(preset: dict, layers: int, seq_len: int, sparse: bool, rank: float | None):
    """(config, state dict) of a random GPTModel with `layers` blocks, built on the GPU;
    adapters active with a random B (no zeros) when `rank` is given."""
    import torch
    from slope_megatron.model import GPTModel
    from slope_megatron.sparsity import enable_adapters, slope_layers

    cfg = _config(preset, seq_len, sparse, rank)
    cfg.model.num_layers = layers
    with torch.device("cuda"):
        model = GPTModel.from_config(cfg)
    if rank is not None:
        enable_adapters(model)
        for layer in slope_layers(model):
            torch.nn.init.normal_(layer.adapter_b, 0.0, 0.02)
    return cfg, model.state_dict()


def reference_error(cfg, state, fast) -> float:
    """Rel. error of `fast`'s logits vs the same weights on the reference kernels."""
    import torch
    from slope_megatron.inference import InferenceModel

    ref = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="reference")
    ids = torch.randint(0, cfg.model.vocab_size, (2, 256), device="cuda")
    with ref.generation_scope():
        b = ref.full_logits(ids)
    a = fast.full_logits(ids)
    return ((a - b).norm() / b.norm()).item()


def graph_ms(inf, batch: int, new: int, context: int) -> float:
    """Median ms of one `step` of `new` tokens per sequence after `context` cached ones."""
    import torch
    cache = inf.new_cache(batch, context + new)
    cache.valid[:, :context] = True
    gen = torch.Generator(device="cuda").manual_seed(0)
    ids = torch.randint(0, inf.vocab_size, (batch, new), device="cuda", generator=gen)
    pos = torch.arange(context, context + new, device="cuda").expand(batch, -1).contiguous()

    def call():
        cache.length = context
        inf.step(ids, pos, cache, last_only=True)

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: plans built and searched, allocator primed
        for _ in range(3):
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        call()
    return bench_ms(graph.replay, warmup=10, rep=60)


def measure(inf, args) -> dict:
    """Times and weight bytes with all blocks and with the first block only."""
    full = inf.model.blocks
    out = {}
    for tag, blocks in (("all", full), ("one", full[:1])):
        inf.model.blocks = blocks
        try:
            out[tag] = {"bytes": sum(inf.weight_bytes().values()),
                        "prefill": {t: graph_ms(inf, 1, t, 0) for t in args.prefill},
                        "decode": {b: graph_ms(inf, b, 1, args.context) for b in args.batches}}
        finally:
            inf.model.blocks = full
    return out


def derive(m: dict, layers: int, num_layers: int) -> dict:
    """Per-block and whole-model figures from the all/one measurements."""
    def per_block(a, b):
        return (a - b) / (layers - 1)

    def whole(a, b):
        return b + (num_layers - 1) * per_block(a, b)

    res = {"block_bytes": per_block(m["all"]["bytes"], m["one"]["bytes"]),
           "model_bytes": whole(m["all"]["bytes"], m["one"]["bytes"])}
    for phase in ("prefill", "decode"):
        res[phase] = {k: {"block_ms": per_block(m["all"][phase][k], m["one"][phase][k]),
                          "model_ms": whole(m["all"][phase][k], m["one"][phase][k])}
                      for k in m["all"][phase]}
    return res


def run_inference(args) -> int:
    refused = argument_check_then_cuda(argument_error(args), "`bench inference blocks`")
    if refused is not None:
        return refused
    import torch
    import triton
    from slope_megatron.inference import InferenceModel
    from slope_megatron.sparsity.backends.cusparselt_runtime import runtime
    seq_len = max(max(args.prefill), args.context + 1)
    dev = torch.cuda.current_device()
    meta = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__,
            "cuda": torch.version.cuda, "triton": triton.__version__,
            "cusparselt": runtime().ext.library_version(dev),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "command": " ".join(sys.argv), "layers_built": args.layers,
            "context": args.context, **source_identity()}
    print(f"# {meta['gpu']} | torch {meta['torch']} | cuSPARSELt {meta['cusparselt']} | "
          f"bf16, CUDA-graph replay, per-block = (t[{args.layers}] - t[1]) / {args.layers - 1}",
          flush=True)
    arms = [("dense", False, None), ("slope", True, None)] + \
        [(f"slope+r{100 * r:g}%", True, r) for r in args.ranks]
    results = {"meta": meta, "rows": []}
    for name in args.models:
        preset = PRESETS[name]
        base = None
        for arm, sparse, rank in arms:
            t0 = time.time()
            cfg, state = random_state(preset, args.layers, seq_len, sparse, rank)
            inf = InferenceModel(cfg, state, dtype="bf16", device="cuda", kernels="auto")
            row = {"model": name, "arm": arm, "rank_ratio": rank, "kernels": inf.kernels_note}
            if sparse:
                if inf.kernels not in ("cusparselt", "decode24"):
                    print(f"error: {name} {arm}: {inf.kernels_note}", file=sys.stderr)
                    return 1
                row["err"] = reference_error(cfg, state, inf)
            del state
            torch.cuda.empty_cache()
            row.update(derive(measure(inf, args), args.layers, preset["layers"]))
            del inf
            torch.cuda.empty_cache()
            base = base or row
            row["seconds"] = time.time() - t0
            results["rows"].append(row)
            _print_row(row, base, args)
    bad = [r for r in results["rows"] if not r.get("err", 0.0) < 1e-2]
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"# wrote {args.json}")
    if bad:
        print(f"# CORRECTNESS FAILED for {len(bad)} rows")
        return 1
    return 0


def _print_row(row: dict, base: dict, args) -> None:
    def ratio(phase, k):
        return base[phase][k]["block_ms"] / row[phase][k]["block_ms"]

    pre = " ".join(f"{row['prefill'][t]['block_ms']:7.3f} ({ratio('prefill', t):4.2f}x)"
                   for t in args.prefill)
    dec = " ".join(f"{row['decode'][b]['block_ms']:7.3f} ({ratio('decode', b):4.2f}x)"
                   for b in args.batches)
    mem = row["block_bytes"] / base["block_bytes"]
    err = f"{row['err']:.1e}" if "err" in row else "-"
    print(f"{row['model']:9s} {row['arm']:14s} | block MB {row['block_bytes'] / 2**20:7.1f} "
          f"({mem:4.2f}x) | prefill ms/block T={args.prefill}: {pre} | decode ms/block "
          f"B={args.batches}: {dec} | err {err}", flush=True)
