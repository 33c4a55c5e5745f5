"""Inference: padding-safe tiled forward with blended overlaps, x8 self-ensemble, MambaIRv2's multi-window
ensemble, weighted fusion of models (weight fit on validation images), and the infer stage's driver."""
