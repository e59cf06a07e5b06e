"""Class-conditional ImageNet metrics following the ADM evaluator's conventions (FID, sFID, IS, precision, recall)."""
