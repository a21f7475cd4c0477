"""Eventful vision transformers: dense ViT weights, per-stream state, sparse token updates."""
