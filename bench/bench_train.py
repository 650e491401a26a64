"""Training throughput, MindSpore GRAPH train step vs torch_glm, side by side on the same inputs.

For the tiny config and a small one (4 layers x 256 wide), both backends get the same random weights and
the same batches and run full fine-tuning and LoRA updates (AdamWeightDecay, clip 1.0); after warm-up
steps (the GRAPH compile among them) the timed steps give tokens/s and the MindSpore/torch ratio.

    python bench/bench_train.py [--steps 20] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def weights(config, seed=0) -> dict:
    """HF-named float32 weights: norms 1, biases 0, the rest N(0, 0.02)."""
    from glm_common.names import hf_param_shapes
    rng = np.random.default_rng(seed)
    out = {}
    for name, shape in hf_param_shapes(config).items():
        if "layernorm" in name:
            out[name] = np.ones(shape, np.float32)
        elif name.endswith("bias"):
            out[name] = np.zeros(shape, np.float32)
        else:
            out[name] = rng.normal(0, 0.02, shape).astype(np.float32)
    return out


def settings(config, pet):
    from glm_common.run_config import TrainSettings
    s = TrainSettings(config=config)
    s.pet = {"pet_type": pet, "r": 8, "lora_alpha": 32.0, "lora_dropout": 0.0, "target_modules": ".*query_key_value"} \
        if pet == "lora" else {"pet_type": "full"}
    s.learning_rate, s.weight_decay = 1e-4, 0.1
    return s


def bench_ms(config, w, batches, pet, warm) -> float:
    import mindspore as ms
    from mindspore import Tensor
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration
    from mindspore_glm.train import TrainOneStepCell, apply_pet, make_optimizer
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    model = ChatGLM2ForConditionalGeneration(config)
    model.load_weights(w.items(), source="bench")
    s = settings(config, pet)
    params = apply_pet(model, s.pet)
    step = TrainOneStepCell(model, make_optimizer(params, s, np.full(len(batches) + 1, 1e-4, np.float32)), s)
    step.set_train(True)
    data = [(Tensor(b.astype(np.int32)), Tensor(b.astype(np.int32))) for b in batches]
    for ids, lab in data[:warm]:
        step(ids, lab)[0].asnumpy()
    t = time.perf_counter()
    for ids, lab in data[warm:]:
        step(ids, lab)[0].asnumpy()
    return time.perf_counter() - t


def bench_torch(config, w, batches, pet, warm) -> float:
    import torch
    from torch_glm.lora import apply_pet as pt_apply
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    from torch_glm.train import make_optimizer
    model = ChatGLM2ForConditionalGeneration(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()}, strict=False)
    s = settings(config, pet)
    model = pt_apply(model, s.pet)
    model.train()
    opt = make_optimizer(model, s)
    params = [p for p in model.parameters() if p.requires_grad]
    data = [torch.from_numpy(b) for b in batches]

    def one(ids):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    for ids in data[:warm]:
        one(ids)
    t = time.perf_counter()
    for ids in data[warm:]:
        one(ids)
    return time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    from glm_common.config import preset
    configs = {"tiny (2 x 64)": preset("tiny"),
               "small (4 x 256)": preset("tiny", num_layers=4, hidden_size=256, ffn_hidden_size=688,
                                         num_attention_heads=8, kv_channels=32, padded_vocab_size=3072)}
    rng = np.random.default_rng(0)
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after {args.warmup} warm-up, CPU")
    print(f"{'config':<18}{'method':<7}{'MindSpore tok/s':>17}{'torch tok/s':>13}{'ratio ms/torch':>16}")
    for name, config in configs.items():
        w = weights(config)
        batches = [rng.integers(5, config.padded_vocab_size, (args.batch, args.seq)).astype(np.int64)
                   for _ in range(args.warmup + args.steps)]
        tokens = args.steps * args.batch * args.seq
        for pet in ("full", "lora"):
            t_ms = bench_ms(config, w, batches, pet, args.warmup)
            t_pt = bench_torch(config, w, batches, pet, args.warmup)
            print(f"{name:<18}{pet:<7}{tokens / t_ms:>17.0f}{tokens / t_pt:>13.0f}{t_pt / t_ms:>16.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
