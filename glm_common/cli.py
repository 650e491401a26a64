"""What every console command (``[project.scripts]``) does with an error: one line, a non-zero exit.

:func:`one_line_errors` wraps a command's ``main``: the project's own errors (every exception class
defined in this project's packages: ``RunConfigError``, ``DataError``, ``CheckpointError``,
``WeightError``, ``TrainingError`` ...), file-system errors (``OSError``: an unreadable input, a full disk,
named by the message), undecodable text and invalid JSON/YAML/regex are printed as ``error: <first line>``
on stderr with exit status 1 (130 on Ctrl-C). Anything else is a bug and keeps its traceback.
"""
from __future__ import annotations

import functools
import json
import re
import sys

__all__ = ["one_line_errors", "is_user_error", "error_line"]

#: the packages whose exception classes are user-facing errors (their messages name the file and field)
PROJECT_PACKAGES = ("glm_common", "mindspore_glm", "torch_glm", "convert", "hccl", "glm_serve")


def is_user_error(exc: BaseException) -> bool:
    """An error the user can fix from its message (see the module docstring)."""
    if isinstance(exc, (OSError, UnicodeError, json.JSONDecodeError, re.error)):
        return True
    try:
        import yaml
        if isinstance(exc, yaml.YAMLError):
            return True
    except ImportError:
        pass
    return any(cls.__module__.split(".")[0] in PROJECT_PACKAGES for cls in type(exc).__mro__
               if issubclass(cls, Exception) and cls is not Exception)


def error_line(exc: BaseException) -> str:
    """``<first line of the message>``, with the file named for an ``OSError`` that carries one."""
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    if isinstance(exc, OSError) and getattr(exc, "filename", None) and str(exc.filename) not in msg:
        msg = f"{exc.filename}: {exc.strerror or msg}"
    return msg


def one_line_errors(main):
    """Decorate a console command's ``main`` (see the module docstring)."""
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("error: interrupted", file=sys.stderr)
            return 130
        except Exception as e:  # noqa: BLE001 - re-raised below unless it is a user-facing error
            if not is_user_error(e):
                raise
            print(f"error: {error_line(e)}", file=sys.stderr)
            return 1
    return wrapper
