"""CLIP-based selection of the stage-3 fine-tuning images (embeddings, cache, ranking, manifest)."""
