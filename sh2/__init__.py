"""sh2: training system for StripedHyena 2 convolutional multi-hybrid language models."""

__version__ = "0.1.0"
