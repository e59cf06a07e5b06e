"""Every flag of every command line has a description, and --help shows its default."""
import argparse
import importlib
import sys

import pytest

from utils.cli import HelpFormatter

# (module, entry point called with an empty argument list)
COMMAND_LINES = [
    ("autoregressive.train.args", "parse_args"), ("autoregressive.sample.cli", "parse_args"),
    ("extract_codes", "parse_args"), ("entropy_tools.score", "parse_args"), ("entropy_model.calibrate", "parse_args"),
    ("entropy_model.stats", "parse_args"), ("entropy_tools.visualize", "parse_args"), ("utils.checkpoint", "main"),
    ("tokenizer.train_vq", "main"), ("evaluations.c2i.evaluator", "parse_args"), ("evaluations.flops", "parse_args"),
    ("benchmarks.benchmark", "parse_args"), ("benchmarks.gpu_check", "parse_args"),
    ("evaluations.domain_metric", "main"), ("dataset.synthetic", "main"), ("demo.__main__", "parse_args"),
    ("autoregressive.export", "main"),
]


class Captured(Exception):
    def __init__(self, parser):
        self.parser = parser


def captured_parser(module: str, entry: str, monkeypatch) -> argparse.ArgumentParser:
    def capture(self, *args, **kwargs):
        raise Captured(self)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_args", capture)
    monkeypatch.setattr(sys, "argv", [module])
    with pytest.raises(Captured) as caught:
        getattr(importlib.import_module(module), entry)([])
    return caught.value.parser


def parsers(parser: argparse.ArgumentParser) -> list:
    """The parser and its sub-command parsers."""
    subs = [p for a in parser._actions if isinstance(a, argparse._SubParsersAction) for p in a.choices.values()]
    return [parser, *[q for s in subs for q in parsers(s)]]


@pytest.mark.parametrize("module, entry", COMMAND_LINES)
def test_every_flag_has_help_and_a_shown_default(module, entry, monkeypatch):
    for parser in parsers(captured_parser(module, entry, monkeypatch)):
        assert issubclass(parser.formatter_class, HelpFormatter), (module, parser.prog)
        bare = [a.option_strings[0] if a.option_strings else a.dest for a in parser._actions
                if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction)) and not (a.help or "").strip()]
        assert not bare, f"{module}: no help for {bare}"


def test_fid_mode_reports_the_time_the_user_waits():
    """The headline is the wall time (VQ decoding and writing included), then the split."""
    from autoregressive.sample.fid import format_waiting
    from autoregressive.sample.sampler import Throughput

    run = Throughput(images=64, tokens=64 * 256, patches=0, seconds=6.4).summary(patched=False)
    run.update(wall_seconds=217.0, decode_and_write_seconds=210.6)
    line = format_waiting(run)
    assert line.startswith("64 images in 217.0 s (0.29 images/s): generation 6.4 s, VQ decoding and writing 210.6 s")
    assert line.endswith("generation alone: 64 images in 6.4 s: 10.00 images/s, 2560.0 tokens/s")
