"""Training: paired patch data, the multi-scale loss, EMA, resumable checkpoints, the loop (DDP-ready)."""
