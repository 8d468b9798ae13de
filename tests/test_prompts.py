"""Prompts over CLIP's 77 tokens are cut with one warning per distinct prompt; identical warnings
print once per process."""
from __future__ import annotations

import logging

import pytest

from engine.logs import reset_warn_once, warn_once
from engine.models.clip import TextEncoder

LONG = " ".join(["a corgi surfing a wave at sunset"] * 12)  # 7 tokens * 12 = 84 + start/end


@pytest.fixture(autouse=True)
def _fresh(caplog):
    reset_warn_once()
    caplog.set_level(logging.WARNING)


def _messages(caplog, text):
    return [r.getMessage() for r in caplog.records if text in r.getMessage()]


def test_long_prompt_warns_once_with_its_token_count(caplog):
    for _ in range(3):
        tokens = TextEncoder.tokenize([LONG, "", LONG])
        assert tuple(tokens.shape) == (3, 77)
    warnings = _messages(caplog, "tokens (start and end included)")
    assert len(warnings) == 1, warnings
    assert "has 86 tokens" in warnings[0] and "only the first 77 are kept" in warnings[0]
    assert warnings[0].startswith("`--prompt` 'a corgi surfing")


def test_each_distinct_long_prompt_warns_and_short_ones_do_not(caplog):
    other = LONG + " again"
    TextEncoder.tokenize([LONG, other, "a short prompt"])
    assert len(_messages(caplog, "tokens (start and end included)")) == 2  # same 60-char preview


def test_prompt_of_exactly_77_tokens_is_not_reported(caplog):
    exact = " ".join(["cat"] * 75)  # 75 + start/end = 77
    assert int((TextEncoder.tokenize([exact])[0] != 0).sum()) == 77
    assert not _messages(caplog, "tokens (start and end included)")


def test_warn_once_logs_identical_text_once_per_logger(caplog):
    a, b = logging.getLogger("engine.test_a"), logging.getLogger("engine.test_b")
    assert warn_once(a, "frames=%d lies outside the traced regime", 1)
    assert not warn_once(a, "frames=%d lies outside the traced regime", 1)
    assert warn_once(a, "frames=%d lies outside the traced regime", 2)
    assert warn_once(b, "frames=%d lies outside the traced regime", 1)
    assert len(_messages(caplog, "lies outside the traced regime")) == 3
