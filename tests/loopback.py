"""Moved to :mod:`ctiqa.testing.loopback` (shared with bench/); this name is kept so existing imports work."""

from ctiqa.testing.loopback import *  # noqa: F403
