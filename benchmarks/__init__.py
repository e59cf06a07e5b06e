"""Benchmarks: DPAR vs the baseline (training and sampling speed), data-parallel scaling, and the one-GPU check."""
