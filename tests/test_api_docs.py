"""docs/api.md is runnable: its ``python`` blocks run in order, in one namespace, in an empty folder
(with ``cat.png`` and ``last.png``), on the tiny config and the CPU."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from engine.pipeline.image_io import EXAMPLE_IMAGE

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def python_blocks(text: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", text, flags=re.S | re.M)


def test_api_doc_has_examples():
    blocks = python_blocks(API_DOC.read_text())
    assert len(blocks) >= 5 and all("Pipeline" in b or "pipe" in b for b in blocks)


@pytest.mark.slow
def test_api_doc_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE_IMAGE, "cat.png")
    from PIL import Image

    Image.open(EXAMPLE_IMAGE).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save("last.png")
    namespace: dict = {"__name__": "api_doc"}
    for i, block in enumerate(python_blocks(API_DOC.read_text())):
        exec(compile(block, f"docs/api.md block {i + 1}", "exec"), namespace)  # noqa: S102 - our own docs
    assert (tmp_path / "cat.mp4").is_file() and (tmp_path / "frames" / "frame_0000.png").is_file()
