"""Stage runner: each stage runs once per set of parameters and leaves a done marker.

A stage's marker <out>/stages/<name>.json records its parameters (including the run ids of
the stages it depends on), its result summary, wall-clock and CPU seconds. A rerun skips a
stage whose marker holds the same parameters and whose outputs still validate; a changed
parameter, a rerun upstream stage, --force or a failed validation runs it again.

A stage that was interrupted leaves <name>.started.json. The tools behind the resumable
stages (training, scoring) continue from their own checkpoints, so a rerun with the same
parameters keeps their outputs; any other rerun clears the outputs first.
"""
from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from tqdm import tqdm

MARKER_DIR = "stages"


def write_json_atomic(path: Path, obj: Any) -> None:
    """JSON to a temporary file, then renamed over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Optional[dict]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def children_cpu_seconds() -> float:
    """CPU seconds (user + system) of this process and its finished children."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def print_now(line: str) -> None:
    print(line, flush=True)


def load_average() -> Optional[float]:
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


@dataclass
class Stage:
    """One step of the pipeline.

    params: JSON-able settings; a change reruns the stage. run: does the work and returns a
    JSON-able result (kept in the marker). validate: raises (any exception) when the outputs
    on disk are missing or broken. outputs: paths cleared before a fresh (non-resumed) run.
    """
    name: str
    description: str
    params: dict
    run: Callable[[], Optional[dict]]
    validate: Callable[[], None]
    outputs: Sequence[Path] = ()
    deps: Sequence[str] = ()
    resumable: bool = False


@dataclass
class StageRunner:
    """Runs stages in order, skipping finished ones; `results` collects every stage's marker."""
    out: Path
    force: Optional[Sequence[str]] = None  # None: nothing forced; empty: every stage; else these names
    log: Callable[[str], None] = print_now
    results: dict = field(default_factory=dict)  # name -> marker of the stages done or skipped
    total: int = 0
    count: int = 0
    concurrent: bool = False  # stages run side by side (threads): their CPU seconds are not told apart

    @property
    def marker_dir(self) -> Path:
        return self.out / MARKER_DIR

    def _forced(self, name: str) -> bool:
        return self.force is not None and (len(self.force) == 0 or name in self.force)

    def effective_params(self, stage: Stage) -> dict:
        deps = {}
        for dep in stage.deps:
            if dep not in self.results:
                raise RuntimeError(f"stage {stage.name} depends on {dep}, which has not run")
            deps[dep] = self.results[dep]["run_id"]
        return json.loads(json.dumps({"params": stage.params, "deps": deps}))  # as the marker stores it

    def _valid(self, stage: Stage) -> Optional[str]:
        """None when the outputs validate, else the reason."""
        try:
            stage.validate()
        except Exception as e:  # any failure means: not valid, redo
            return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return None

    def run(self, stage: Stage) -> dict:
        """Run or skip the stage; returns its marker (with "result")."""
        self.count += 1
        prefix = f"[{self.count}/{self.total}] {stage.name:<16}" if self.total else f"[{stage.name}]"
        identity = self.effective_params(stage)
        path = self.marker_dir / f"{stage.name}.json"
        done = read_json(path)
        why = ""
        if self._forced(stage.name):
            why = " (forced)"
        elif done is not None and done.get("identity") == identity:
            reason = self._valid(stage)
            if reason is None:
                self.log(f"{prefix} skipped (done in {done['seconds']:.0f}s on an earlier run): {stage.description}")
                self.results[stage.name] = done
                return done
            why = f" (outputs no longer valid: {reason})"
        elif done is not None:
            why = f" ({changed(done.get('identity') or {}, identity)})"
        started_path = self.marker_dir / f"{stage.name}.started.json"
        started = read_json(started_path)
        resume = (stage.resumable and not self._forced(stage.name) and started is not None
                  and started.get("identity") == identity and done is None)
        path.unlink(missing_ok=True)
        if not resume:
            for output in stage.outputs:
                remove_path(Path(output))
        write_json_atomic(started_path, {"identity": identity, "time": time.time()})
        self.log(f"{prefix} {'resuming' if resume else 'running'}{why}: {stage.description}")
        load_before = load_average()
        wall, cpu = time.time(), children_cpu_seconds()
        result = stage.run() or {}
        reason = self._valid(stage)
        if reason is not None:
            raise RuntimeError(f"stage {stage.name} finished but its outputs are not valid: {reason}")
        marker = {
            "stage": stage.name, "identity": identity, "result": result, "run_id": uuid.uuid4().hex,
            "seconds": time.time() - wall, "cpu_seconds": None if self.concurrent else children_cpu_seconds() - cpu,
            "load_average": [load_before, load_average()], "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "resumed": resume,
        }
        write_json_atomic(path, marker)
        started_path.unlink(missing_ok=True)
        self.log(f"{prefix} done in {marker['seconds']:.0f}s")
        self.results[stage.name] = marker
        return marker


def changed(old: dict, new: dict) -> str:
    """Why a finished stage runs again: its changed settings or the upstream stages redone."""
    params = sorted(k for k in set(old.get("params", {})) | set(new["params"])
                    if old.get("params", {}).get(k) != new["params"].get(k))
    deps = sorted(k for k in new["deps"] if old.get("deps", {}).get(k) != new["deps"][k])
    parts = ([f"settings changed: {', '.join(params)}"] if params else []) + (
        [f"redone upstream: {', '.join(deps)}"] if deps else [])
    return "; ".join(parts) or "settings changed"


def remove_path(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


# ---------------------------------------------------------------------------------------
# Running the project's command-line tools
# ---------------------------------------------------------------------------------------
STEP_LINE = re.compile(r"^step\s+(\d+)/(\d+) \| loss ([0-9.naninf]+)")


def run_tool(cmd: Sequence[str], log_path: Path, cwd: Path, env: Optional[dict] = None,
             progress: Optional[str] = None) -> None:
    """Run a tool with this Python: stdout to log_path (and, for the trainer, a progress bar
    read from its "step N/M | loss" lines); stderr (the tools' own progress bars and errors)
    passes through. Raises RuntimeError with the log's tail when the tool fails."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(cwd), full_env.get("PYTHONPATH")]))
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        proc = subprocess.Popen([sys.executable, *cmd], cwd=cwd, env=full_env, stdout=subprocess.PIPE,
                                stderr=None, text=True, bufsize=1)
        bar = None
        try:
            for line in proc.stdout:
                log.write(line)
                log.flush()
                m = STEP_LINE.match(line.strip()) if progress else None
                if m:
                    step, total = int(m.group(1)), int(m.group(2))
                    if bar is None:
                        # initial: a resumed stage's earlier steps do not count towards the rate
                        bar = tqdm(total=total, initial=step, desc=progress, unit="step", dynamic_ncols=True,
                                   leave=False, file=sys.stderr)
                    bar.n = step
                    bar.set_postfix(loss=m.group(3))
                    bar.refresh()
            code = proc.wait()
        except BaseException:  # Ctrl-C reaches the tool too: give it time to checkpoint and exit
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            raise
        finally:
            if bar is not None:
                bar.close()
    if code != 0:
        tail = log_path.read_text().splitlines()[-5:]
        raise RuntimeError(f"{' '.join(cmd[:2])} failed (exit {code}); last lines of {log_path}:\n  "
                           + "\n  ".join(tail))
