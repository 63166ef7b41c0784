"""Moved to :mod:`ctiqa.testing.sft_data` (shared with bench/); this name is kept so existing imports work."""

from ctiqa.testing.sft_data import *  # noqa: F403
