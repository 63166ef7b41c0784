"""ctiqa: explainable, radiologist-aligned CT image quality assessment with a fine-tuned medical VLM.

Stages (one module each): :mod:`ctiqa.imaging` (read + window CT, the ONE pixel path),
:mod:`ctiqa.ldctiqa` (the LDCTIQA 2023 data layer), :mod:`ctiqa.simulation` (mini-LDCTIQA from real CT),
:mod:`ctiqa.prompts` (every prompt and target format, versioned), :mod:`ctiqa.scoring` (score parsing),
:mod:`ctiqa.inference` / :mod:`ctiqa.evaluation` / :mod:`ctiqa.report` (evaluation harness),
:mod:`ctiqa.tiny` (a tiny Gemma 3 built offline for tests and the demo), :mod:`ctiqa.clients` (Gemini and
OpenAI-compatible API clients, retries, costs), :mod:`ctiqa.paths` (the cache folder), :mod:`ctiqa.cli` (the
``ctiqa`` command).
"""

__version__ = "0.1.0"


class CTIQAError(ValueError):
    """A user-facing error: bad input or configuration. The message names the file and what is wrong.

    The ``ctiqa`` command prints it on one line (``error: ...``) and exits with status 2.
    """


class CTIQAWarning(UserWarning):
    """Something was assumed or adjusted while reading an image (e.g. a CT DICOM without Rescale Intercept read
    with the -1024 convention, overshoot of [0, 1] data clipped). The message names the file; the ``ctiqa``
    command prints it as one ``warning: ...`` line. The same text is kept in :attr:`ctiqa.imaging.CTImage.notes`.
    """


def _drop_kernels_hint(record: object) -> bool:
    """False for bitsandbytes' import-time hint to ``pip install kernels`` on CPUs with AVX512-BF16: ctiqa runs
    4-bit layers without that package (:func:`ctiqa.inference.load_model` computes fp32 models in fp32), and the
    package would fetch code from the Hub at run time, which a private, offline deployment must not be told to do."""
    return "kernels-community" not in str(getattr(record, "msg", ""))


import logging as _logging  # noqa: E402  (after the public names: a filter only, no configuration)

_logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(_drop_kernels_hint)
