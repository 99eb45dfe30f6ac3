"""Semantic Motion Predictor and transition videos between story frames (Stable Video Diffusion)."""
