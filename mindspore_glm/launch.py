"""Command line of ``scripts/run_distribute.sh`` (``python -m mindspore_glm.launch``) and the scheduler of
MindSpore's dynamic cluster.

    bash scripts/run_distribute.sh RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] [PREDICT_DATA ...]
    python -m mindspore_glm.launch [options] RANK_TABLE_FILE CONFIG_PATH DEVICE_RANGE RUN_STATUS [RANK_SIZE] ...

Three parts, three modules: :mod:`mindspore_glm.launch_plan` checks the arguments and plans the processes
(the arguments, the launch modes and the files are described there), the memory plan
(:mod:`glm_common.memory_plan`) says whether a train/finetune run's layout fits the devices before anything
starts (one line in the plan; a plan that does not fit is refused, exit 2, unless ``--ignore-memory-plan``),
and :class:`glm_common.supervisor.Supervisor` runs the processes and stops them all when one fails, when the
launcher is told to stop and when it dies. Only the scheduler (``--scheduler TARGET``, started by the
launcher itself) imports MindSpore; the launcher process does not.

There is no ``torch_glm`` twin of this module: for PyTorch, ``torchrun`` is the launcher.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

from glm_common.run_lock import LOCK_TOKEN_ENV, OutputLock, OutputLocked
from glm_common.supervisor import Proc, Supervisor, describe, tail
from mindspore_glm.launch_plan import (RUN_STATUSES, LaunchError, Plan, build_plan, format_plan, free_port,
                                       memory_refusal, resolve_paths, write_run_config)

__all__ = ["LaunchError", "Proc", "Plan", "build_plan", "format_plan", "resolve_paths", "Supervisor",
           "free_port", "main", "RUN_STATUSES", "tail", "describe"]


def _scheduler(device_target: str) -> int:
    """The scheduler of a dynamic cluster (``MS_ROLE=MS_SCHED``): ``init()`` serves until the workers are done."""
    import mindspore as ms
    from mindspore.communication import init
    ms.set_context(device_target=device_target)
    init()
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--scheduler"]:
        return _scheduler(argv[1] if len(argv) > 1 else "CPU")
    try:
        plan, opts = build_plan(argv)
    except LaunchError as e:
        for line in e.errors:
            print(f"run_distribute: error: {line}", file=sys.stderr)
        print("run_distribute: see bash scripts/run_distribute.sh --help", file=sys.stderr)
        return 2
    print(format_plan(plan, dry_run=opts.dry_run), flush=True)
    if plan.memory is not None and plan.memory["fits"] is False:
        if not opts.ignore_memory_plan:
            for line in memory_refusal(plan.memory):
                print(f"run_distribute: error: {line}", file=sys.stderr)
            return 2
        print("run_distribute: --ignore-memory-plan: starting although the memory plan does not fit",
              file=sys.stderr, flush=True)
    if opts.dry_run:
        return 0
    lock = None
    try:
        if plan.lock_dir is not None:  # one lock for the run; rank 0 finds it held under its token
            lock = OutputLock(plan.lock_dir).acquire()
            for p in plan.procs:
                p.env[LOCK_TOKEN_ENV] = lock.token
        write_run_config(plan)
        sup = Supervisor(plan, grace=opts.grace, tail_lines=opts.tail)
        return sup.run()
    except OutputLocked as e:
        print(f"run_distribute: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output directory, or a command that cannot be started
        where = getattr(e, "filename", None)
        print(f"run_distribute: error: {where + ': ' if where else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()


if __name__ == "__main__":
    sys.exit(main())
