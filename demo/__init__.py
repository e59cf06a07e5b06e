"""The offline demo: the whole DPAR pipeline on synthetic data, on CPU, ending in a replication
report (python -m demo --help; scripts/demo.sh sets up the environment first)."""
