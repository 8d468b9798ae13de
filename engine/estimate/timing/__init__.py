"""How long VAE encode/decode takes per autoencoding mode, measured on the device.

``model`` (:class:`AETimeModel`), ``calibrate`` (the measurements), ``terms`` (the fitted terms of
one direction), ``layout`` (how a mode splits a run into VAE calls; torch-free).
"""
from __future__ import annotations

from .layout import CallLayout, call_layout
from .model import AETimeModel, device_name
from .terms import DirectionTiming

__all__ = ["AETimeModel", "CallLayout", "DirectionTiming", "call_layout", "device_name"]
