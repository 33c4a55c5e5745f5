"""SMT: the NTIRE 2025 x4 SR method (HAT-L + MambaIRv2-L, progressive multi-scale training, CLIP-selected
fine-tuning, ensemble inference) as a reproducible, tested pipeline."""

__version__ = "0.1.0"
