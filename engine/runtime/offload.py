"""Weight offload as a removable policy: whole components between stages, or UNet blocks with prefetch.

Modes (:class:`OffloadMode`):

* ``none``: every weight is moved to ``device`` once.
* ``model``: each component (``unet``, ``vae``, ``text_encoder``, ``image_encoder``,
  ``image_proj``) lives on ``offload_device`` and is copied to ``device`` when a stage needs it;
  it stays there until another stage needs the memory (accelerate's ``cpu_offload_with_hook``
  chain: the previous model is offloaded *before* the next one is onloaded, so the device holds
  one stage's weights at a time).
* ``block``: the UNet's offload units -- each element of the ``_block_modules`` it declares
  (``input_blocks[i]``, ``middle_block``, ``output_blocks[i]``) and each other child
  (``time_embed``, ``fps_embedding``, ``init_attn``, ``out``) -- stay in pinned host memory and are
  copied in right before they run, the NEXT unit being prefetched on a side CUDA stream while the
  current one computes (execution order recorded on the first forward, diffusers' "lazy
  prefetch"). At most two units are on the device. Other components are offloaded model-level.

Design (how the orchestrator drives it): the pipeline names the components each stage uses::

    handle = apply_offload(model, plan.settings["offload"], device="cuda")
    with handle.onload("text_encoder", "image_encoder", "image_proj"):
        cond = build_conditions(...)
    with handle.onload("vae"):
        z = encode_remaining(...)
    with handle.onload("unet"):          # block mode: frees the others; blocks load themselves
        latents = sample_ddim(...)
    with handle.onload("vae"):
        video = decode_latents(...)
    remove_offload(model)                # hooks gone, weights back where they started

``onload`` is explicit because the VAE is driven through ``encode``/``decode`` (not ``forward``)
and the autoencode policy moves each chunk to the VAE's *current* device, so the weights must be
in place before the stage starts. As a safety net (and for callers that never call ``onload``,
e.g. other tools embedding one module) every component also carries an accelerate ``ModelHook``
on itself and its direct children that onloads it on first use and moves the inputs along.

Storage: each offloaded tensor keeps ONE host copy (pinned when ``device`` is CUDA, so copies
are truly asynchronous); onload assigns ``tensor.data = host.to(device)``, offload assigns
``tensor.data = host``. Nothing is copied back, since inference never writes weights. On a
CPU-only machine (``device="cpu"``) the host copy *is* the weight, every move is a no-op and
no stream or pinned memory is used, so every plan runs on CPU with the same hooks.

Apply precision (:func:`engine.runtime.precision.apply_precision`) BEFORE offload: ``model.to``
would replace the tensors the host copies stand for. To change either mid-run, ``remove_offload``,
change, then ``reapply_offload(model, handle.config)``.

Limitations: tied weights shared between two offload units are not supported (none in
DynamiCrafter); only ``forward`` calls trigger the safety-net hooks; an exception inside the UNet
can leave up to two blocks on the device until the next call or ``handle.offload_all()``.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

import torch
from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module
from accelerate.utils import send_to_device
from torch import nn

from .offload_units import (_CONTAINERS, OffloadMode, _block_units, _components, _declares_blocks,
                            _tensors, offload_host_bytes, offload_units)

logger = logging.getLogger(__name__)

__all__ = ["OffloadConfig", "OffloadHandle", "OffloadMode", "apply_offload", "get_offload",
           "offload_host_bytes", "offload_units", "reapply_offload", "remove_offload"]

_HANDLE_ATTR = "_engine_offload"


@dataclass(frozen=True)
class OffloadConfig:
    """What :func:`apply_offload` installed; pass it to :func:`reapply_offload` after a re-plan."""

    mode: OffloadMode
    device: torch.device
    offload_device: torch.device
    pin_memory: bool

    def as_kwargs(self) -> dict:
        return {"mode": self.mode, "device": self.device, "offload_device": self.offload_device,
                "pin_memory": self.pin_memory}


# ---------------------------------------------------------------- storage units
class _Group:
    """Tensors that move together, with one host copy each and where each started."""

    OFFLOADED, LOADING, RESIDENT = "offloaded", "loading", "resident"

    def __init__(self, name: str, tensors: list[torch.Tensor], device: torch.device):
        self.name, self.tensors, self.device = name, tensors, device
        self.origins = [t.device for t in tensors]
        self.host: list[torch.Tensor] = []
        self.owned: list[bool] = []
        self.state = self.RESIDENT
        self.event = None  # CUDA event recorded after this group's prefetch copies
        self.pinned = False

    def stash(self, offload_device: torch.device, pin: bool) -> None:
        """Make the host copies and leave the tensors pointing at them (offloaded)."""
        self.host = [_host_copy(t.data, offload_device, pin) for t in self.tensors]
        # copies made here (pinned or from another device) are ours to unpin at removal
        self.owned = [h.data_ptr() != t.data_ptr() for t, h in zip(self.tensors, self.host)]
        self.pinned = pin
        self.offload()

    def onload(self, non_blocking: bool = False) -> None:
        for t, h in zip(self.tensors, self.host):
            t.data = h.to(self.device, non_blocking=non_blocking)

    def place(self) -> None:
        """Move tensors that always live on the device (no host copy is kept)."""
        for t in self.tensors:
            t.data = t.data.to(self.device)
        self.state = self.RESIDENT

    def offload(self) -> None:
        # the device copy is simply dropped: weights are read-only in inference
        for t, h in zip(self.tensors, self.host):
            t.data = h
        self.state, self.event = self.OFFLOADED, None

    def restore(self) -> None:
        """Put every tensor back on its original device (pageable memory, not pinned)."""
        source = self.host or [t.data for t in self.tensors]
        owned = self.owned or [False] * len(source)
        for t, h, origin, own in zip(self.tensors, source, self.origins, owned):
            if origin.type == "cpu" and self.pinned and own:
                t.data = torch.empty_strided(h.size(), h.stride(), dtype=h.dtype).copy_(h)
            else:
                t.data = h.to(origin)
        self.host, self.owned, self.state = [], [], self.RESIDENT


def _host_copy(t: torch.Tensor, offload_device: torch.device, pin: bool) -> torch.Tensor:
    if pin and not t.is_pinned():
        # allocate pinned memory directly (no pageable intermediate): pinned sources let
        # ``to(device, non_blocking=True)`` run as a true async DMA on the side stream
        out = torch.empty_strided(t.size(), t.stride(), dtype=t.dtype, pin_memory=True)
        return out.copy_(t)
    return t.to(offload_device)  # the same tensor when it already lives there (CPU runs)


# ---------------------------------------------------------------- transfers
class _SyncTransfer:
    """No side stream (CPU, or a device without streams): everything loads on demand, in order."""

    def prefetch(self, group: _Group) -> None:
        self.load(group)

    def wait(self, group: _Group) -> None:
        group.state = group.RESIDENT

    def load(self, group: _Group) -> None:
        group.onload()
        group.state = group.RESIDENT

    def release(self, group: _Group) -> None:
        group.offload()

    def synchronize(self) -> None:
        pass


class _StreamTransfer(_SyncTransfer):
    """Prefetch on a side CUDA stream; the compute stream waits on a per-group event."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device=device)

    def prefetch(self, group: _Group) -> None:
        # copies are queued on the side stream so they overlap the kernels of the current block
        with torch.cuda.stream(self.stream):
            group.onload(non_blocking=group.pinned)
            group.event = torch.cuda.Event()
            group.event.record(self.stream)
        group.state = group.LOADING

    def wait(self, group: _Group) -> None:
        compute = torch.cuda.current_stream(self.device)
        compute.wait_event(group.event)  # GPU-side wait: the host is never blocked
        # the weights were allocated on the side stream; record_stream keeps the caching
        # allocator from handing their memory to the next prefetch before this block's
        # kernels on the compute stream have finished reading it
        for t in group.tensors:
            t.data.record_stream(compute)
        group.state = group.RESIDENT

    def load(self, group: _Group) -> None:
        # on the compute stream itself: later kernels are ordered after the copy
        group.onload(non_blocking=group.pinned)
        group.state = group.RESIDENT

    def synchronize(self) -> None:
        self.stream.synchronize()  # no side-stream copy may outlive the policy


def _make_transfer(device: torch.device) -> _SyncTransfer:
    """The transfer strategy for ``device`` (the seam tests replace with a recording fake)."""
    if device.type == "cuda":
        return _StreamTransfer(device)
    return _SyncTransfer()


class _BlockRunner:
    """Loads UNet units just in time and prefetches the next one in recorded execution order."""

    def __init__(self, groups: list[_Group], transfer: _SyncTransfer):
        self.groups, self.transfer = groups, transfer
        self.order: list[_Group] | None = None
        self.next: dict[int, _Group] = {}
        self.recording: list[_Group] = []

    def start(self) -> None:
        if self.order is None:
            self.recording = []  # (re)record: the previous first pass may have been interrupted
        elif self.order and self.order[0].state == _Group.OFFLOADED:
            self.transfer.prefetch(self.order[0])

    def before(self, group: _Group) -> None:
        if self.order is None and group not in self.recording:
            self.recording.append(group)
        if group.state == _Group.LOADING:
            self.transfer.wait(group)
        elif group.state == _Group.OFFLOADED:
            self.transfer.load(group)
        nxt = self.next.get(id(group))
        if nxt is not None and nxt.state == _Group.OFFLOADED:
            self.transfer.prefetch(nxt)  # issued BEFORE this unit's kernels are queued

    def after(self, group: _Group) -> None:
        self.transfer.release(group)

    def finish(self) -> None:
        if self.order is None:
            self.order = list(self.recording)
            self.next = {id(a): b for a, b in zip(self.order, self.order[1:])}
            logger.debug("block offload order: %s", [g.name for g in self.order])
        for group in self.groups:  # units that did not run this time must not stay on the device
            if group.state != _Group.OFFLOADED:
                self.transfer.release(group)


# ---------------------------------------------------------------- hooks
class _ComponentHook(ModelHook):
    """Safety net: onload the component on first use and move the inputs to its device."""

    def __init__(self, handle: OffloadHandle, name: str):
        self.handle, self.name = handle, name

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        if not self.handle.is_resident(self.name):
            logger.debug("offload: %s used outside handle.onload(); loading it now", self.name)
            self.handle._activate((self.name,))
        device = self.handle.config.device
        return send_to_device(args, device), send_to_device(kwargs, device)


class _BlockRootHook(ModelHook):
    """On the UNet itself: frees the other components, starts and ends one block pass."""

    def __init__(self, handle: OffloadHandle, name: str, runner: _BlockRunner):
        self.handle, self.name, self.runner = handle, name, runner

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        self.handle._activate((self.name,))  # frees the other components, not this one's units
        self.runner.start()
        device = self.handle.config.device
        return send_to_device(args, device), send_to_device(kwargs, device)

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.runner.finish()
        return output


class _BlockHook(ModelHook):
    def __init__(self, runner: _BlockRunner, group: _Group):
        self.runner, self.group = runner, group

    @torch.compiler.disable
    def pre_forward(self, module, *args, **kwargs):
        self.runner.before(self.group)
        return args, kwargs

    @torch.compiler.disable
    def post_forward(self, module, output):
        self.runner.after(self.group)
        return output


# ---------------------------------------------------------------- the handle
class OffloadHandle:
    """An installed offload policy: its config, the stage API and removal.

    Attributes:
        config: the :class:`OffloadConfig` (re-apply it with :func:`reapply_offload`).
        names: the component names :meth:`onload` accepts.
    """

    def __init__(self, model: nn.Module, config: OffloadConfig):
        self.model, self.config = model, config
        self.names = tuple(_components(model))
        self.components: dict[str, _Group] = {}  # model-level groups
        self.blocks: dict[str, _BlockRunner] = {}  # block-offloaded components (the UNet)
        self.resident: _Group | None = None  # everything that always lives on the device
        self._hooked: list[tuple[nn.Module, bool]] = []
        self._transfer = _make_transfer(config.device)

    @contextlib.contextmanager
    def onload(self, *names: str):
        """Make the named components resident on the device for a stage.

        Components not named are offloaded FIRST (so the device never holds two stages'
        weights), then the named ones are copied in. On exit nothing moves: a component stays
        until a later stage needs the memory, so consecutive stages sharing a component do not
        ping-pong. Block-offloaded components (the UNet in ``block`` mode) load unit by unit
        on their own; naming them only frees the others. A no-op in ``none`` mode.

        Args:
            *names: public component names (``unet``, ``vae``, ``text_encoder``,
                ``image_encoder``, ``image_proj``).

        Example:
            >>> with handle.onload("vae"):
            ...     video = decode_latents(model, latents, mode)
        """
        unknown = [n for n in names if n not in self.names]
        if unknown:
            raise ValueError(f"`names` {unknown} are not components of this model; use some of "
                             f"{', '.join(self.names)}.")
        self._activate(names)
        yield self

    def offload_all(self) -> None:
        """Move every offloadable weight off the device (end of run, out-of-memory recovery)."""
        self._activate(())

    def is_resident(self, name: str) -> bool:
        """Whether component ``name`` is on the device; components that are not offloaded as a
        whole (``none`` mode, the block-offloaded UNet, which loads itself) always count as resident."""
        group = self.components.get(name)
        return group is None or group.state != _Group.OFFLOADED

    @property
    def execution_order(self) -> tuple[str, ...]:
        """Names of the block units in recorded execution order (empty before the first pass)."""
        return tuple(g.name for runner in self.blocks.values() for g in (runner.order or ()))

    def remove(self) -> None:
        """Same as :func:`remove_offload` on this handle's model."""
        self._transfer.synchronize()
        for module, had_forward in reversed(self._hooked):
            remove_hook_from_module(module)
            if not had_forward:  # accelerate leaves the bound original in __dict__; drop it
                module.__dict__.pop("forward", None)
        self._hooked.clear()
        groups = list(self.components.values()) + [g for r in self.blocks.values() for g in r.groups]
        for group in groups + ([self.resident] if self.resident is not None else []):
            group.restore()
        self.model.__dict__.pop(_HANDLE_ATTR, None)

    # -------------------------------------------------------------- internals
    def _activate(self, names: tuple[str, ...]) -> None:
        for name, group in self.components.items():
            if name not in names and group.state != _Group.OFFLOADED:
                self._transfer.release(group)
        for name, runner in self.blocks.items():
            if name not in names:
                for group in runner.groups:
                    if group.state != _Group.OFFLOADED:
                        self._transfer.release(group)
        for name in names:
            group = self.components.get(name)
            if group is not None and group.state == _Group.OFFLOADED:
                self._transfer.load(group)

    def _install(self, pin: bool) -> None:
        cfg, seen = self.config, set()
        if cfg.mode is not OffloadMode.NONE:
            for name, module in _components(self.model).items():
                if cfg.mode is OffloadMode.BLOCK and _declares_blocks(module):
                    self._install_blocks(name, module, seen, pin)
                    continue
                group = _Group(name, _tensors(module, seen), cfg.device)
                self.components[name] = group
                group.stash(cfg.offload_device, pin)
                for entry in _entry_modules(module):
                    self._hook(entry, _ComponentHook(self, name))
        self.resident = _Group("resident", _tensors(self.model, seen), cfg.device)
        self.resident.place()

    def _install_blocks(self, name: str, module: nn.Module, seen: set[int], pin: bool) -> None:
        runner = _BlockRunner([], self._transfer)
        self.blocks[name] = runner  # registered first, so a failure below is fully undone
        for unit_name, unit in _block_units(module):
            tensors = _tensors(unit, seen)
            if not tensors:
                continue  # parameter-free children (activations) need no hook
            group = _Group(f"{name}.{unit_name}", tensors, self.config.device)
            runner.groups.append(group)
            group.stash(self.config.offload_device, pin)
            self._hook(unit, _BlockHook(runner, group))
        self._hook(module, _BlockRootHook(self, name, runner))

    def _hook(self, module: nn.Module, hook: ModelHook) -> None:
        self._hooked.append((module, "forward" in module.__dict__))
        add_hook_to_module(module, hook)


# ---------------------------------------------------------------- structure
def _entry_modules(module: nn.Module) -> list[nn.Module]:
    """Where a component can be entered: itself (``forward``) and its direct children (the VAE is
    driven through ``encode``/``decode``, which call ``encoder``/``quant_conv``/...)."""
    return [module] + [c for c in module.children() if not isinstance(c, _CONTAINERS)]


def _validate(mode, device, offload_device, pin_memory) -> OffloadConfig:
    mode = OffloadMode.parse(mode)
    device, offload_device = torch.device(device), torch.device(offload_device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`device` {str(device)!r} is not available on this machine; use "
                         f"device='cpu' (offload then runs with no-op moves).")
    if device.type == "meta" or offload_device.type == "meta":
        raise ValueError("`device` and `offload_device` cannot be 'meta'; load real weights first.")
    if not isinstance(pin_memory, bool):
        raise ValueError(f"`pin_memory` must be True or False, got {pin_memory!r}.")
    return OffloadConfig(mode, device, offload_device, pin_memory)


def _check_foreign_hooks(model: nn.Module) -> None:
    hooked = [name or type(model).__name__ for name, m in model.named_modules() if hasattr(m, "_hf_hook")]
    if hooked:
        raise ValueError(f"`model` already carries accelerate hooks ({', '.join(hooked[:5])}); remove "
                         f"them with accelerate.hooks.remove_hook_from_module(model, recurse=True) "
                         f"or remove_offload(model) first.")
    meta = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if meta:
        raise ValueError(f"`model` has tensors on the meta device ({', '.join(meta[:3])}); load its "
                         f"weights before apply_offload (offload_host_bytes works on meta models).")


# ---------------------------------------------------------------- public functions
def apply_offload(model: nn.Module, mode: OffloadMode | str, *, device: str | torch.device,
                  offload_device: str | torch.device = "cpu", pin_memory: bool = True) -> OffloadHandle:
    """Install an offload policy on ``model`` (replacing a previous one).

    Args:
        model: a :class:`~engine.models.lvdm.LatentVisualDiffusion` (offloaded per component),
            or any module (one component named ``"model"``; ``block`` mode needs it to declare
            ``_block_modules``).
        mode: ``"none"``, ``"model"`` or ``"block"`` (see the module docstring).
        device: the execution device.
        offload_device: where offloaded weights live (host memory).
        pin_memory: keep host copies page-locked when ``device`` is CUDA, so copies are
            asynchronous (costs locked RAM; pass ``False`` on small-RAM hosts).

    Returns:
        The :class:`OffloadHandle` (also found with :func:`get_offload`).

    Example:
        >>> handle = apply_offload(model, "block", device="cuda")
        >>> with handle.onload("unet"):
        ...     eps = model.apply_model(x, t, c_concat, context, fs)
        >>> remove_offload(model)
    """
    config = _validate(mode, device, offload_device, pin_memory)
    remove_offload(model)
    _check_foreign_hooks(model)
    if config.mode is OffloadMode.BLOCK and not any(map(_declares_blocks, _components(model).values())):
        raise ValueError(f"`mode` 'block' needs a component declaring `_block_modules`, and "
                         f"{type(model).__name__} has none; use mode='model'.")
    pin = (config.pin_memory and config.device.type == "cuda" and config.offload_device.type == "cpu")
    handle = OffloadHandle(model, config)
    try:
        handle._install(pin)
    except BaseException:
        handle.remove()  # never leave a half-installed policy behind
        raise
    model.__dict__[_HANDLE_ATTR] = handle
    logger.debug("offload %s on %s (offload to %s, pinned=%s)", config.mode.value, config.device,
                 config.offload_device, pin)
    return handle


def remove_offload(model: nn.Module) -> OffloadConfig | None:
    """Remove the offload policy from ``model`` (no-op without one) and return its config.

    Every hook is removed and each weight goes back to the device it had before
    :func:`apply_offload`, in pageable memory, with unchanged values (bit-identical outputs).

    Example:
        >>> config = remove_offload(model)
    """
    handle = get_offload(model)
    if handle is None:
        return None
    handle.remove()
    return handle.config


def reapply_offload(model: nn.Module, config: OffloadConfig | None = None) -> OffloadHandle:
    """Remove the current policy and apply ``config`` (default: the current policy's config).

    Example:
        >>> config = remove_offload(model); apply_precision(model, "fp16")
        >>> reapply_offload(model, config)
    """
    current = get_offload(model)
    config = config or (current.config if current is not None else None)
    if config is None:
        raise ValueError("`config` is required when `model` has no offload policy installed; "
                         "pass the OffloadConfig kept from the previous handle.")
    return apply_offload(model, **config.as_kwargs())


def get_offload(model: nn.Module) -> OffloadHandle | None:
    """The :class:`OffloadHandle` installed on ``model``, or ``None``."""
    return getattr(model, "__dict__", {}).get(_HANDLE_ATTR)
