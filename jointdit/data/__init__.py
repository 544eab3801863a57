"""Clip indexes (AVSync15 layout), the synthetic sounding-video set, and the latent cache."""
