"""Tools that run the entropy model: scoring a code store (score.py) and heatmap figures (heatmaps.py, visualize.py)."""
