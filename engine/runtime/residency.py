"""What a run may change on a model, and how the model is given back as it was.

Every run records each tensor's storage before it touches anything (:class:`TensorRecord`: no
copy, the model's own tensors are just kept alive) and puts them back afterwards, so the next run
sees exactly the weights a freshly loaded model has. One exception, on purpose: with
``offload=none`` on an accelerator the weights stay on the device in the run's precision
(:class:`ModelState.kept`), because the next plan most likely wants them there; a run that wants
anything else restores them first, and :func:`release_model` does it on request.

Runs on one model are serialised by the model's lock: attention backends, precision and weight
placement are properties of the model, so two threads cannot each have their own at once.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn

_STATE_ATTR = "_engine_run_state"
_CREATE_LOCK = threading.Lock()


class TensorRecord:
    """Every parameter and buffer of ``model`` with the storage it has now."""

    def __init__(self, model: nn.Module):
        seen, self.entries = set(), []
        for t in list(model.parameters()) + list(model.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                self.entries.append((t, t.data))

    def restore(self) -> None:
        for t, data in self.entries:
            t.data = data


@dataclass
class Kept:
    """Weights a run left on the device: in which precision, where, and how to undo it."""

    precision: str
    device: torch.device
    record: TensorRecord


class ModelState:
    """Per-model run state: the lock that serialises runs and what the last run kept."""

    def __init__(self):
        self.lock = threading.RLock()
        self.kept: Kept | None = None

    def reusable(self, precision: str, device: torch.device) -> bool:
        return self.kept is not None and (self.kept.precision, self.kept.device) == (precision, device)

    def drop_kept(self) -> None:
        if self.kept is not None:
            self.kept.record.restore()
            self.kept = None


def model_state(model: nn.Module) -> ModelState:
    """The :class:`ModelState` of ``model`` (created on first use)."""
    with _CREATE_LOCK:
        state = model.__dict__.get(_STATE_ATTR)
        if state is None:
            state = model.__dict__[_STATE_ATTR] = ModelState()
    return state


def release_model(model: nn.Module) -> None:
    """Give back weights a run kept on the device: the model is again as it was loaded.

    Example:
        >>> generate(model, opts, plan=plan)   # offload=none on CUDA: weights stay on the card
        >>> release_model(model)               # back on the CPU, in their original precision
    """
    state = model_state(model)
    with state.lock:
        state.drop_kept()


def place(model: nn.Module, device: torch.device) -> None:
    """Move every tensor of ``model`` to ``device`` (storages swapped, ``Parameter`` objects kept)."""
    for t in list(model.parameters()) + list(model.buffers()):
        if t.device != device:
            t.data = t.data.to(device)
