"""Generate text from a SLoPe checkpoint, printing tokens as they are produced.

    python launch/generate.py --checkpoint runs/demo --prompt "Once upon a time" \
        --max-new-tokens 64 [--temperature 0.8 --top-p 0.95 --seed 1]

--checkpoint takes an artifact dir, a checkpoint dir holding slope_model/, or a run's
output_dir (the newest complete checkpoints/iter_*/slope_model/ is used). Several --prompt /
--prompt-file (one whole file = one prompt) run as one batch, numbered in command-line order; a
single prompt streams. Temperature 0 (the default) is greedy decoding (no seed: the random seed
is printed only when sampling). With `--device cuda` (bf16 by default) the 2:4
sparse layers are compressed for cuSPARSELt, the project's decode GEMM takes the small calls
where it measured faster at load, and each decode step is replayed as a CUDA graph with the
work between its GEMMs compiled (the defaults, `--kernels auto --decode auto --compile auto`);
on a CPU the sparse layers run the reference math
(a dense GEMM on W*M) and decoding is eager (docs/INFERENCE.md).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from pathlib import Path

import torch


from slope_megatron.inference import (ArtifactError, InferenceModel, SamplingConfig,
                                      find_artifact, generate, load_artifact, load_tokenizer)
from slope_megatron.inference.artifact import tokenizer_kind
from slope_megatron.inference.tokenizer import FileTokenizer


class _InOrder(argparse.Action):
    """--prompt / --prompt-file: appends to its own list as action="append" does, and also to
    `sources` as (dest, value), so prompts are numbered in command-line order."""

    def __call__(self, parser, namespace, values, option_string=None):
        setattr(namespace, self.dest, list(getattr(namespace, self.dest, None) or []) + [values])
        namespace.sources = list(getattr(namespace, "sources", None) or []) + [(self.dest,
                                                                                  values)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, type=Path,
                   help="artifact dir, checkpoint dir (with slope_model/) or run output_dir")
    p.add_argument("--prompt", action=_InOrder, default=[],
                   help="prompt text (repeatable; prompts are numbered in command-line order, "
                        "--prompt and --prompt-file together)")
    p.add_argument("--prompt-file", action=_InOrder, default=[], type=Path,
                   help="file whose whole content is one prompt (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--seed", type=int, default=None,
                   help="sampling seed (temperature > 0); default: random, printed at the end")
    p.add_argument("--dtype", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (default): bf16 on a GPU (compressed 2:4 kernels), fp32 on a CPU")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--kernels", choices=("auto", "decode24", "cusparselt", "reference"),
                   default="auto",
                   help="sparse layers: cusparselt (compressed 2:4 weights on cuSPARSELt; "
                        "CUDA, bf16), decode24 (the same weights plus the project's decode "
                        "GEMM where it measures faster at load, which takes a few seconds; "
                        "see docs/INFERENCE.md), reference (the masked dense math), or auto "
                        "(default): decode24 where it can run, else cusparselt, else reference")
    p.add_argument("--decode", choices=("eager", "static", "auto"), default="auto",
                   help="eager: every op launched from Python each token; static: fixed-shape "
                        "decode steps over a full-capacity KV cache, replayed as a CUDA graph "
                        "on a GPU; auto (default): static on a GPU, eager on a CPU")
    p.add_argument("--compile", choices=("auto", "on", "off"), default="auto",
                   help="torch.compile the work between the GEMMs of a static decode step "
                        "(residual adds fused into the norms, rotary, activation): auto "
                        "(default) where the step is a CUDA graph (compiled on the first "
                        "call), on, or off")
    p.add_argument("--low-memory", action="store_true",
                   help="rebuild each sparse layer's W*M inside every call instead of holding "
                        "dense copies while generating (much slower, less memory)")
    p.add_argument("--stop-token", type=int, action="append", default=[],
                   help="token id that ends a sequence (repeatable); the tokenizer's "
                        "end-of-text token is one unless --no-eos-stop")
    p.add_argument("--no-eos-stop", action="store_true")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="tokenizer.json to use instead of the artifact's")
    p.set_defaults(sources=[])
    return p.parse_args(argv)


def check_device(name: str) -> torch.device:
    """The device --device names, or ValueError saying why it cannot be used here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {name}: not a torch device name; use --device cpu, cuda "
                         "or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA GPU is visible "
                             "(torch.cuda.is_available() is False); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise ValueError(f"--device {name}: only {count} CUDA GPU(s) visible (cuda:0 to "
                             f"cuda:{count - 1}); use one of those or --device cpu")
    elif device.type == "meta":
        raise ValueError(f"--device {name}: meta tensors hold no values, so nothing can be "
                         "generated; use --device cpu or cuda")
    elif device.type != "cpu":
        try:
            torch.empty(1, device=device)
        except Exception as e:  # backends fail in their own ways (Assertion, NotImplemented)
            first = (str(e).splitlines() or [""])[0][:120]
            raise ValueError(f"--device {name}: this torch cannot use it ({type(e).__name__}: "
                             f"{first}); use --device cpu or cuda") from None
    return device


def check_args(args) -> torch.device:
    """Everything the command line alone decides, before the checkpoint is read: sampling and
    length settings, prompts and the device. ValueError (one line) on the first problem."""
    try:
        SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed).validate()
    except ValueError as e:  # name the flag: "top_p must ..." -> "--top-p must ..."
        name, rest = str(e).split(" ", 1)
        raise ValueError(f"--{name.replace('_', '-')} {rest}") from None
    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    bad = [t for t in args.stop_token if t < 0]
    if bad:
        raise ValueError(f"--stop-token must be a token id >= 0, got {bad[0]}")
    if not args.prompt and not args.prompt_file:
        raise ValueError("give at least one --prompt or --prompt-file")
    for f in args.prompt_file:
        if not f.is_file():
            raise ValueError(f"prompt file '{f}' does not exist")
    if args.tokenizer is not None and not args.tokenizer.exists():
        raise ValueError(f"--tokenizer {args.tokenizer}: no such file")
    return check_device(args.device)


def user_tokenizer(path: Path):
    """The tokenizer of --tokenizer: a file the user chose, so its errors name it (and not the
    data pipeline's advice to prepare a data directory again)."""
    if tokenizer_kind(path) != "bpe":  # a gpt2.tiktoken file or an hf_tokenizer/ directory
        try:
            return load_tokenizer(path)
        except ValueError as e:
            raise ValueError(f"--tokenizer {path}: could not be read as a tokenizer ({e})") \
                from None
    try:
        return FileTokenizer(path)  # what generation needs: encode, decode, vocab size, eos id
    except ValueError as e:
        raise ValueError(f"--tokenizer {path}: could not be read as a tokenizer.json ({e})") \
            from None


class Streamer:
    """Prints the decoded text of one sequence as it grows (whole-text decode, so multi-byte
    characters split across tokens print once complete). The prompt text is echoed with the
    first token (or by `finish`), so whatever generate() reports before decoding starts (its
    notes, an error) comes first, not glued to the prompt."""

    def __init__(self, tokenizer, prompt: str = "", out=None):
        self.tokenizer, self.prompt, self.ids, self.printed = tokenizer, prompt, [], 0
        self.out = sys.stdout if out is None else out
        self.echoed = False

    def _echo(self) -> None:
        if not self.echoed:
            self.echoed = True
            self.out.write(self.prompt)
            self.out.flush()

    def finish(self) -> None:
        """The prompt, if no token came (e.g. a stop token first), then the newline."""
        self._echo()
        self.out.write("\n")
        self.out.flush()

    def __call__(self, index: int, token: int) -> None:
        self._echo()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for more bytes
            return
        self.out.write(text[self.printed:])
        self.out.flush()
        self.printed = len(text)


def _prompts(args, tokenizer) -> tuple[list[str], list[list[int]]]:
    """The prompts' texts and token ids, in command-line order."""
    sources = getattr(args, "sources", None) or (
        [("prompt", t) for t in args.prompt] + [("prompt_file", f) for f in args.prompt_file])
    texts = []
    for dest, value in sources:
        if dest == "prompt":
            texts.append(value)
            continue
        if not value.is_file():
            raise ValueError(f"prompt file '{value}' does not exist")
        texts.append(value.read_text())
    if not texts:
        raise ValueError("give at least one --prompt or --prompt-file")
    ids = []
    for text in texts:
        encoded = list(tokenizer.encode(text))
        if not encoded and tokenizer.eos_id is not None:
            encoded = [tokenizer.eos_id]  # empty prompt: start a fresh document
        ids.append(encoded)
    return texts, ids


def check_vocabulary(args, tokenizer, prompts, model_vocab: int) -> int:
    """The ids generation may use lie below min(tokenizer, model) vocabulary: check the stop
    tokens and the prompts' ids against it before the model is built or anything printed
    (generate() would refuse them only after the prompt was echoed). Returns the limit."""
    limit = min(tokenizer.vocab_size, model_vocab)
    where = (f"the tokenizer's vocabulary ({tokenizer.vocab_size} ids)"
             if tokenizer.vocab_size <= model_vocab else
             f"the model's vocabulary ({model_vocab} ids)")
    bad = sorted(t for t in set(args.stop_token) if t >= limit)
    if bad:
        raise ValueError(f"--stop-token {bad[0]}: outside {where}; use a token id in "
                         f"[0, {limit})")
    eos = tokenizer.eos_id
    if eos is not None and eos >= limit and not args.no_eos_stop:
        raise ValueError(f"the tokenizer's end-of-text token {eos} is outside {where}: the "
                         "tokenizer does not fit this model; pass the model's own tokenizer "
                         "(leave out --tokenizer) or --no-eos-stop")
    for i, ids in enumerate(prompts):
        over = [t for t in ids if t >= limit]
        if over:
            raise ValueError(f"prompt {i} encodes to token id {over[0]}, outside {where}: the "
                             "tokenizer does not fit this model; pass the model's own "
                             "tokenizer (leave out --tokenizer)")
    return limit


def _note(message, category, filename, lineno, file=None, line=None) -> None:
    """warnings.showwarning for generation: one plain line on stderr instead of Python's
    file:line + source-line format (e.g. a prompt cut to the model's context)."""
    prefix = "note" if category is UserWarning else f"warning: {category.__name__}"
    print(f"{prefix}: {message}", file=sys.stderr)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        device = check_args(args)  # nothing is read or printed before the arguments are sound
        artifact = find_artifact(args.checkpoint)
        config, state, tokenizer_file = load_artifact(artifact)
        if args.tokenizer is not None:
            tokenizer = user_tokenizer(args.tokenizer)
        elif tokenizer_file is None:
            raise ValueError(f"artifact '{artifact}' has no tokenizer.json; pass --tokenizer FILE")
        else:
            tokenizer = load_tokenizer(tokenizer_file)
        texts, prompts = _prompts(args, tokenizer)
        limit = check_vocabulary(args, tokenizer, prompts, config.model.vocab_size)
        if args.dtype == "auto":
            args.dtype = "fp32" if device.type == "cpu" else "bf16"
        model = InferenceModel(config, state, dtype=args.dtype, device=device,
                               dense_cache=not args.low_memory, kernels=args.kernels,
                               decode=args.decode, compile=args.compile)
        del state
        stops = set(args.stop_token)
        if tokenizer.eos_id is not None and not args.no_eos_stop:
            stops.add(tokenizer.eos_id)
        sampling = SamplingConfig(args.temperature, args.top_k, args.top_p, args.seed)
        print(f"[{artifact}] {config.model.arch}, {len(prompts)} prompt(s), {args.dtype}, "
              f"{args.device}, sparse kernels: {model.kernels} ({model.kernels_note}), "
              f"decoding: {model.describe_decoding()}",
              file=sys.stderr)
        streamer = Streamer(tokenizer, texts[0]) if len(prompts) == 1 else None
        start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _note
            results = generate(model, prompts, args.max_new_tokens, sampling, stops, streamer,
                               vocab_limit=limit)
        seconds = time.perf_counter() - start
    except (ArtifactError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if streamer is not None:
        streamer.finish()
    else:
        for i, (text, r) in enumerate(zip(texts, results)):
            print(f"=== [{i}] ===\n{text}{tokenizer.decode(r.tokens)}")
    made = sum(len(r.tokens) for r in results)
    reasons = ", ".join(r.finish_reason for r in results)
    seed = "" if sampling.greedy else f"; seed {results[0].seed}"  # greedy draws nothing
    print(f"[{made} tokens in {seconds:.2f}s ({made / max(seconds, 1e-9):.1f} tok/s); "
          f"finished: {reasons}{seed}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
