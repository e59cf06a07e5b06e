"""The fast path as sample_c2i.py runs it: a compile cache that outlives the process, whether to
compile at all (compile cost against the time it saves, when --compile / --no-compile is not
given), one line that says what is compiled before it starts, and one line naming --no-compile
when compiling or CUDA-graph capture fails.

Cost model (seconds), fitted to benchmarks.compiler_check on the CPU (inductor, torch 2.14):
    compile = PROCESS_S + sum over step functions of GRAPHS_PER_FUNCTION x (GRAPH_S + LAYER_S x layers)
and a second process that finds the step functions in the compile cache pays WARM_SHARE of it.
The saving per generation is tokens x layers run per token step x the saving per layer-step:
measured on the CPU; on CUDA taken from the eager GPT-L decode of the README (20 ms per step,
24 layers, H200) against the 5 ms/step the CUDA graphs aim at. Compiling on CUDA (Triton kernels,
then one CUDA-graph capture per shape) has not been timed yet, so the CPU's compile cost stands in.
"""
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch

from autoregressive.models import model_family

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"
COMPILED_MARKERS = "dpar-compiled"  # folder of the compile cache: one empty file per compiled set of step functions

PROCESS_S = 14.0  # the compiler's start-up, once per process
GRAPH_S = 8.0  # per compiled graph
LAYER_S = 3.0  # per transformer layer in a graph
GRAPHS_PER_FUNCTION = 2  # a first graph, then one with the sizes dynamic
WARM_SHARE = 0.45  # second process / first process, same cache
SAVED_S_PER_LAYER_STEP = {"cpu": 0.0, "cuda": (20e-3 - 5e-3) / 24}


def compile_cache_dir() -> Path:
    """$TORCHINDUCTOR_CACHE_DIR when set, else ~/.cache/dpar/inductor ($XDG_CACHE_HOME respected):
    unlike torch's default under /tmp it survives reboots and node-local /tmp clean-ups."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "dpar" / "inductor"


def use_compile_cache() -> Path:
    """Point inductor's caches (FX graphs, AOTAutograd, Triton kernels; on by default in torch
    >= 2.11) at compile_cache_dir(). Call before the first compile."""
    path = compile_cache_dir()
    os.environ[CACHE_ENV] = str(path)
    return path


@dataclass(frozen=True)
class StepFunction:
    name: str
    layers: int  # transformer layers in its graph
    share: float = 1.0  # share of token steps that run it


def step_functions(model, entropy_model=None) -> List[StepFunction]:
    """The functions the fast path compiles for `model` (a GPT, or a DPAR with its entropy model
    when the patching rule reads entropies)."""
    cfg = model.config
    if not model_family(model).patched:
        return [StepFunction("GPT step", cfg.n_layer)]
    steps = [StepFunction("encoder step", cfg.n_encoder_layer),
             StepFunction("patch step", cfg.n_patch_layer, share=0.5),  # about 2 tokens per patch
             StepFunction("decoder step", cfg.n_decoder_layer)]
    if entropy_model is not None:
        steps.insert(0, StepFunction("entropy step", entropy_model.config.n_layer))
    return steps


def compile_seconds(functions: List[StepFunction], cached: bool) -> float:
    cold = PROCESS_S + sum(GRAPHS_PER_FUNCTION * (GRAPH_S + LAYER_S * f.layers) for f in functions)
    return cold * WARM_SHARE if cached else cold


def saved_seconds(functions: List[StepFunction], tokens: int, device: torch.device) -> float:
    """Seconds the compiled steps save over eager ones in one generation of `tokens` tokens."""
    layer_steps = tokens * sum(f.layers * f.share for f in functions)
    return layer_steps * SAVED_S_PER_LAYER_STEP.get(device.type, 0.0)


@dataclass(frozen=True)
class CompilePlan:
    """What the decode steps will do, and why."""

    fast: bool
    functions: List[StepFunction]
    compile_s: float
    cached: bool
    explicit: bool
    generations: int
    saved_s: float
    key: str  # names these step functions in the compile cache (compiled_key)

    def notice(self, cache: Path) -> str:
        """The line printed before the first generation."""
        n = len(self.functions)
        if self.fast:
            where = f"compile cache {cache}" + (" holds them" if self.cached else "; later runs load them from it")
            return (f"compiling decode steps ({n} step function{'s' * (n > 1)}), one-time, ~{self.compile_s:.0f} s "
                    f"({where}; --no-compile skips it)")
        if self.explicit:
            return "decoding eagerly (--no-compile)"
        return (f"decoding eagerly: compiling {n} step function{'s' * (n > 1)} (~{self.compile_s:.0f} s) would save "
                f"~{self.saved_s * self.generations:.0f} s over {self.generations} generation"
                f"{'s' * (self.generations > 1)} (--compile forces it)")


def marker(key: str) -> Path:
    return compile_cache_dir() / COMPILED_MARKERS / key


def compiled_key(name: str, precision: str, rows: int, device: torch.device) -> str:
    """Names a set of step functions in the compile cache: model, dtype, batch rows, device and torch."""
    return f"{name}-{precision}-rows{rows}-{device.type}-torch{torch.__version__}".replace("/", "_")


def plan_compile(requested: Optional[bool], device: torch.device, functions: List[StepFunction], tokens: int,
                 generations: int, key: str) -> CompilePlan:
    """--compile / --no-compile when given; else the fast path when its compile (less when the
    cache holds these step functions) costs less than it saves over the run's generations."""
    cached = marker(key).exists()
    cost = compile_seconds(functions, cached)
    saved = saved_seconds(functions, tokens, device)
    fast = requested if requested is not None else cost < saved * generations
    return CompilePlan(bool(fast), functions, cost, cached, requested is not None, generations, saved, key)


def mark_compiled(key: str) -> None:
    """Record that the compile cache now holds these step functions (after a generation ran)."""
    path = marker(key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()


class FastPathError(RuntimeError):
    """Compiling or capturing the decode steps failed; the message is one line."""


FAST_PATH_FAILURES = (torch._dynamo.exc.TorchDynamoException, RuntimeError)


def first_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"


def fast_path_failure(error: BaseException) -> FastPathError:
    """One line naming the failure (a failed backend: also what it raised) and --no-compile;
    the original stays chained as the cause."""
    detail = first_line(error)
    inner = getattr(error, "inner_exception", None)
    if inner is not None:
        detail = f"{type(error).__name__}, {first_line(inner)}"
    return FastPathError(f"the compiled decode path failed ({detail}); rerun with --no-compile to decode eagerly")
