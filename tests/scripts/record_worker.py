"""``python -m mindspore_glm.run`` that also records the training rows each batch holds (launcher tests).

Appends ``{"epoch", "k", "rows"}`` to ``$RECORD_DIR/rows_<RANK_ID or single>.jsonl`` for every batch
the data pipeline builds, then runs :func:`mindspore_glm.run.main` on the same arguments.
``RECORD_CRASH_RANK`` + ``RECORD_CRASH_EPOCH`` + ``RECORD_CRASH_BATCH``: that rank dies (exit 1) when that
batch is built, mid-training (batches are built ahead of the step that uses them, within an epoch).
"""
import json
import os
import sys

from glm_common.data import batching


def main() -> int:
    path = os.path.join(os.environ["RECORD_DIR"], f"rows_{os.environ.get('RANK_ID', 'single')}.jsonl")
    original = batching.Batcher.batch

    def batch(self, k, epoch=None):
        e = self.epoch if epoch is None else int(epoch)
        if os.environ.get("RECORD_CRASH_RANK") == os.environ.get("RANK_ID") \
                and (e, int(k)) == (int(os.environ.get("RECORD_CRASH_EPOCH", "0")),
                                    int(os.environ.get("RECORD_CRASH_BATCH", "-1"))):
            print(f"injected crash at epoch {e} batch {k}", file=sys.stderr, flush=True)
            os._exit(1)
        rows, _ = self.plan(e)[k]
        with open(path, "a") as f:
            f.write(json.dumps({"epoch": e, "k": int(k), "rows": [int(r) for r in rows]}) + "\n")
        return original(self, k, epoch)

    batching.Batcher.batch = batch
    from mindspore_glm.run import main as run_main
    return run_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
