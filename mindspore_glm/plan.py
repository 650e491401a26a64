"""``python -m mindspore_glm.plan --config YAML [--devices N] [--device-memory 32GB] [--json]``: the memory
plan of a MindSpore run (semi-auto or data parallel), from :mod:`glm_common.memory_plan` (which holds the
arithmetic, shared with ``torch_glm.plan``). Imports no framework."""
import sys

from glm_common.memory_plan import main as _main

__all__ = ["main"]


def main(argv=None) -> int:
    return _main(argv, backend="mindspore")


if __name__ == "__main__":
    sys.exit(main())
