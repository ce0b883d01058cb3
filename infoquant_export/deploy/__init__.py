"""Deployment: Triton Inference Server model repositories, the Jetson bundle and the end-to-end pipeline."""
