"""The shared data pipeline: data files -> samples -> token features -> batches, numpy only.

Both backends train on exactly these arrays (``torch_glm.data`` and ``mindspore_glm.data`` only wrap
:class:`Batcher`), so the same seed gives byte-identical batches in both.

Usage::

    from glm_common.tokenizer import ChatGLM2Tokenizer
    from glm_common.data import load_samples, build_train_features, build_eval_features, Batcher

    tok = ChatGLM2Tokenizer.from_pretrained("chatglm2-6b")
    samples = load_samples("AdvertiseGen/train.json")            # format detected from the first row
    feats = build_train_features(samples, tok, mode="official",  # or "rounds"
                                 max_source_length=64, max_target_length=128)
    # feats["input_ids"], feats["labels"]: int64 [N, 64 + 128 + 1]; feats["lengths"]: int64 [N]
    batcher = Batcher(feats, batch_size=8, shuffle=True, seed=42, rank=0, world_size=1,
                      padding="max_length")                       # or "bucket" (dynamic, length-sorted)
    for epoch in range(2):
        batcher.set_epoch(epoch)
        for batch in batcher:                                     # {"input_ids": [8, S], "labels": [8, S]}
            ...

    dev = build_eval_features(load_samples("AdvertiseGen/dev.json"), tok, max_source_length=64)
    # dev["input_ids"/"attention_mask"/"position_ids"]: int64 [N, 64], left-padded; dev["answers"]: list[str]

    # backends: torch_glm.data.make_dataloader(feats, 8, seed=42)  /  mindspore_glm.data.make_dataset(feats, 8, seed=42)

Command line: ``python -m glm_common.data check|stats|features FILE ...`` (see ``--help``).
Modules: :mod:`.formats` (files and formats, bad-row reports), :mod:`.features` (token features and
truncation modes), :mod:`.batching` (padding, shuffling, sharding).
"""
from glm_common.data.formats import (FORMATS, BadRow, DataError, Round, Sample, detect_format,
                                     load_samples, read_samples)
from glm_common.data.features import (IGNORE_INDEX, MODES, build_eval_features, build_train_features,
                                      length_stats, load_features, save_features)
from glm_common.data.batching import PADDINGS, Batcher, iterate_batches

__all__ = ["FORMATS", "BadRow", "DataError", "Round", "Sample", "detect_format", "load_samples",
           "read_samples", "IGNORE_INDEX", "MODES", "build_eval_features", "build_train_features",
           "length_stats", "load_features", "save_features", "PADDINGS", "Batcher", "iterate_batches"]
