"""Fakes shared by the tests and the bench scripts (never used by the package itself).

:mod:`ctiqa.testing.fake_gemini` (a fake Gemini API on 127.0.0.1, spoken to by the real google-genai SDK; run it
standalone with ``python -m ctiqa.testing.fake_gemini --latency 1.0``), :mod:`ctiqa.testing.loopback` (the HTTP
plumbing of the fake servers) and :mod:`ctiqa.testing.sft_data` (a small learnable chat-format CT dataset). They
live in the package so that ``bench/`` does not import ``tests/``.
"""
