"""``python -m mindspore_glm.plan --config YAML [--devices N] [--device-memory 32GB] [--json]``: the memory
plan of a MindSpore run (semi-auto or data parallel), from :mod:`glm_common.memory_plan` (which holds the
arithmetic, shared with ``torch_glm.plan``). Imports no framework.

``--compile``: compile the run's training step for each rank that differs with MindSpore's DryRun and print
MindSpore's peak beside the plan (:mod:`mindspore_glm.dryrun`, whose options it then takes)."""
import sys

from glm_common.memory_plan import main as _main

__all__ = ["main"]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--compile" in argv:
        from mindspore_glm.dryrun import main as dryrun_main
        argv.remove("--compile")
        return dryrun_main(argv, prog="python -m mindspore_glm.plan --compile")
    return _main(argv, backend="mindspore")


if __name__ == "__main__":
    sys.exit(main())
