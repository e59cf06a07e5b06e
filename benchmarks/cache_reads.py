"""Patch-step cache reads at DPAR-L's decode shapes: a grouped gather against all-row views.

One patch layer's cached attention (cache write, cache read, masked SDPA) for R cache rows
(2 x images with guidance) at read length L, two ways:
  gather  the g rows that open a patch (a power-of-two group) are gathered, k_cache[rows, :L]:
          (g, L, H, D) copies of keys and values, then attention over them;
  view    every row runs, reading k_cache[:R, :L] as a view (rows that do not open are masked
          out by the caller), no copy.
An index-based kernel (one that reads the g rows straight from the cache) would move g/R of the
view's bytes; it is listed by bytes only (no such kernel exists for CPU SDPA).

    python -m benchmarks.cache_reads                      # DPAR-L: dim 1024, 16 heads, 512 rows
    python -m benchmarks.cache_reads --rows 64 --lengths 64 --repeats 2   # a quick look

Bytes are per layer and step (keys and values); multiply by the patch layers (19 for DPAR-L).

Measured results: docs/performance.md, "Cache reads".
"""
import argparse
import json
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cache_bytes(rows: int, length: int, heads: int, head_dim: int, itemsize: int) -> Dict[str, int]:
    """Bytes of key/value traffic per layer and step for each path: the gather reads and writes
    the copy and attention reads it again; a view is read once; an index kernel reads g rows."""
    block = 2 * length * heads * head_dim * itemsize  # keys + values of one row
    return {"gather": 3 * rows * block, "view_per_row": block, "index_per_row": block}


def best_seconds(fn, repeats: int = 5) -> float:
    """The fastest of `repeats` calls of fn, after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def measure(rows: int, group: int, length: int, heads: int, head_dim: int, capacity: int, dtype: torch.dtype,
            repeats: int) -> Dict[str, float]:
    """Seconds (best of `repeats`) of one layer's cached attention over `group` gathered rows
    and over all `rows` as views, with random caches and positions below `length`."""
    g = torch.Generator().manual_seed(0)
    shape = (rows, capacity + 1, heads, head_dim)
    k_cache = torch.randn(shape, generator=g).to(dtype)
    v_cache = torch.randn(shape, generator=g).to(dtype)
    q = torch.randn(rows, heads, 1, head_dim, generator=g).to(dtype)
    k_new = torch.randn(rows, 1, heads, head_dim, generator=g).to(dtype)
    pos = torch.randint(length // 2, length, (rows, 1), generator=g)
    rows_open = torch.randperm(rows, generator=g)[:group]  # (g,) the opening rows, any order
    slots = torch.arange(length)

    def gathered():
        k_cache[rows_open[:, None], pos[rows_open]] = k_new[rows_open]
        v_cache[rows_open[:, None], pos[rows_open]] = k_new[rows_open]
        keys, values = k_cache[rows_open, :length], v_cache[rows_open, :length]  # (g, L, H, D) copies
        mask = (slots[None, :] <= pos[rows_open])[:, None, None]  # (g, 1, 1, L)
        return F.scaled_dot_product_attention(q[rows_open], keys.transpose(1, 2), values.transpose(1, 2),
                                              attn_mask=mask)

    batch = torch.arange(rows)[:, None]

    def viewed():
        k_cache[batch, pos] = k_new
        v_cache[batch, pos] = k_new
        keys, values = k_cache[:, :length], v_cache[:, :length]  # (R, L, H, D) views
        mask = (slots[None, :] <= pos)[:, None, None]  # (R, 1, 1, L)
        return F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2), attn_mask=mask)

    same = torch.allclose(gathered().float(), viewed()[rows_open].float(), atol=1e-2, rtol=1e-2)
    if not same:
        raise AssertionError("the gathered and the viewed attention disagree on the opening rows")
    return {"gather_s": best_seconds(gathered, repeats), "view_s": best_seconds(viewed, repeats)}


def run(args) -> List[dict]:
    head_dim = args.dim // args.heads
    results = []
    for dtype_name in args.dtypes:
        dtype = DTYPES[dtype_name]
        itemsize = torch.empty((), dtype=dtype).element_size()
        for length in args.lengths:
            for share in args.shares:
                group = max(1, round(share * args.rows))
                t = measure(args.rows, group, length, args.heads, head_dim, args.capacity, dtype, args.repeats)
                b = cache_bytes(group, length, args.heads, head_dim, itemsize)
                row = {
                    "dtype": dtype_name, "rows": args.rows, "group_rows": group, "read_length": length,
                    "gather_MB": b["gather"] / 1e6, "view_MB": b["view_per_row"] * args.rows / 1e6,
                    "index_MB": b["index_per_row"] * group / 1e6,
                    "gather_ms": 1e3 * t["gather_s"], "view_ms": 1e3 * t["view_s"],
                    "view_speedup": t["gather_s"] / t["view_s"],
                }
                results.append(row)
                print(f"{dtype_name:8s} L={length:4d} g={group:4d}/{args.rows}  bytes MB gather {row['gather_MB']:8.1f} "
                      f"view {row['view_MB']:8.1f} index {row['index_MB']:8.1f}  ms gather {row['gather_ms']:8.1f} "
                      f"view {row['view_ms']:8.1f}  view speed-up {row['view_speedup']:.2f}x", flush=True)
    return results


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=512, help="cache rows (2 x images with guidance)")
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--capacity", type=int, default=576, help="cache slots per row (the token count)")
    p.add_argument("--lengths", type=int, nargs="+", default=[128, 288], help="read lengths (patch slots)")
    p.add_argument("--shares", type=float, nargs="+", default=[0.25, 0.5, 1.0],
                   help="share of the rows in the opening group")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"], choices=sorted(DTYPES))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the table here")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.dim % args.heads:
        raise SystemExit(f"--dim {args.dim} is not a multiple of --heads {args.heads}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results = run(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
