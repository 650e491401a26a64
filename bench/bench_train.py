"""Training throughput, MindSpore GRAPH train step vs torch_glm, side by side on the same inputs.

For the tiny config and a small one (4 layers x 256 wide), both backends get the same random weights and
the same batches and run full fine-tuning and LoRA updates (AdamWeightDecay, clip 1.0): MindSpore the
runner's ``TrainOneStepCell``, torch the trainer's optimizer with ``clip_grad_norm_``. Each backend runs in
its own process, both alive, and every step alternates between them (``bench/_sides.py``); after warm-up
steps (the GRAPH compile among them) the timed steps give tokens/s and the median per-step ratio.

    python bench/bench_train.py [--steps 20] [--batch 4] [--seq 128]
"""
from __future__ import annotations

import argparse
import sys
import warnings

import numpy as np



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


CONFIGS = ("tiny (2 x 64)", "small (4 x 256)")
PETS = ("full", "lora")


def configs() -> dict:
    from glm_common.config import preset
    return {"tiny (2 x 64)": preset("tiny"),
            "small (4 x 256)": preset("tiny", num_layers=4, hidden_size=256, ffn_hidden_size=688,
                                      num_attention_heads=8, kv_channels=32, padded_vocab_size=3072)}


def _batches(config, batch, seq, n):
    rng = np.random.default_rng(0)
    return [rng.integers(5, config.padded_vocab_size, (batch, seq)).astype(np.int64) for _ in range(n)]


def _cycle(step, data):
    """A task running ``step(*args)`` on the next argument tuple of ``data`` each call."""
    state = {"i": 0}

    def run():
        args = data[state["i"] % len(data)]
        state["i"] += 1
        return step(*args)
    return run


def _ms_tasks(batch, seq, n):
    import mindspore as ms
    from mindspore import Tensor
    from mindspore_glm.model import ChatGLM2ForConditionalGeneration
    from mindspore_glm.lora import apply_pet
    from mindspore_glm.train_step import TrainOneStepCell, make_optimizer
    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    tasks = {}
    for name, config in configs().items():
        data = [(Tensor(b.astype(np.int32)), Tensor(b.astype(np.int32))) for b in _batches(config, batch, seq, n)]
        for pet in PETS:
            model = ChatGLM2ForConditionalGeneration(config)
            model.load_weights(weights(config).items(), source="bench")
            s = settings(config, pet)
            model, params = apply_pet(model, s.pet)
            step = TrainOneStepCell(model, make_optimizer(params, s, np.full(100000, 1e-4, np.float32)), s)
            step.set_train(True)
            tasks[f"{name} {pet}"] = _cycle(lambda ids, lab, st=step: float(st(ids, lab)[0].asnumpy()), data)
    return tasks


def _torch_tasks(batch, seq, n):
    import torch
    from torch_glm.lora import apply_pet as pt_apply
    from torch_glm.model import ChatGLM2ForConditionalGeneration
    from torch_glm.train_step import make_optimizer
    tasks = {}
    for name, config in configs().items():
        data = [(torch.from_numpy(b),) for b in _batches(config, batch, seq, n)]
        for pet in PETS:
            model = ChatGLM2ForConditionalGeneration(config)
            model.load_state_dict({k: torch.from_numpy(v) for k, v in weights(config).items()}, strict=False)
            s = settings(config, pet)
            model, _ = pt_apply(model, s.pet)
            model.train()
            opt = make_optimizer([(k, p) for k, p in model.named_parameters() if p.requires_grad], s,
                                 np.full(100000, 1e-4, np.float32))
            params = [p for p in model.parameters() if p.requires_grad]

            def one(ids, model=model, opt=opt, params=params):
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                return loss.item()
            tasks[f"{name} {pet}"] = _cycle(one, data)
    return tasks


def main(argv=None) -> int:
    from _sides import Side, alternate, median, ratio
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps per backend and setup")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    args = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    n = args.warmup + args.steps
    sides = [Side("mindspore", _ms_tasks, args.batch, args.seq, n), Side("torch", _torch_tasks, args.batch, args.seq, n)]
    for s in sides:
        if not s.ready:
            raise SystemExit(f"{s.name} side failed: {s.status}")
    tokens = args.batch * args.seq
    print(f"batch {args.batch} x {args.seq} tokens, {args.steps} timed steps after {args.warmup} warm-up, CPU; "
          "the backends alternate step by step, ratio = median of per-step ratios")
    print(f"{'config':<18}{'method':<7}{'MindSpore tok/s':>17}{'torch tok/s':>13}{'ratio ms/torch':>16}{'cpu':>7}")
    try:
        for name in CONFIGS:
            for pet in PETS:
                task = f"{name} {pet}"
                alternate(sides, task, args.warmup)
                t = alternate(sides, task, args.steps)
                print(f"{name:<18}{pet:<7}{tokens / median(t['mindspore']):>17.0f}{tokens / median(t['torch']):>13.0f}"
                      f"{ratio(t, 'torch', 'mindspore'):>15.2f}x{ratio(t, 'torch', 'mindspore', 1):>6.2f}x")
    finally:
        for s in sides:
            s.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
