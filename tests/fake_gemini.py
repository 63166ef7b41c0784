"""Moved to :mod:`ctiqa.testing.fake_gemini` (shared with bench/); this name is kept so existing imports work."""

from ctiqa.testing.fake_gemini import *  # noqa: F403
