"""``engine plan --plot``: a picture of the plan beside DynamiCrafter's run (matplotlib is an extra)."""
from __future__ import annotations

import builtins

import pytest

from engine.cli import main
from engine.config import load_spec
from engine.device.spec import catalog_device
from engine.planner.plot import part_bytes, plot_plan
from engine.planner.search import make_plan


def _plans():
    card = catalog_device("rtx-4090-laptop")
    spec = load_spec("tiny")
    return (make_plan(spec, 128, 128, 16, card, steps=4),
            make_plan(spec, 128, 128, 16, card, steps=4, force="reference"))


def test_parts_add_up_to_the_peak():
    for plan in _plans():
        for stage in plan.stages:
            parts = part_bytes(stage)
            assert sum(parts.values()) == stage.peak_bytes
            assert parts["context"] == stage.terms["cuda_context"]


def test_plot_writes_a_valid_png(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    plan, reference = _plans()
    out = plot_plan(plan, tmp_path / "tiny.png", reference=reference)
    with Image.open(out) as image:
        image.verify()
    with Image.open(out) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 800 <= width <= 2000 and 450 <= height <= 1200


def test_cli_plot_tiny(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    from PIL import Image

    out = tmp_path / "plan.png"
    assert main(["plan", "--config", "tiny", "--gpu", "rtx-4090-laptop", "--steps", "4", "--json",
                 "--plot", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.lstrip().startswith("{")  # stdout stays JSON; the note goes to stderr
    assert f"wrote {out}" in captured.err
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size[0] > 500


def test_cli_plot_bad_extension_fails_before_planning(tmp_path, capsys):
    assert main(["plan", "--config", "tiny", "--gpu", "rtx-4090-laptop", "--plot", str(tmp_path / "x.jpg")]) == 2
    err = capsys.readouterr().err
    assert "`--plot`" in err and ".png" in err


def test_cli_plot_without_matplotlib_names_the_extra(tmp_path, capsys, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(f"No module named {name!r}")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    assert main(["plan", "--config", "tiny", "--gpu", "rtx-4090-laptop", "--plot", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err
    assert "`--plot`" in err and "pip install engine[plot]" in err
    assert err.count("\n") == 1 and not (tmp_path / "x.png").exists()
