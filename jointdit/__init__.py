"""JointDiT: image-to-sounding-video generation with joint audio-video diffusion."""

__version__ = "0.1.0"
