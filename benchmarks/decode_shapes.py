"""Decode-step shapes at full size, and what a shape costs to compile.

    python -m benchmarks.decode_shapes shapes     # distinct inputs per step function, one generation
    python -m benchmarks.decode_shapes compile    # inductor compile time against distinct read lengths

shapes: one whole DPAR generation at the real sequence length and batch (576 tokens, 256 images
with guidance = 512 cache rows, about 2.1 tokens per patch) but a tiny width, since the shapes a
step function sees do not depend on the width. Each step function's distinct (tensor shapes,
int arguments) is one CUDA graph under mode="reduce-overhead"; the total is the captures of a
whole generation.

compile: one step function (DPAR's decoder step, tiny width) compiled with inductor on this
machine, called at N distinct read lengths: dynamic=True (what the fast path uses: one graph
for every length unless a guard splits it) and dynamic=False (one compile per length, the cost
a shape has when it is not covered by a dynamic graph).

Measured 2026-12-02, torch 2.14.1, 2 shared CPU threads (load 4-11):
  shapes   (576 tokens, 256 images, 512 rows, read block 32; 5.5 tokens per patch with this
           random gate)       _entropy  encode_step  close_patches  decode_step  total
    blocks of 32, groups      18        18           18             18           72
    half-octave, all rows      8         8            6              8           30
  The patch step now runs power-of-two groups of images (patch_group): one shape per (group size,
  read length) pair. Over the 384 px synthetic layouts of benchmarks.decode_cost (256 images,
  2.06 tokens per patch) that is 14 pairs (groups 128 and 256), so 38 graphs in all (computed by
  `python -m benchmarks.decode_cost model`, not yet measured with this command).
  compile  (DPAR-T decoder step, 256 tokens, inductor)
    dynamic=True:  1 length 1 graph 156 s (includes the process's first compile); 8 lengths 1 graph 77 s
    dynamic=False: 1 length 1 graph 80 s; 2 lengths 2 graphs 66 s (the first graph from the cache)
"""
import argparse
import json
import time
from collections import Counter, defaultdict

import torch

from autoregressive.models.dpar import DPAR_models
from autoregressive.models.generate import Decoding, generate
from autoregressive.models.gpt import GPT_models
from entropy_model.entropy import teacher_forced_entropy
from entropy_model.patching import PatchingConfig


def tiny_pair(tokens: int, vocab: int):
    """A random DPAR-T and GPT-T entropy model whose entropies vary (LlamaGen zero-initialises
    the heads, which would make every entropy ln V)."""
    torch.manual_seed(0)
    entropy_model = GPT_models["GPT-T"](vocab_size=vocab, block_size=tokens, model_type="uncond").eval()
    torch.nn.init.normal_(entropy_model.output.weight, std=2.0)
    torch.nn.init.normal_(entropy_model.tok_embeddings.weight, std=1.0)
    model = DPAR_models["DPAR-T"](vocab_size=vocab, block_size=tokens, num_classes=10).eval()
    torch.nn.init.normal_(model.output.weight, std=0.5)
    return model, entropy_model


def gate_for(entropy_model, tokens: int, vocab: int, tokens_per_patch: float) -> PatchingConfig:
    """Entropy patching whose threshold opens about one patch per tokens_per_patch tokens."""
    codes = torch.randint(0, vocab, (16, tokens), generator=torch.Generator().manual_seed(1))
    e = teacher_forced_entropy(entropy_model, codes)[:, 1:]
    return PatchingConfig("entropy", float(e.quantile(1 - 1 / tokens_per_patch)), None, False)


class RecordingDecoding(Decoding):
    """Eager decoding that records each step function's distinct inputs."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.signatures, self.calls = defaultdict(set), Counter()

    def wrap(self, fn):
        def run(*args):
            key = tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a for a in args
                        if isinstance(a, (torch.Tensor, int)))
            self.signatures[fn.__name__].add(key)
            self.calls[fn.__name__] += 1
            return fn(*args)

        return run


def count_shapes(args) -> dict:
    model, entropy_model = tiny_pair(args.tokens, args.vocab)
    patching = gate_for(entropy_model, args.tokens, args.vocab, args.tokens_per_patch)
    decoding = RecordingDecoding(read_block=args.read_block)
    start = time.perf_counter()
    out = generate(model, torch.arange(args.images) % 10, args.tokens, cfg_scale=2.0, top_k=8,
                   row_seeds=list(range(args.images)), entropy_model=entropy_model, patching=patching,
                   decoding=decoding)
    seconds = time.perf_counter() - start
    per_function = {name: len(s) for name, s in sorted(decoding.signatures.items())}
    lengths = {name: sorted({key[-1] for key in s}) for name, s in sorted(decoding.signatures.items())}
    result = {
        "tokens": args.tokens, "images": args.images, "rows": 2 * args.images, "read_block": args.read_block,
        "tokens_per_patch": args.tokens / out.num_patches.float().mean().item(),
        "calls": dict(decoding.calls), "shapes": per_function, "total": sum(per_function.values()),
        "read_lengths": lengths, "seconds": seconds,
    }
    for name, n in per_function.items():
        print(f"{name:14s} {n:3d} shapes over {decoding.calls[name]:4d} calls; read lengths {lengths[name]}")
    print(f"total {result['total']} graphs; {result['tokens_per_patch']:.2f} tokens per patch; {seconds:.0f} s")
    return result


def compile_times(args) -> dict:
    from torch._dynamo.utils import counters

    model, _ = tiny_pair(args.tokens, args.vocab)
    rows = 8
    model.setup_caches(rows, images=rows)
    u = torch.randn(rows, model.config.dim)
    result = {"runs": []}
    for dynamic, counts in ((True, args.dynamic_counts), (False, args.static_counts)):
        for count in counts:
            # evenly spread over the cache, in multiples of 8 (none of length 1 or of the batch size)
            lengths = [-(-args.tokens * (k + 1) // count // 8) * 8 for k in range(count)]
            torch._dynamo.reset()
            counters.clear()
            step = torch.compile(model.decode_step, backend="inductor", fullgraph=True, dynamic=dynamic)
            start = time.perf_counter()
            with torch.no_grad():
                for length in lengths:
                    step(u, torch.full((rows, 1), length - 1), length)
            seconds = time.perf_counter() - start
            graphs = counters["stats"]["unique_graphs"]
            result["runs"].append({"dynamic": dynamic, "lengths": count, "graphs": graphs, "seconds": seconds})
            print(f"dynamic={dynamic!s:5s} {count:2d} read lengths: {graphs} graphs, {seconds:6.1f} s", flush=True)
    torch._dynamo.reset()
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("section", choices=["shapes", "compile"])
    p.add_argument("--tokens", type=int, default=576)
    p.add_argument("--images", type=int, default=256, help="images (cache rows are twice this, with guidance)")
    p.add_argument("--vocab", type=int, default=64)
    p.add_argument("--tokens-per-patch", type=float, default=2.1)
    p.add_argument("--read-block", type=int, default=Decoding.read_block)
    p.add_argument("--dynamic-counts", type=int, nargs="+", default=[1, 8, 18])
    p.add_argument("--static-counts", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--json", help="write the result here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    result = count_shapes(args) if args.section == "shapes" else compile_times(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
