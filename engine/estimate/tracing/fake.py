"""Turn real or meta tensors and modules into fake tensors on a chosen device, and back.

A fake tensor here is built from a *meta twin*: a meta tensor viewing a meta storage made once per
source storage. Two tensors that share a storage (a weight and its transpose, tied embeddings)
therefore share one fake storage and are counted once. The twin never reads the source's data,
so the same path serves real modules, modules built on the meta device, and a target device that
differs from where the module lives (a CPU checkpoint planned for a CUDA card).

Module parameters and buffers are swapped for their fakes in place (``module._parameters`` and
``module._buffers``), so device-dependent Python code inside ``forward`` (``x.is_cuda``,
``next(self.parameters()).device``) sees the target device. :meth:`ModuleSwap.restore` puts back
the very same objects.
"""
from __future__ import annotations

import logging
from typing import Any, Callable

import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.weak import WeakIdKeyDictionary

logger = logging.getLogger(__name__)

__all__ = ["FakeConverter", "ModuleSwap", "normalize_device"]


def normalize_device(device: str | torch.device) -> torch.device:
    """Return ``device`` as a :class:`torch.device` with an index for indexed device types.

    Args:
        device: e.g. ``"cpu"``, ``"cuda"``, ``"cuda:1"``.
    """
    dev = torch.device(device)
    if dev.type == "meta":
        raise ValueError("`device` must name a real device type such as 'cpu' or 'cuda', not "
                         "'meta'; modules on the meta device are traced as if on `device`.")
    if dev.type != "cpu" and dev.index is None:
        dev = torch.device(dev.type, 0)
    return dev


class FakeConverter:
    """Memoised real/meta -> fake conversion onto one device for one :class:`FakeTensorMode`.

    Args:
        fake_mode: the mode that will own every fake tensor made here.
        device: the device the fakes report (the device being planned for).
        on_new: called once with each newly made fake and its source tensor, so a tracker can
            register the fake's storage as pre-existing memory.
    """

    def __init__(self, fake_mode: FakeTensorMode, device: torch.device,
                 on_new: Callable[[torch.Tensor, torch.Tensor], None] | None = None) -> None:
        self.fake_mode = fake_mode
        self.device = device
        self._on_new = on_new
        self._memo: WeakIdKeyDictionary = WeakIdKeyDictionary()
        # Source storages are held strongly while tracing so their address (our key) cannot be
        # reused by a different storage before the trace ends.
        self._meta_storages: dict[int, tuple[torch.UntypedStorage, torch.UntypedStorage]] = {}

    def is_ours(self, t: torch.Tensor) -> bool:
        """Whether ``t`` is already a fake tensor of this converter's mode."""
        return isinstance(t, FakeTensor) and t.fake_mode is self.fake_mode

    def __call__(self, t: torch.Tensor) -> torch.Tensor:
        """Return the fake of ``t`` (``t`` itself when it is already one of ours)."""
        if self.is_ours(t):
            return t
        hit = self._memo.get(t)
        if hit is not None:
            return hit
        # Building twins must not be seen by the dispatch modes above (it is not program memory),
        # nor by torch-function modes (a dozen metadata calls per tensor would each enter them).
        with _disable_current_modes(), torch._C.DisableTorchFunction():
            fake = self.fake_mode.fake_tensor_converter.from_meta_and_device(
                self.fake_mode, self._meta_twin(t), self.device)
            # A parameter's fake stays a plain fake tensor: wrapping it in ``nn.Parameter`` costs
            # a dispatched detach per weight (a third of a UNet trace) and forward code only
            # reads it. ``requires_grad`` is kept: autocast caches casts of such leaves only.
            if t.requires_grad and t.is_leaf:
                fake.requires_grad_(True)
        self._memo[t] = fake
        if self._on_new is not None:
            self._on_new(fake, t)
        return fake

    def _meta_twin(self, t: torch.Tensor) -> torch.Tensor:
        src = t.untyped_storage()
        key = src._cdata
        if key not in self._meta_storages:
            meta = torch.empty(src.nbytes(), dtype=torch.uint8, device="meta").untyped_storage()
            self._meta_storages[key] = (src, meta)
        meta_storage = self._meta_storages[key][1]
        twin = torch.empty(0, dtype=t.dtype, device="meta")
        twin.set_(meta_storage, t.storage_offset(), t.shape, t.stride())
        return twin

    def clear(self) -> None:
        """Forget every conversion and release the source storages held while tracing."""
        self._memo = WeakIdKeyDictionary()
        self._meta_storages.clear()

    def convert_tree(self, obj: Any) -> Any:
        """Convert every tensor inside a pytree ``obj`` (tuples, lists, dicts) to its fake."""
        return torch.utils._pytree.tree_map_only(torch.Tensor, self, obj)


class ModuleSwap:
    """Swap the parameters and buffers of modules for fakes; undo exactly with :meth:`restore`.

    Args:
        convert: the converter that makes (and memoises) the fakes.
    """

    def __init__(self, convert: FakeConverter) -> None:
        self._convert = convert
        self._saved: list[tuple[dict, str, torch.Tensor]] = []
        self._done: set[int] = set()
        self._modules: list[nn.Module] = []  # keeps ids in ``_done`` from being reused

    def swap(self, module: nn.Module) -> list[torch.Tensor]:
        """Swap ``module`` and all its submodules (each at most once); return the new fakes."""
        if id(module) in self._done:
            return []  # its whole subtree was swapped with it
        installed = []
        for sub in module.modules():
            if id(sub) in self._done:
                continue
            self._done.add(id(sub))
            self._modules.append(sub)
            for store in (sub._parameters, sub._buffers):
                for name, tensor in list(store.items()):
                    if tensor is None or self._convert.is_ours(tensor):
                        continue
                    self._saved.append((store, name, tensor))
                    store[name] = self._convert(tensor)
                    installed.append(store[name])
        return installed

    def restore(self) -> None:
        """Put every swapped tensor back, last swapped first."""
        while self._saved:
            store, name, tensor = self._saved.pop()
            store[name] = tensor
        self._done.clear()
        self._modules.clear()
