"""What the command lines share: a --help that shows each flag's default, the default worker count."""
import argparse
import os


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
