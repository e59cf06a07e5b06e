"""Model side of training: build from the registry, wrap for the device (activation
checkpointing, torch.compile, DDP or FSDP2), the AdamW optimizer and the learning rate.

Wrapping acts on every TransformerBlock instance, so the GPT's `layers` and DPAR's
`encoder_layers` / `patch_layers` / `decoder_layers` are all covered without naming them.
torch.compile covers the whole model by default (--compile-scope model): DPAR's pooling,
cross-attention, gathers, injections, RoPE tables and the loss fuse with the blocks instead of
running eagerly between them.
"""
import argparse
import contextlib
import dataclasses
import math
from typing import Callable, Optional

import torch
import torch._functorch.config
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from autoregressive.models import build_config, build_model, model_family
from autoregressive.models.modules import TransformerBlock
from utils.distributed import DistInfo


def model_kwargs(args: argparse.Namespace) -> dict:
    """Constructor kwargs for the registry entry (LlamaGen's names; DPAR adds its depths)."""
    kwargs = dict(
        vocab_size=args.vocab_size, block_size=args.block_size, num_classes=args.num_classes,
        cls_token_num=args.cls_token_num, class_dropout_prob=args.class_dropout_prob,
        resid_dropout_p=args.dropout_p, ffn_dropout_p=args.dropout_p, token_dropout_p=args.token_dropout_p,
        drop_path_rate=args.drop_path_rate,
    )
    if not model_family(args.gpt_model).patched:
        return {**kwargs, "model_type": "uncond" if args.unconditional else "c2i"}
    kwargs.update(patch_rope=args.patch_rope, local_dropout=args.local_dropout, patch_init=args.patch_init)
    if args.encoder_layers is None and args.decoder_layers is None:
        return kwargs
    base = build_config(args.gpt_model, **kwargs)
    enc = args.encoder_layers or base.n_encoder_layer
    dec = args.decoder_layers or base.n_decoder_layer
    patch = base.n_layer - enc - dec
    if patch < 1:
        raise ValueError(f"{args.gpt_model} has {base.n_layer} layers: E{enc} + D{dec} leave no patch layer")
    return {**kwargs, "n_encoder_layer": enc, "n_patch_layer": patch, "n_decoder_layer": dec}


def model_config(args: argparse.Namespace) -> dict:
    """The registry config of the model create_model builds, as a plain dict (no model is built)."""
    return dataclasses.asdict(build_config(args.gpt_model, **model_kwargs(args)))


def create_model(args: argparse.Namespace) -> nn.Module:
    """The registry model in float32 on CPU, initialised from --seed (identical on every rank).
    args: anything with the flags and the store's resolved sizes (a TrainRun in training)."""
    torch.manual_seed(args.seed)
    return build_model(args.gpt_model, **model_kwargs(args))


def transformer_blocks(model: nn.Module) -> list:
    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def _replace_blocks(model: nn.Module, wrap: Callable[[nn.Module], nn.Module]) -> list:
    """Replace every TransformerBlock by wrap(block) in its parent; returns the new modules."""
    out = []
    for name, module in list(model.named_modules()):
        if isinstance(module, TransformerBlock):
            parent_name, _, child = name.rpartition(".")
            new = wrap(module)
            setattr(model.get_submodule(parent_name), child, new)
            out.append(new)
    return out


def compile_model(model: nn.Module, scope: str, backend: str = "inductor", blocks: Optional[list] = None) -> None:
    """torch.compile in place (state_dict keys unchanged). scope "model": the whole forward
    (and its backward) as one graph; the forward takes a prepared PatchLayout, whose sizes the
    trainer marks dynamic (TrainBatch.to), so the first batch compiles the shape-generic graph.
    "blocks": each transformer block (`blocks`, default every TransformerBlock) separately, the
    work between them eager.

    Custom autograd.Functions (the chunked loss) are allowed in the AOTAutograd cache: traced into
    the graph, their code is in its key; a second process then loads the compiled step."""
    torch._functorch.config.autograd_cache_allow_custom_autograd_functions = True
    if scope == "model":
        model.compile(backend=backend)
    elif scope == "blocks":
        for block in transformer_blocks(model) if blocks is None else blocks:
            block.compile(backend=backend)
    else:
        raise ValueError(f"compile scope must be 'model' or 'blocks', got {scope!r}")


def parallelize(model: nn.Module, args: argparse.Namespace, info: DistInfo) -> nn.Module:
    """Activation checkpointing, compile of the blocks (--compile-scope blocks), DDP or FSDP2
    (fully_shard per block, then the root), compile of the whole model (--compile-scope model,
    on the DDP wrapper so Dynamo splits the graph at DDP's buckets). Returns the module to
    call; `model` itself stays the unwrapped module whose state_dict keys are the registry's
    (checkpoint wrappers strip their prefix; compile acts in place)."""
    blocks = transformer_blocks(model)
    if args.activation_checkpointing:
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

        blocks = _replace_blocks(model, checkpoint_wrapper)
    whole = args.compile and args.compile_scope == "model"
    if args.compile and not whole:
        compile_model(model, "blocks", blocks=blocks)
    if not info.distributed:
        if whole:
            compile_model(model, "model")
        return model
    if args.data_parallel == "ddp":
        module = DDP(model, device_ids=[info.local_rank] if info.device.type == "cuda" else None)
        if whole:
            compile_model(module, "model")
        return module
    from torch.distributed.device_mesh import init_device_mesh

    fully_shard, policy_cls = _fsdp2()
    mesh = init_device_mesh(info.device.type, (info.world_size,))
    policy = policy_cls(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.mixed_precision == "bf16" \
        else policy_cls()
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    if whole:
        compile_model(model, "model")
    return model


def _fsdp2():
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard
    return fully_shard, MixedPrecisionPolicy


def uses_fsdp(args: argparse.Namespace, info: DistInfo) -> bool:
    return args.data_parallel == "fsdp" and info.distributed


def autocast_context(args: argparse.Namespace, info: DistInfo):
    """bf16/fp16 autocast, except under FSDP2 whose policy already computes in bf16."""
    if args.mixed_precision == "none" or uses_fsdp(args, info):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if args.mixed_precision == "bf16" else torch.float16
    return torch.autocast(info.device.type, dtype=dtype)


def gradient_sync(module: nn.Module, sync: bool):
    """Context that skips the gradient all-reduce on accumulation micro-batches (DDP no_sync,
    FSDP2 set_requires_gradient_sync); a no-op single-process."""
    if isinstance(module, DDP) and not sync:
        return module.no_sync()
    if hasattr(module, "set_requires_gradient_sync"):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def create_optimizer(model: nn.Module, args: argparse.Namespace, info: DistInfo) -> torch.optim.AdamW:
    """AdamW (LlamaGen's betas 0.9/0.95) with weight decay on matrices only (dim >= 2:
    linear and embedding weights), none on norms and biases; fused on CUDA."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = info.device.type == "cuda"
    return torch.optim.AdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), fused=fused)


def learning_rate(step: int, args: argparse.Namespace, total_steps: int) -> float:
    """lr for optimizer step `step` (0-based): linear warmup over --warmup-steps, then constant
    or cosine decay to --min-lr at total_steps."""
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    if args.lr_schedule == "constant":
        return args.lr
    progress = min(1.0, (step - args.warmup_steps) / max(1, total_steps - args.warmup_steps))
    return args.min_lr + 0.5 * (args.lr - args.min_lr) * (1 + math.cos(math.pi * progress))


def flop_params(model: nn.Module) -> tuple:
    """(token-level, patch-level) parameter counts of the matmuls, for 6 * N * D FLOP estimates:
    embedding tables are lookups and excluded; DPAR's patch_layers run once per patch."""
    patch = sum(p.numel() for p in model.patch_layers.parameters()) if hasattr(model, "patch_layers") else 0
    embeddings = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    total = sum(p.numel() for p in model.parameters())
    return total - embeddings - patch, patch
