"""Checkpoint loading: real Lightning files, DeepSpeed layout, legacy format, damaged files, dtypes,
non-finite weights, and pickles that try to run code (they must not)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import pytest
import torch

from engine.checkpoint import CheckpointError, load_into, read_state_dict
from engine.config import load_spec
from engine.logs import reset_warn_once
from engine.models import build_model

pl = pytest.importorskip("pytorch_lightning")
OmegaConf = pytest.importorskip("omegaconf").OmegaConf


def _one_sentence(msg: str) -> bool:
    return msg.count(". ") == 0 and "`" in msg


def _write_marker(path):
    """What a malicious pickle would call; the tests assert it never runs."""
    Path(path).write_text("code ran")
    return {}


class _Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return self.fn, (self.arg,)


class TinyLightning(pl.LightningModule):
    """Holds the container's children and buffers under their own names, so the state_dict keys are
    DynamiCrafter's (``model.diffusion_model.*``, ``first_stage_model.*``, ``alphas_cumprod``...)."""

    def __init__(self, hparams=None, **kwargs):
        super().__init__()
        self.save_hyperparameters(hparams) if hparams is not None else self.save_hyperparameters()
        container = build_model(load_spec("tiny"), seed=0)
        for name, child in container.named_children():
            self.add_module(name, child)
        for name, buf in container.named_buffers(recurse=False):
            self.register_buffer(name, buf, persistent=name not in container._non_persistent_buffers_set)

    def training_step(self, batch, index):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _trainer():
    return pl.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, max_steps=0,
                      enable_progress_bar=False, enable_model_summary=False)


def _fit(lm):
    trainer = _trainer()
    trainer.fit(lm, torch.utils.data.DataLoader(torch.zeros(1, 1)))  # 0 steps: attaches the loops
    return trainer


DYNAMICRAFTER_CFG = {"model": {"target": "lvdm.models.ddpm3d.LatentVisualDiffusion",
                               "params": {"linear_start": 0.00085, "channel_mult": [1, 2],
                                          "perframe_ae": True, "ckpt_path": None}}}


@pytest.fixture(scope="module")
def lightning_ckpt(tmp_path_factory):
    """``Trainer.save_checkpoint`` of a module whose ``hyper_parameters`` is an OmegaConf DictConfig."""
    lm = TinyLightning(OmegaConf.create(DYNAMICRAFTER_CFG))
    path = tmp_path_factory.mktemp("lightning") / "model.ckpt"
    _fit(lm).save_checkpoint(path)
    return lm, path


def _load(path):
    return load_into(build_model(load_spec("tiny"), device="meta"), read_state_dict(path), "tiny", str(path))


def _assert_same_weights(loaded, lm):
    expected = lm.state_dict()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, expected[k]), k


def test_trainer_checkpoint_with_omegaconf_hparams_loads(lightning_ckpt, caplog):
    lm, path = lightning_ckpt
    raw = torch.load(path, weights_only=False)
    assert type(raw["hyper_parameters"]).__name__ == "DictConfig" and "loops" in raw
    with pytest.raises(Exception):  # what plain weights-only loading did before
        torch.load(path, weights_only=True)
    with caplog.at_level(logging.INFO, logger="engine.checkpoint"):
        _assert_same_weights(_load(path), lm)
    assert "skipped" not in caplog.text  # OmegaConf is installed: its classes are allow-listed


def test_without_omegaconf_its_entries_are_skipped_with_a_note(lightning_ckpt, monkeypatch, caplog):
    lm, path = lightning_ckpt
    model = build_model(load_spec("tiny"), device="meta")  # load_spec itself needs OmegaConf
    for name in [m for m in sys.modules if m == "omegaconf" or m.startswith("omegaconf.")]:
        monkeypatch.setitem(sys.modules, name, None)  # `import omegaconf` now raises ImportError
    with caplog.at_level(logging.INFO, logger="engine.checkpoint"):
        sd = read_state_dict(path)
    _assert_same_weights(load_into(model, sd, "tiny", str(path)), lm)
    notes = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(notes) == 1 and "hyper_parameters" in notes[0] and "omegaconf.dictconfig.DictConfig" in notes[0]


def test_dumped_checkpoint_dict_with_attribute_dict_hparams_loads(tmp_path):
    lm = TinyLightning(lr=1e-4, scale_factor=0.18215, names=["a", "b"])
    trainer = _fit(lm)
    ckpt = trainer._checkpoint_connector.dump_checkpoint()
    ckpt["hyper_parameters"] = lm.hparams  # Lightning dumps a plain dict; older versions did not
    assert type(ckpt["hyper_parameters"]).__name__ == "AttributeDict"
    ckpt["extra"] = {"callbacks_default": __import__("collections").defaultdict(list, {"a": [1]})}
    path = tmp_path / "dumped.ckpt"
    torch.save(ckpt, path)
    assert any("AttributeDict" in g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path))
    _assert_same_weights(_load(path), lm)


def test_deepspeed_layout_loads(lightning_ckpt, tmp_path):
    lm, _ = lightning_ckpt
    path = tmp_path / "ds.ckpt"
    torch.save({"module": {"_forward_module." + k: v for k, v in lm.state_dict().items()},
                "buffer_names": [], "ds_version": "0.9.5"}, path)
    _assert_same_weights(_load(path), lm)


def test_legacy_format_loads_into_ram_with_a_warning(lightning_ckpt, tmp_path, caplog):
    lm, _ = lightning_ckpt
    path = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": lm.state_dict(), "epoch": 3}, path, _use_new_zipfile_serialization=False)
    reset_warn_once()
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        _assert_same_weights(_load(path), lm)
    assert "legacy (non-zip) format" in caplog.text and "engine convert" in caplog.text


def test_legacy_format_with_omegaconf_hparams_loads(lightning_ckpt, tmp_path):
    lm, _ = lightning_ckpt
    path = tmp_path / "legacy_hp.ckpt"
    torch.save({"state_dict": lm.state_dict(), "hyper_parameters": OmegaConf.create(DYNAMICRAFTER_CFG),
                "unknown": _Evil(_write_marker, str(tmp_path / "m"))}, path,
               _use_new_zipfile_serialization=False)
    _assert_same_weights(_load(path), lm)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("legacy", [False, True])
def test_pickle_calling_os_system_is_refused_and_never_runs(tmp_path, legacy):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "x": _Evil(os.system, f"touch {marker}")}, path,
               _use_new_zipfile_serialization=not legacy)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    assert not marker.exists()
    assert "refers to `" in str(info.value) and "system" in str(info.value) and _one_sentence(str(info.value))


def test_pickle_calling_exec_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(_Evil(exec, f"open({str(marker)!r}, 'w').write('x')"), path)
    with pytest.raises(CheckpointError, match=r"refers to `builtins.exec`, which can run code"):
        read_state_dict(path)
    assert not marker.exists()


def test_unknown_callable_becomes_an_inert_placeholder(lightning_ckpt, tmp_path, caplog):
    """A global no deny-list names (a function of this test module) is never called."""
    lm, _ = lightning_ckpt
    marker, proof = tmp_path / "pwned", tmp_path / "proof"
    path = tmp_path / "sneaky.ckpt"
    torch.save({"state_dict": lm.state_dict(), "callbacks": {"cb": _Evil(_write_marker, str(marker))}}, path)
    with caplog.at_level(logging.INFO, logger="engine.checkpoint"):
        _assert_same_weights(_load(path), lm)
    assert not marker.exists()
    assert "callbacks" in caplog.text and "_write_marker" in caplog.text
    torch.save(_Evil(_write_marker, str(proof)), tmp_path / "proof.ckpt")
    torch.load(tmp_path / "proof.ckpt", weights_only=False)  # unrestricted loading would run it
    assert proof.exists()


def test_top_level_placeholder_is_not_a_checkpoint(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save(_Evil(_write_marker, str(marker)), path)
    with pytest.raises(CheckpointError, match="holds no state_dict"):
        read_state_dict(path)
    assert not marker.exists()


def test_damaged_files_get_one_sentence(lightning_ckpt, tmp_path):
    from safetensors.torch import save_file

    lm, path = lightning_ckpt
    data = path.read_bytes()
    st = tmp_path / "m.safetensors"
    save_file({k: v.contiguous() for k, v in lm.state_dict().items()}, str(st))
    cases = {"empty.ckpt": b"", "trunc.ckpt": data[: len(data) // 2], "tail.ckpt": data[:-30],
             "trunc.safetensors": st.read_bytes()[:1000], "junk.ckpt": b"not a checkpoint at all\n" * 9}
    for name, blob in cases.items():
        (tmp_path / name).write_bytes(blob)
    expected = {"empty.ckpt": r"is empty \(0 bytes\)", "trunc.ckpt": "is truncated or corrupt",
                "tail.ckpt": "is truncated or corrupt", "trunc.safetensors": "is not a readable .safetensors",
                "junk.ckpt": "is not a PyTorch checkpoint"}
    for name, pattern in expected.items():
        with pytest.raises(CheckpointError, match=pattern) as info:
            read_state_dict(tmp_path / name)
        msg = str(info.value)
        assert f"`--ckpt` {str(tmp_path / name)!r}" in msg and _one_sentence(msg), msg
        if name.endswith(".ckpt"):
            assert "engine convert" not in msg, msg


def test_directory_is_reported_as_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match=r"is a directory; pass the checkpoint file inside it"):
        read_state_dict(tmp_path)


def test_integer_weights_are_rejected_naming_keys(lightning_ckpt, tmp_path):
    lm, _ = lightning_ckpt
    sd = dict(lm.state_dict())
    key = "model.diffusion_model.input_blocks.0.0.weight"
    sd[key] = sd[key].to(torch.int32)
    path = tmp_path / "int.ckpt"
    torch.save({"state_dict": sd}, path)
    with pytest.raises(CheckpointError) as info:
        _load(path)
    msg = str(info.value)
    assert key in msg and "int32" in msg and _one_sentence(msg), msg


def test_float64_weights_are_cast_with_a_warning(lightning_ckpt, tmp_path, caplog):
    lm, _ = lightning_ckpt
    sd = {k: v.double() if v.is_floating_point() else v for k, v in lm.state_dict().items()}
    path = tmp_path / "f64.ckpt"
    torch.save({"state_dict": sd}, path)
    reset_warn_once()
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        loaded = _load(path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    assert "float64 tensors" in caplog.text and "cast them to float32" in caplog.text
    _assert_same_weights(loaded, lm)


def test_half_weights_are_kept(lightning_ckpt, tmp_path):
    lm, _ = lightning_ckpt
    params = {n for n, _ in lm.named_parameters()}
    sd = {k: v.half() if k in params else v for k, v in lm.state_dict().items()}
    path = tmp_path / "half.ckpt"
    torch.save({"state_dict": sd}, path)
    assert next(_load(path).parameters()).dtype == torch.float16


def test_non_finite_weights_warn_once_naming_keys(lightning_ckpt, tmp_path, caplog):
    lm, _ = lightning_ckpt
    sd = {k: v.clone() for k, v in lm.state_dict().items()}
    key = "first_stage_model.decoder.conv_out.weight"
    sd[key].view(-1)[3] = float("nan")
    path = tmp_path / "nan.ckpt"
    torch.save({"state_dict": sd}, path)
    reset_warn_once()
    with caplog.at_level(logging.WARNING, logger="engine.checkpoint"):
        _load(path)
        _load(path)
    warnings = [r.getMessage() for r in caplog.records if "NaN or Inf" in r.getMessage()]
    assert len(warnings) == 1 and key in warnings[0], warnings
