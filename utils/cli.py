"""What the command lines share: --help with defaults, the default worker count, settings from flags."""
import argparse
import dataclasses
import os
from typing import Any, Mapping


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the description's layout and appends each flag's default, except unset ones
    (None/False), whose help says what unset means."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


def default_workers(limit: int = 4) -> int:
    """DataLoader workers when the user gives none: the CPU cores this process may use, at most `limit`."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(limit, cores)


def settings_from_flags(cls: type, flags: Mapping[str, Any], **resolved) -> Any:
    """The settings dataclass `cls` of a run: each field is resolved[name] when resolution decided
    it, else the flag of its name (a field with a default may be neither)."""
    names = [f.name for f in dataclasses.fields(cls)]
    return cls(**{**{name: flags[name] for name in names if name in flags}, **resolved})
