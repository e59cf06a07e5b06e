"""Command line of sample_c2i.py: LlamaGen's flags (sample_c2i.py / sample_c2i_ddp.py) plus
DPAR's entropy model and inference-time patching overrides.

Two modes. Grid (default): one process samples --class-labels and writes a PNG grid.
FID (--num-fid-samples N): single-process or under torchrun, writes N images and packs
them into <sample-dir>.npz (see autoregressive/sample/fid.py).

Defaults that depend on the mode follow LlamaGen's two scripts: the grid uses the demo's
cfg 4.0 and top-k 2000; FID sampling uses top-k 0 and the guidance scale LlamaGen reports
for the model size (GETTING_STARTED.md: B and L 2.0, XL and XXL 1.75, 3B 1.65; other sizes
1.5, sample_c2i_ddp.py's default). A DPAR model takes the scale of the GPT of its size.
"""
import argparse
import math
import os
import sys
from typing import Optional, Sequence, Tuple

import torch

from autoregressive.models import all_models, model_family
from autoregressive.models.generate import Decoding, Sampling, fast_decoding
from autoregressive.sample.compiling import (
    FastPathError,
    compile_cache_dir,
    compile_decode,
    compile_notice,
    use_compile_cache,
)
from autoregressive.sample.loading import (
    PatchingOverrides,
    cast_parameters,
    check_vq_identity,
    entropy_ckpt_path,
    entropy_model_for_dpar,
    load_generator,
    load_vq,
    precision_dtype,
    sampling_patching,
)
from autoregressive.sample.fid import Interrupted, run_fid
from autoregressive.sample.grid import run_grid
from autoregressive.sample.sampler import Sampler
from autoregressive.sample.settings import SampleRun
from entropy_model.patching import PATCH_MODES
from tokenizer.vq_model import VQ_models
from utils.cli import HelpFormatter, settings_from_flags
from utils.distributed import DistInfo, init_distributed, launched_by_torchrun, teardown_distributed

FID_CFG_SCALE = {"B": 2.0, "L": 2.0, "XL": 1.75, "XXL": 1.75, "3B": 1.65}  # LlamaGen, by model size
DEFAULT_FID_CFG_SCALE = 1.5
GRID_CFG_SCALE, GRID_TOP_K = 4.0, 2000  # LlamaGen's demo
INTERRUPTED_EXIT = 130  # 128 + SIGINT, the shell's code for a process ended by Ctrl-C


def fid_cfg_scale(model_name: str) -> float:
    """LlamaGen's FID guidance scale for a model size; DPAR-X uses GPT-X's."""
    return FID_CFG_SCALE.get(model_name.split("-", 1)[1], DEFAULT_FID_CFG_SCALE)


def _cap(value: str) -> int:
    if value.lower() == "none":
        return 0
    cap = int(value)
    if cap < 0:
        raise argparse.ArgumentTypeError("must be >= 1, or 0 / none for no cap")
    return cap


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Sample class-conditional images from a GPT (LlamaGen) or DPAR checkpoint: "
                                            "a PNG grid, or N images packed for FID (--num-fid-samples).",
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("models")
    g.add_argument("--gpt-ckpt", required=True,
                   help="GPT or DPAR checkpoint: file, FSDP directory, release folder (ours or LlamaGen's Hugging "
                        "Face format) or hub repo id")
    g.add_argument("--gpt-model", choices=sorted(all_models()), default=None,
                   help="registry name; default: the checkpoint's (required for LlamaGen's released files)")
    g.add_argument("--vq-ckpt", required=True, help="VQ tokenizer checkpoint or release folder")
    g.add_argument("--vq-model", choices=sorted(VQ_models), default="VQ-16", help="tokenizer registry name")
    g.add_argument("--codebook-size", type=int, default=None, help="default: the VQ checkpoint's (LlamaGen: 16384)")
    g.add_argument("--codebook-embed-dim", type=int, default=None, help="default: the VQ checkpoint's (LlamaGen: 8)")
    g.add_argument("--num-classes", type=int, default=1000, help="classes of a LlamaGen checkpoint without args")
    g.add_argument("--cls-token-num", type=int, default=1, help="class slots of a LlamaGen checkpoint without args")
    g.add_argument("--raw-weights", action="store_true",
                   help="sample the trained weights even when the checkpoint holds EMA weights (default: EMA when "
                        "present)")
    g = p.add_argument_group("LlamaGen compatibility flags (accepted so that LlamaGen launch lines run unchanged)")
    g.add_argument("--gpt-type", choices=("c2i", "t2i"), default="c2i",
                   help="LlamaGen compatibility flag: only c2i (class-conditional) is supported")
    g.add_argument("--from-fsdp", action="store_true",
                   help="LlamaGen compatibility flag, no effect: FSDP directories and bare state dicts are detected")
    g = p.add_argument_group("DPAR (defaults: the checkpoint's patching rule)")
    g.add_argument("--entropy-ckpt", default=None,
                   help="entropy model checkpoint or release folder (default: the one recorded by training, or "
                        "bundled with a release); its sha256 must match")
    g.add_argument("--patching-mode", choices=PATCH_MODES, default=None,
                   help="patch boundary rule (default: the checkpoint's)")
    g.add_argument("--threshold", type=float, default=None, help="entropy threshold tau in nats")
    g.add_argument("--max-patch-length", type=_cap, default=None, help="length cap P_max (0 or 'none': no cap)")
    g.add_argument("--row-reset", action=argparse.BooleanOptionalAction, default=None,
                   help="open a patch at every grid row")
    g.add_argument("--static-length", type=float, default=None,
                   help="mode static: mean patch length of the uniform pattern (fractional allowed, e.g. 1.8191)")
    g = p.add_argument_group("sampling")
    g.add_argument("--cfg-scale", type=float, default=None,
                   help=f"guidance scale (default: grid {GRID_CFG_SCALE}; FID: LlamaGen's for the model size)")
    g.add_argument("--cfg-interval", type=int, default=-1, help="guided steps (-1: all)")
    g.add_argument("--temperature", type=float, default=1.0, help="softmax temperature")
    g.add_argument("--top-k", type=int, default=None, help=f"default: grid {GRID_TOP_K}, FID 0 (off)")
    g.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1.0 = off)")
    g.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0,
                   help="global seed; image i uses a seed derived from (seed, i)")
    g.add_argument("--image-size", type=int, default=None, help="generation size; default: token grid x downsample")
    g.add_argument("--image-size-eval", type=int, default=None, help="size of the FID images (default: --image-size)")
    g.add_argument("--downsample-size", type=int, default=None, help="default: the VQ model's (VQ-16: 16)")
    g.add_argument("--per-proc-batch-size", type=int, default=32, help="images per batch and process")
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    g.add_argument("--precision", "--mixed-precision", dest="precision",
                   choices=("auto", "none", "fp32", "bf16", "fp16"), default="auto",
                   help="generator dtype (auto: bf16 on CUDA, fp32 on CPU); the VQ decoder runs in fp32")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="fast path: compiled static-shape decode steps, CUDA graphs on CUDA (default: on for "
                        "--num-fid-samples on CUDA, off for a grid and on CPU; the compile cache is "
                        "$TORCHINDUCTOR_CACHE_DIR, default ~/.cache/dpar/inductor)")
    g = p.add_argument_group("grid mode")
    g.add_argument("--class-labels", type=int, nargs="+", default=None,
                   help="classes to sample (default: LlamaGen's demo classes, or the first 8)")
    g.add_argument("--out", default=None, help="PNG grid path (default: sample_<model>.png)")
    g.add_argument("--nrow", type=int, default=4, help="images per grid row")
    g = p.add_argument_group("FID mode")
    g.add_argument("--num-fid-samples", type=int, default=None, help="images to sample (50000 for ImageNet)")
    g.add_argument("--sample-dir", default=None, help="folder of PNGs; DIR.npz and DIR.json are written beside it "
                                                      "(default: samples/<LlamaGen-style run name>)")
    return p


POSITIVE_INT_FLAGS = ("per_proc_batch_size", "nrow", "num_fid_samples", "image_size", "image_size_eval",
                      "downsample_size", "codebook_size", "codebook_embed_dim", "num_classes", "cls_token_num")
FINITE_FLOATS = ("cfg_scale", "temperature", "top_p", "threshold", "static_length")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def out_of_range(args: argparse.Namespace) -> Optional[str]:
    """The first flag whose value lies outside its domain, as one line; None when all fit.
    Guidance and filtering follow LlamaGen: --cfg-scale 1 is no guidance and a scale below 1
    would sample unguided as well (generate guides only when scale > 1), so it is refused
    rather than run as 1; --top-k 0 is off; --cfg-interval -1 guides every step, k >= 0 the
    first k + 1 decoding steps. The interval's upper end depends on the model (build_sampler)."""
    for name in FINITE_FLOATS:
        value = getattr(args, name)
        if value is not None and not math.isfinite(value):
            return f"{_flag(name)} must be a finite number, got {value}"
    for name in POSITIVE_INT_FLAGS:
        value = getattr(args, name)
        if value is not None and value < 1:
            return f"{_flag(name)} must be >= 1, got {value}"
    if args.seed < 0:
        return f"--seed must be >= 0, got {args.seed}"
    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        return "--temperature must be > 0 and --top-p in (0, 1]"
    if args.cfg_scale is not None and args.cfg_scale < 1:
        return (f"--cfg-scale must be >= 1 (1: no guidance; below 1 LlamaGen's sampler does not guide at all), "
                f"got {args.cfg_scale}")
    if args.top_k is not None and args.top_k < 0:
        return f"--top-k must be >= 0 (0: off), got {args.top_k}"
    if args.cfg_interval < -1:
        return f"--cfg-interval must be -1 (guide every step) or a decoding step >= 0, got {args.cfg_interval}"
    return None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.gpt_type == "t2i":
        p.error("--gpt-type t2i: text-to-image is not supported (class-conditional c2i only)")
    problem = out_of_range(args)
    if problem:
        p.error(problem)
    fid = args.num_fid_samples is not None
    if fid and (args.class_labels is not None or args.out is not None):
        p.error("--class-labels and --out belong to grid mode, not --num-fid-samples")
    if not fid and args.sample_dir is not None:
        p.error("--sample-dir needs --num-fid-samples")
    if not fid and launched_by_torchrun() and int(os.environ["WORLD_SIZE"]) > 1:
        p.error("grid mode runs in one process; use --num-fid-samples under torchrun")
    return args


def build_sampler(args: argparse.Namespace, device: torch.device) -> Tuple[Sampler, SampleRun]:
    """Load every model, check that they fit together and resolve the run's settings (the
    mode's defaults, the checkpoint's model and image size) and whether the decode steps are
    compiled (compiling.compile_decode); `args` is left as parsed."""
    vq = load_vq(args.vq_ckpt, args.vq_model, args.codebook_size, args.codebook_embed_dim)
    f = vq.downsample_factor
    if args.downsample_size is not None and args.downsample_size != f:
        raise ValueError(f"--downsample-size {args.downsample_size} does not match {args.vq_model} (downsample {f})")
    block_size = (args.image_size // f) ** 2 if args.image_size else None
    model, ckpt_args = load_generator(args.gpt_ckpt, args.gpt_model, vq.config.codebook_size, block_size,
                                      args.num_classes, args.cls_token_num, prefer_ema=not args.raw_weights)
    name = ckpt_args.get("gpt_model", args.gpt_model)
    if getattr(model.config, "model_type", "c2i") != "c2i":
        raise ValueError(f"--gpt-ckpt {args.gpt_ckpt} holds an unconditional {name} (an entropy model, trained with "
                         f"--unconditional), not a class-conditional generator")
    check_vq_identity(args.vq_ckpt, ckpt_args)
    if model.config.vocab_size != vq.config.codebook_size:
        raise ValueError(f"{name} predicts {model.config.vocab_size} codes but the VQ codebook has "
                         f"{vq.config.codebook_size}")
    image_size = model.config.grid_size * f
    if args.image_size is not None and args.image_size != image_size:
        raise ValueError(f"{name} generates a {model.config.grid_size}x{model.config.grid_size} token grid, "
                         f"{image_size} px with {args.vq_model}; --image-size {args.image_size} does not match")

    fid = args.num_fid_samples is not None
    cfg_scale = args.cfg_scale if args.cfg_scale is not None else fid_cfg_scale(name) if fid else GRID_CFG_SCALE
    top_k = args.top_k if args.top_k is not None else 0 if fid else GRID_TOP_K
    check_guidance_interval(args.cfg_interval, cfg_scale, model.config.block_size)
    entropy_model, entropy_ckpt, patching = None, None, None
    overrides = PatchingOverrides(args.patching_mode, args.threshold, args.max_patch_length, args.row_reset,
                                  args.static_length)
    if model_family(model).patched:
        patching = sampling_patching(ckpt_args, overrides)
        if patching.needs_entropy:
            entropy_ckpt = entropy_ckpt_path(args.entropy_ckpt, ckpt_args)
            entropy_model = entropy_model_for_dpar(entropy_ckpt, model, ckpt_args)
    elif args.entropy_ckpt is not None or any(v is not None for v in vars(overrides).values()):
        raise ValueError(f"--entropy-ckpt and the patching flags apply to DPAR models, not {name}")

    dtype = precision_dtype(args.precision, device)
    model = cast_parameters(model.to(device), dtype)
    if entropy_model is not None:
        entropy_model = cast_parameters(entropy_model.to(device), dtype)
    precision = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
    run = settings_from_flags(  # the flags as given, the checkpoint's model and weights, the mode's defaults
        SampleRun, vars(args), gpt_model=name, weights=ckpt_args["weights"], image_size=image_size,
        image_size_eval=args.image_size_eval or image_size, cfg_scale=cfg_scale, top_k=top_k, precision=precision,
        patching=patching.to_dict() if patching else None, entropy_ckpt=entropy_ckpt)
    sampling = Sampling(run.cfg_scale, run.cfg_interval, run.temperature, run.top_k, run.top_p)
    fast = compile_decode(args.compile, device, fid)
    sampler = Sampler(model, vq.to(device), sampling, device, entropy_model, patching,
                      fast_decoding(device) if fast else Decoding())
    return sampler, run


def check_guidance_interval(cfg_interval: int, cfg_scale: float, num_tokens: int) -> None:
    """ValueError (one line) for a --cfg-interval that would run as something else: one given
    without guidance (scale <= 1 guides nothing), or one past the last decoding step (steps
    0..num_tokens - 2; beyond it every step is guided, which is -1)."""
    if cfg_interval == -1:
        return
    if cfg_scale <= 1.0:
        raise ValueError(f"--cfg-interval {cfg_interval} has no effect without guidance (--cfg-scale {cfg_scale}; "
                         f"guidance needs a scale > 1)")
    if cfg_interval > num_tokens - 2:
        raise ValueError(f"--cfg-interval {cfg_interval} is past the last decoding step ({num_tokens - 2} for "
                         f"{num_tokens} tokens); use -1 to guide every step")


def describe(run: SampleRun) -> str:
    weights = "EMA weights" if run.weights == "ema" else "raw weights"
    line = (f"{run.gpt_model} ({run.precision}, {weights}): {run.image_size} px, cfg {run.cfg_scale} "
            f"(interval {run.cfg_interval}), temperature {run.temperature}, top-k {run.top_k}, "
            f"top-p {run.top_p}, seed {run.seed}")
    if run.patching:
        line += f", patching {run.patching}"
    return line


def configure_torch() -> None:
    """Global settings for sampling (LlamaGen's): TF32 matmuls and convolutions."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


@torch.no_grad()
def run(args: argparse.Namespace, info: DistInfo) -> None:
    sampler, settings = build_sampler(args, info.device)
    if info.is_main:
        print(describe(settings))
        print(compile_notice(sampler.decoding.compile, args.compile, compile_cache_dir()), flush=True)
    if settings.num_fid_samples is None:
        run_grid(settings, sampler)
    else:
        run_fid(settings, sampler, info)


def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    configure_torch()
    use_compile_cache()
    info = None
    try:
        info = init_distributed(args.device)
        run(args, info)
    except (ValueError, FastPathError) as e:
        rank = f"[rank {info.rank}] " if info is not None and info.distributed else ""
        print(f"error: {rank}{e}", file=sys.stderr)
        raise SystemExit(1)
    except (Interrupted, KeyboardInterrupt) as e:
        if info is None or info.is_main:
            print(str(e) if isinstance(e, Interrupted) else "interrupted", file=sys.stderr)
        raise SystemExit(INTERRUPTED_EXIT)
    finally:
        teardown_distributed()
