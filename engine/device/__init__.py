"""Probing the machine we run on: the GPU (nvidia-ml-py, torch), host RAM (psutil), and short
micro-benchmarks of a card we know nothing about (matmul throughput, host-to-device bandwidth)."""
from .probe import probe_device, host_memory

__all__ = ["probe_device", "host_memory"]
