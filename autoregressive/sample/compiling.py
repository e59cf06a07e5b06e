"""The fast path as sample_c2i.py runs it: whether the decode steps are compiled, a compile cache
that outlives the process, the line printed before the first generation, and one line naming
--no-compile when compiling or CUDA-graph capture fails.

The default in one sentence: an FID run (--num-fid-samples) on CUDA compiles its decode steps,
a grid or a run on CPU decodes eagerly, and --compile / --no-compile override both. Measured
compile times: docs/performance.md, "Decode shapes and warm-up".
"""
import os
from pathlib import Path
from typing import Optional

import torch

CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


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


def compile_decode(requested: Optional[bool], device: torch.device, fid: bool) -> bool:
    """--compile / --no-compile when given (`requested`); else True for an FID run on CUDA."""
    return requested if requested is not None else fid and device.type == "cuda"


def compile_notice(fast: bool, requested: Optional[bool], cache: Path) -> str:
    """The line printed before the first generation: how the decode steps run, and the flag that
    changes it."""
    if fast:
        return f"compiling the decode steps (compile cache {cache}; --no-compile decodes eagerly)"
    if requested is False:
        return "decoding eagerly (--no-compile)"
    return "decoding eagerly, the default for a grid and on CPU (--compile compiles the decode steps)"


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
