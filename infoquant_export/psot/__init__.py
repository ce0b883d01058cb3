"""PSOT: learned block rotations that minimise activation peaks before low-bit quantization."""
