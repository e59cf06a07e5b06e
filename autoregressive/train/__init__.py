"""The one trainer behind train_c2i.py (GPT baseline, entropy model, DPAR)."""
from autoregressive.train.args import build_parser, parse_args
from autoregressive.train.loop import main

__all__ = ["build_parser", "main", "parse_args"]
