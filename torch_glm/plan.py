"""``python -m torch_glm.plan --config YAML [--devices N] [--device-memory 32GB] [--json]``: the memory
plan of a torch_glm run (DDP, or FSDP2 full shard), from :mod:`glm_common.memory_plan` (which holds the
arithmetic, shared with ``mindspore_glm.plan``). Imports no framework."""
import sys

from glm_common.memory_plan import main as _main

__all__ = ["main"]


def main(argv=None) -> int:
    return _main(argv, backend="torch")


if __name__ == "__main__":
    sys.exit(main())
