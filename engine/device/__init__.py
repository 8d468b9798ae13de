"""Probing the machine we run on: the GPU (nvidia-ml-py, torch), host RAM (psutil), and short
micro-benchmarks of a card we know nothing about (matmul throughput, host-to-device bandwidth)."""
from .probe import host_memory, probe_cpu, probe_device

__all__ = ["probe_device", "probe_cpu", "host_memory"]
