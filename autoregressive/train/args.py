"""Command line of train_c2i.py: LlamaGen's flag names where they exist, plus the ones a
resumable multi-node trainer needs. Values left at None ("auto") are resolved from the code
store, the device or the model in the trainer and recorded in the run's args.json."""
import argparse
from typing import Optional, Sequence

from autoregressive.models import all_models, model_family
from entropy_model.patching import PAPER_SETTINGS, PATCH_MODES
from utils.cli import HelpFormatter

PAPER_TAUS = ", ".join(f"{s.threshold} at {size} px" for size, s in PAPER_SETTINGS.items())
PAPER_CAPS = ", ".join(f"{s.max_patch_length} at {size} px" for size, s in PAPER_SETTINGS.items())


def _data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--code-path", required=True,
                   help="code store directory (extract_codes.py output or LlamaGen's layout)")
    g.add_argument("--vocab-size", type=int, default=None,
                   help="codebook size; default: the store's manifest (16384 for LlamaGen's layout); a mismatch stops")
    g.add_argument("--image-size", type=int, default=None,
                   help="image size the codes were made at (default: the store's); with --downsample-size it "
                        "fixes the token grid")
    g.add_argument("--downsample-size", type=int, default=None,
                   help="tokenizer downsampling factor; default: the store's manifest (16 for LlamaGen's layout); "
                        "a mismatch stops")
    g.add_argument("--num-classes", type=int, default=None,
                   help="number of classes; default: the store's manifest, else max label + 1 (1000 for "
                        "LlamaGen's layout)")
    g.add_argument("--num-workers", type=int, default=None,
                   help="DataLoader worker processes per rank (0 = in process); default: the CPU cores this process "
                        "may use, at most 4")


def _model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--gpt-model", choices=list(all_models()), default="GPT-B", help="registry name (GPT-* or DPAR-*)")
    g.add_argument("--unconditional", action="store_true",
                   help="train an unconditional GPT (model_type='uncond'): the entropy model")
    g.add_argument("--cls-token-num", type=int, default=1, help="class-embedding slots (GPT)")
    g.add_argument("--dropout-p", type=float, default=0.1, help="residual and FFN dropout (LlamaGen's dropout_p)")
    g.add_argument("--token-dropout-p", type=float, default=0.1, help="dropout on token embeddings")
    g.add_argument("--drop-path-rate", type=float, default=0.0, help="stochastic depth, linear over the layers")
    g.add_argument("--class-dropout-prob", type=float, default=0.1,
                   help="probability of replacing a label by the null class (classifier-free guidance)")


def _dpar_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("DPAR (--gpt-model DPAR-*)")
    g.add_argument("--entropy-path", default=None,
                   help="directory holding entropy.npy + entropy.json; default: the code store")
    g.add_argument("--entropy-model", default=None,
                   help="entropy model checkpoint; when given, the entropies must have been made by it (hash check)")
    g.add_argument("--verify-store", action="store_true",
                   help="re-hash codes.npy and entropy.npy against their recorded hashes instead of checking "
                        "size and mtime")
    g.add_argument("--patching-mode", choices=PATCH_MODES, default="entropy", help="patch boundary rule")
    g.add_argument("--threshold", type=float, default=None,
                   help="entropy threshold tau in nats; a gated --patching-mode needs it or --target-compression "
                        f"(the paper's taus, {PAPER_TAUS}, belong to the authors' entropy model, which was not "
                        "released: they are no default for entropies of another)")
    g.add_argument("--target-compression", type=float, default=None,
                   help="choose tau so that the mean patch length on the stored entropies is this (e.g. 1.81)")
    g.add_argument("--max-patch-length", type=int, default=None,
                   help=f"length cap P_max (0 = no cap); default the paper's for the image size, {PAPER_CAPS}; "
                        "other sizes need it (unless --patching-mode token or --static-length)")
    g.add_argument("--no-row-reset", action="store_true", help="let patches run across grid rows")
    g.add_argument("--encoder-layers", type=int, default=None,
                   help="token encoder depth E (default: the registry's); the patch depth keeps the total")
    g.add_argument("--decoder-layers", type=int, default=None,
                   help="token decoder depth D (default: the registry's); the patch depth keeps the total")
    g.add_argument("--patch-rope", choices=("dynamic", "2d", "1d"), default="dynamic",
                   help="positions of the patch transformer")
    g.add_argument("--static-length", type=float, default=None,
                   help="with --patching-mode static: mean patch length of the uniform pattern, fractional allowed "
                        "(the authors' static baseline: 1.8191); default: fixed patches of --max-patch-length")
    g.add_argument("--local-dropout", action="store_true",
                   help="LlamaGen's dropouts also in the token encoder and decoder, and token dropout on the encoder "
                        "input (ablation; the authors use none there)")
    g.add_argument("--patch-init", choices=("llamagen", "blt"), default="llamagen",
                   help="init of the cross-attention and patch-injection projections: normal(0.02) like every "
                        "layer (the authors' effective init) or BLT's truncated normal of std dim^-0.5")


def _optim_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=300, help="epochs to train (unless --max-steps)")
    g.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many optimizer steps (overrides --epochs)")
    g.add_argument("--global-batch-size", type=int, default=256, help="images per optimizer step over all ranks")
    g.add_argument("--grad-accum-steps", "--gradient-accumulation-steps", dest="grad_accum_steps", type=int, default=1,
                   help="micro-batches per optimizer step; per-rank batch = global / (world size * this)")
    g.add_argument("--lr", type=float, default=1e-4, help="peak learning rate")
    g.add_argument("--lr-schedule", choices=("constant", "cosine"), default="constant",
                   help="after warmup: constant (LlamaGen) or cosine decay to --min-lr at the last step")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup from 0")
    g.add_argument("--min-lr", type=float, default=0.0, help="final learning rate of the cosine schedule")
    g.add_argument("--weight-decay", type=float, default=5e-2,
                   help="AdamW weight decay on matrices (not norms or biases)")
    g.add_argument("--beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--beta2", type=float, default=0.95, help="AdamW beta2")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping (0 = off)")
    g.add_argument("--z-loss", type=float, default=0.0,
                   help="weight of PaLM's z-loss, logsumexp(logits)^2 per token, added to the cross-entropy (0 = off)")
    g.add_argument("--seed", "--global-seed", dest="seed", type=int, default=0,
                   help="seed of weights, data order, views, dropout")
    g.add_argument("--skip-nonfinite", type=int, default=0,
                   help="skip up to N optimizer steps with a non-finite loss or gradient (costs one host sync per "
                        "step); default 0: the first non-finite step stops the run")


def _system_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("system")
    g.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto: CUDA when available")
    g.add_argument("--data-parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="DDP (replicated) or FSDP2 (fully_shard per transformer block, then the root)")
    g.add_argument("--mixed-precision", choices=("auto", "none", "bf16", "fp16"), default="auto",
                   help="auto: bf16 on CUDA, none on CPU; FSDP + bf16 keeps fp32 master weights and fp32 reduce")
    g.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the training forward/backward (default: on with CUDA, off on CPU)")
    g.add_argument("--compile-scope", choices=("model", "blocks"), default="model",
                   help="with --compile: the whole model as one graph (packed patch counts are bucketed, so a "
                        "run compiles a few graphs), or each transformer block separately")
    g.add_argument("--activation-checkpointing", action="store_true",
                   help="recompute each transformer block in backward")


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("run folder, checkpoints, logging")
    g.add_argument("--results-dir", default=None, help="parent of the run folder (default: results)")
    g.add_argument("--run-name", default=None,
                   help="run folder name (default: <gpt-model>[-uncond]-<code store name>); a folder that already "
                        "holds checkpoints is resumed from its latest one when this run's settings are that run's "
                        "(else refused: see --continue-with-new-settings); one trainer per folder at a time")
    g.add_argument("--continue-with-new-settings", action="store_true",
                   help="resume a run whose settings (optimisation, seed, data, entropies, patching rule, "
                        "dropouts) differ from this command's (its architecture cannot): the changes and the step "
                        "they apply from are recorded in args.json (setting_changes) and the log")
    g.add_argument("--resume", default=None,
                   help="checkpoint (file or FSDP directory, ours or LlamaGen's) to continue from when the run "
                        "folder has none of its own (LlamaGen's name: --gpt-ckpt)")
    g.add_argument("--ckpt-every", type=int, default=5000, help="checkpoint every N optimizer steps (and at the end)")
    g.add_argument("--keep-last", type=int, default=3, help="checkpoints kept (older ones are deleted)")
    g.add_argument("--keep-every", type=int, default=0, help="also keep every checkpoint whose step is a multiple of N")
    g.add_argument("--init-weights", default=None,
                   help="start a NEW run (step 0, fresh optimizer) from the weights of this checkpoint (file or FSDP "
                        "directory, ours or LlamaGen's): fine-tuning; to continue a run use --resume / --gpt-ckpt")
    g.add_argument("--ema", action="store_true",
                   help="keep an exponential moving average of the weights (LlamaGen's --ema); stored in every "
                        "checkpoint and used by sample_c2i.py")
    g.add_argument("--ema-decay", type=float, default=0.9999, help="EMA decay per optimizer step (LlamaGen's)")
    g.add_argument("--export-consolidated", action="store_true",
                   help="FSDP: also write a single-file weights export (exports/<step>.pt) with every checkpoint")
    g.add_argument("--log-every", type=int, default=100, help="log line every N optimizer steps")
    g.add_argument("--peak-tflops", type=float, default=989.0,
                   help="per-GPU peak TFLOP/s for the MFU estimate (H100/H200 dense bf16: 989)")
    g.add_argument("--speed-warmup-steps", type=int, default=10,
                   help="steps (from this run's start) left out of images/s and MFU: compilation and warm-up")
    g.add_argument("--wandb", action="store_true",
                   help="also log to Weights & Biases (offline unless WANDB_MODE is set)")
    g.add_argument("--wandb-project", default="dpar", help="wandb project name")


def _llamagen_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("LlamaGen compatibility flags (accepted so that LlamaGen launch lines run unchanged)")
    g.add_argument("--gpt-ckpt", default=None,
                   help="LlamaGen compatibility flag: continue from this checkpoint (same as --resume); also reads "
                        "LlamaGen's own files (model, optimizer, steps, ema, args)")
    g.add_argument("--gpt-type", choices=("c2i", "t2i"), default="c2i",
                   help="LlamaGen compatibility flag: only c2i (class-conditional) is supported")
    g.add_argument("--dataset", choices=("imagenet_code",), default="imagenet_code",
                   help="LlamaGen compatibility flag: the data is always a code store (--code-path)")
    g.add_argument("--cloud-save-path", default=None,
                   help="LlamaGen compatibility flag: the results folder (same as --results-dir)")
    g.add_argument("--no-local-save", action="store_true",
                   help="LlamaGen compatibility flag, no effect: checkpoints are written once, in the run folder")


EPILOG = """examples:
  python train_c2i.py --code-path codes/toy --gpt-model GPT-XS --global-batch-size 32 --max-steps 2000
  python train_c2i.py --code-path codes/toy --gpt-model GPT-S --unconditional          # entropy model
  torchrun --nproc_per_node 8 train_c2i.py --code-path codes/in256 --gpt-model DPAR-L --target-compression 1.81
  torchrun --nproc_per_node 8 train_c2i.py ... --data-parallel fsdp --activation-checkpointing

The run folder is RESULTS-DIR/RUN-NAME (args.json, log.jsonl, log.txt, checkpoints/, run.lock). Rerunning
a command whose run folder holds checkpoints continues from the latest one (also after Ctrl-C,
SIGTERM, a crash, or a torchrun --max-restarts restart); a command with other settings is refused
(another --run-name starts a new run), and so is a second trainer on a folder in use."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a class-conditional GPT (LlamaGen), an unconditional entropy model or DPAR on a\n"
                    "code store. Runs single-process (python train_c2i.py ...) or under torchrun (DDP/FSDP2).",
        formatter_class=HelpFormatter, epilog=EPILOG,
    )
    for add in (_data_args, _model_args, _dpar_args, _optim_args, _system_args, _run_args, _llamagen_args):
        add(p)
    return p


def _resolve_llamagen_flags(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Map LlamaGen's flags onto ours: --gpt-ckpt -> --resume, --cloud-save-path -> --results-dir.
    Part of parsing, and the only place that writes to args: everything resolved later goes into
    the frozen TrainRun (autoregressive.train.settings)."""
    if args.gpt_type == "t2i":
        p.error("--gpt-type t2i: text-to-image is not supported (class-conditional c2i only)")
    if args.gpt_ckpt is not None:
        if args.resume is not None and args.resume != args.gpt_ckpt:
            p.error("--gpt-ckpt and --resume both name a checkpoint to continue from; give one")
        args.resume = args.gpt_ckpt
    if args.cloud_save_path is not None:
        if args.results_dir is not None and args.results_dir != args.cloud_save_path:
            p.error("--cloud-save-path and --results-dir both name the results folder; give one")
        args.results_dir = args.cloud_save_path
    args.results_dir = args.results_dir or "results"
    if args.init_weights is not None and args.resume is not None:
        p.error("--init-weights starts a new run from weights; --resume / --gpt-ckpt continue one: give one")


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parse and check the flags that need no data (one-line errors via argparse)."""
    p = build_parser()
    args = p.parse_args(argv)
    positive = ("global_batch_size", "grad_accum_steps", "ckpt_every", "log_every", "keep_last", "epochs",
                "downsample_size")
    for name in positive:
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.num_workers is not None and args.num_workers < 0:
        p.error("--num-workers must be >= 0")
    if args.max_patch_length is not None and args.max_patch_length < 0:
        p.error("--max-patch-length must be >= 0 (0 = no cap)")
    _resolve_llamagen_flags(p, args)
    if not 0.0 <= args.ema_decay < 1.0:
        p.error("--ema-decay must be in [0, 1)")
    if args.max_steps is not None and args.max_steps < 1:
        p.error("--max-steps must be >= 1")
    if args.threshold is not None and args.target_compression is not None:
        p.error("give --threshold or --target-compression, not both")
    patched = model_family(args.gpt_model).patched
    if patched and args.unconditional:
        p.error("--unconditional trains a GPT entropy model; DPAR is class-conditional")
    dpar_only = ("entropy_path", "entropy_model", "threshold", "target_compression", "max_patch_length",
                 "encoder_layers", "decoder_layers", "static_length")
    given = [n for n in dpar_only if getattr(args, n) is not None]
    given += ["local_dropout"] if args.local_dropout else []
    given += ["patch_init"] if args.patch_init != "llamagen" else []
    if not patched and given:
        p.error(f"--{given[0].replace('_', '-')} applies to DPAR models only")
    if args.static_length is not None and args.patching_mode != "static":
        p.error("--static-length needs --patching-mode static")
    if args.static_length is not None and not args.static_length >= 1:
        p.error("--static-length must be >= 1")
    return args
