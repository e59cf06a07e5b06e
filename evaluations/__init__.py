"""Evaluation tools: the ADM-protocol c2i metrics (FID, sFID, IS, precision, recall) and a domain metric for small datasets."""
