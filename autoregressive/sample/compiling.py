"""The fast path as sample_c2i.py runs it: a compile cache that outlives the process, whether to
compile at all (compile cost against the time it saves, when --compile / --no-compile is not
given), one line that says what is compiled before it starts, and one line naming --no-compile
when compiling or CUDA-graph capture fails.

Cost model (seconds), fitted to inductor compiles of the decode steps on a 2-core CPU (torch
2.14; benchmarks/compiler_check.py measures them):
    compile = PROCESS_S + sum over step functions of GRAPHS_PER_FUNCTION x
              (GRAPH_S + EXTRA_LAYER_S x (layers - 1))
The compiler's start-up costs 14 s once; a one-layer step function 12 s; each further layer 6 s,
less than the first because identical layers generate identical kernels, which are compiled once
(fit: a one-layer GPT step 10-12 s, GPT-T's 2 x 2-layer graphs 41 s, DPAR-T's 9 graphs 114 s, each
after the start-up, and DPAR-L's first CPU generation, 233 s). A second process whose compile
cache holds the step functions pays WARM_SHARE of it (measured 0.29 GPT-T, 0.33 DPAR-T: Dynamo
still traces, AOTAutograd and inductor load their compiled graphs).
The saving per generation is tokens x layers run per token step x the saving per layer-step. CPU:
compiled steps save 0.1-1 ms per layer-step over eager ones at GPT-T / DPAR-T size and 2-11 ms at
GPT-XS / DPAR-XS size (256 tokens, batch 8; 3 ms is taken), so compiling pays after 11 (GPT-XS)
to 270 (DPAR-XS) generations and only over hundreds of tiny ones. CUDA: the eager GPT-L decode measured on an
H200 (README: 20 ms per step, 24 layers) against the 5 ms/step the CUDA graphs aim at, 0.6 ms per
layer-step. Compiling on CUDA (Triton kernels, one CUDA-graph capture per shape) has not been
timed, so the CPU's compile cost stands in for it: an 8-image GPT-L grid (one generation, ~9 s
saved against ~160 s of compile) decodes eagerly, an FID run of hundreds of batches per rank
compiles, and so does a grid once the cache holds its step functions and the grid is large enough.
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
GRAPH_S = 12.0  # per compiled graph, its first transformer layer included
EXTRA_LAYER_S = 6.0  # per further transformer layer in a graph
GRAPHS_PER_FUNCTION = 1  # measured: GPT 1 graph, DPAR 4 graphs for its 4 step functions
WARM_SHARE = 0.3  # second process / first process, same compile cache
SAVED_S_PER_LAYER_STEP = {"cpu": 3e-3, "cuda": (20e-3 - 5e-3) / 24}


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
    cold = PROCESS_S + sum(GRAPHS_PER_FUNCTION * (GRAPH_S + EXTRA_LAYER_S * (f.layers - 1)) for f in functions)
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
