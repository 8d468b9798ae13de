"""The VAE's memory and FLOPs under every autoencoding mode, fitted from fake traces.

``memory`` (:class:`VAEMemoryModel`, the public model), ``laws`` (law families and their fit),
``shapes`` (features of a VAE call), ``trace`` (tracing the runtime's autoencode functions on a
meta twin), ``keys`` (what the cache keys depend on).
"""
from __future__ import annotations

from .memory import DIRECTIONS, FAMILIES, VAEMemoryModel, VAEStageMemory

__all__ = ["DIRECTIONS", "FAMILIES", "VAEMemoryModel", "VAEStageMemory"]
