"""The ``ctiqa`` command. Each sub-command lives in the module that does the work; this file only dispatches.

A sub-command module defines ``add_cli_arguments(parser: argparse.ArgumentParser) -> None`` and
``cli_main(args: argparse.Namespace) -> int``. Modules are imported lazily so ``ctiqa render`` does not pay for
torch/transformers. A :class:`ctiqa.CTIQAError`, or an ``OSError`` about a named file (e.g. a name too long),
is printed as one ``error: ...`` line, exit status 2; Ctrl-C prints one line, exit status 130.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
import warnings

#: sub-command -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "render": ("ctiqa.imaging", "write exactly the RGB image the model sees for a CT file (DICOM/TIFF/PNG)"),
    "validate": ("ctiqa.ldctiqa", "check an LDCTIQA download: counts, score histogram, pixel range"),
    "simulate": ("ctiqa.simulation", "write a mini-LDCTIQA (synthetic scores) from real CT shipped by pydicom"),
    "build-dataset": ("datasets_builder.build", "teacher rationales -> chat-format dataset (local folder or Hub)"),
    "tiny-model": ("ctiqa.tiny", "build and save a tiny random Gemma 3 VLM + processor, offline"),
    "evaluate": ("ctiqa.evaluation", "score a model (or Gemini, or a predictions file) against true scores"),
    "report": ("ctiqa.report", "Table-1-style comparison of several evaluation result folders"),
    "predict": ("ctiqa.predict", "score your own CT: DICOM series, DICOM/TIFF/PNG files"),
    "app": ("ctiqa.app", "a Gradio app: upload CT, see scores, rationales, findings (needs the app extra)"),
    "html": ("ctiqa.html_report", "render an evaluation folder as one self-contained HTML report"),
    "export": ("ctiqa.export", "merge a LoRA adapter into its base: a full model folder for vLLM / transformers serve"),
    "findings": ("ctiqa.findings", "measure noise (HU) and sparse-view streaks of CT images, no model"),
}


def non_negative_int(text: str) -> int:
    """``argparse`` type of seeds and resample counts: an int >= 0 (numpy and scipy reject negatives with a
    traceback; here it is one usage line).

    Raises:
        argparse.ArgumentTypeError: not an integer, or below 0.
    """
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ctiqa",
        description="Explainable CT image quality assessment with a fine-tuned medical VLM.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="commands:\n" + "\n".join(f"  {k:<14} {v[1]}" for k, v in COMMANDS.items())
        + "\n\n`ctiqa COMMAND --help` documents each command.",
    )
    p.add_argument("command", choices=list(COMMANDS), metavar="COMMAND")
    p.add_argument("--version", action="version", version=f"ctiqa {__import__('ctiqa').__version__}")
    return p


def _show_warning(message, category, filename, lineno, file=None, line=None, _default=warnings.showwarning):
    """A :class:`ctiqa.CTIQAWarning` is printed as one ``warning: ...`` line on stderr; others as Python does."""
    from ctiqa import CTIQAWarning

    if issubclass(category, CTIQAWarning):
        print(f"warning: {message}", file=sys.stderr if file is None else file)
    else:
        _default(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``ctiqa`` console script. Returns the process exit status."""
    from ctiqa import CTIQAError

    warnings.showwarning = _show_warning

    argv = list(sys.argv[1:] if argv is None else argv)
    top = _top_parser()
    if not argv or argv[0].startswith("-"):
        top.parse_args(argv or ["--help"])
        return 0
    cmd = argv[0]
    if cmd not in COMMANDS:
        top.error(f"unknown command {cmd!r}")
    module_name, help_text = COMMANDS[cmd]
    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"ctiqa {cmd}", description=help_text)
    module.add_cli_arguments(parser)
    args = parser.parse_args(argv[1:])
    try:
        return int(module.cli_main(args) or 0)
    except CTIQAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if e.errno == errno.ENOSPC:  # a full disk: what was written stays (atomic writes, streamed rows)
            print(f"error: no space left on device ({e.filename or 'while writing'}); free some space and run the "
                  "same command again", file=sys.stderr)
            return 2
        if e.filename is None:  # not about a file the user named: keep the traceback for a bug report
            raise
        name = e.filename if e.filename2 is None else f"{e.filename} -> {e.filename2}"
        print(f"error: {name}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"interrupted: ctiqa {cmd} stopped before it finished", file=sys.stderr)
        return 130  # the shell's status for SIGINT


if __name__ == "__main__":
    sys.exit(main())
