"""torch_glm speed on a small ChatGLM2 config (CPU by default): training and KV-cache decoding.

Prints, side by side in one run:
* training tokens/s (forward + backward + AdamW), plain vs gradient checkpointing;
* decode tokens/s with the KV cache vs recomputing the whole sequence each step;
* cached decode time per token at context 16 vs 512 (the cache must keep it flat: ratio <= 1.5).

    python bench/bench_torch.py [--threads 2] [--device cpu] [--steps 5] [--new_tokens 32]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


from glm_common.config import ChatGLM2Config  # noqa: E402
from torch_glm import ChatGLM2ForConditionalGeneration  # noqa: E402

SMALL = dict(num_layers=4, hidden_size=256, ffn_hidden_size=688, num_attention_heads=8, kv_channels=32,
             multi_query_attention=True, multi_query_group_num=2, padded_vocab_size=4096, seq_length=2048,
             add_qkv_bias=True, torch_dtype="float32")


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def train_tokens_per_s(model, device, batch, seq, steps, checkpointing):
    model.train()
    if checkpointing:
        model.gradient_checkpointing_enable()
    else:
        model.gradient_checkpointing_disable()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model.config.padded_vocab_size, (batch, seq), device=device)
    times = []
    for i in range(steps + 1):
        sync(device)
        t = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync(device)
        if i:  # first step warms up
            times.append(time.perf_counter() - t)
    model.gradient_checkpointing_disable()
    return batch * seq / statistics.median(times)


@torch.no_grad()
def decode_per_token(model, device, context, new_tokens, cached=True):
    """Median seconds per new token after a ``context``-token prompt (greedy, batch 1)."""
    model.eval()
    ids = torch.randint(0, model.config.padded_vocab_size, (1, context), device=device)
    out = model(input_ids=ids, use_cache=True, return_last_logit=True)
    past, nxt = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
    times = []
    for k in range(new_tokens):
        sync(device)
        t = time.perf_counter()
        if cached:
            pos = torch.tensor([[context + k]], device=device)
            out = model(input_ids=nxt, position_ids=pos, past_key_values=past, use_cache=True)
            past = out.past_key_values
        else:
            ids = torch.cat([ids, nxt], dim=1)
            out = model(input_ids=ids, return_last_logit=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times[2:] if len(times) > 4 else times)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--new_tokens", type=int, default=32)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = ChatGLM2Config.from_dict(SMALL)
    model = ChatGLM2ForConditionalGeneration(config).to(args.device)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"config: {SMALL}")
    print(f"params: {n_params / 1e6:.2f}M  device: {args.device}  threads: {torch.get_num_threads()}  "
          f"torch {torch.__version__}")

    plain = train_tokens_per_s(model, args.device, args.batch, args.seq, args.steps, checkpointing=False)
    ckpt = train_tokens_per_s(model, args.device, args.batch, args.seq, args.steps, checkpointing=True)
    print(f"train  batch {args.batch} x seq {args.seq}: {plain:9.0f} tokens/s   "
          f"with gradient checkpointing {ckpt:9.0f} tokens/s   ratio {plain / ckpt:.2f}x")

    cached = {c: decode_per_token(model, args.device, c, args.new_tokens, cached=True) for c in (16, 512)}
    recompute = decode_per_token(model, args.device, 512, min(args.new_tokens, 8), cached=False)
    print(f"decode context 512: KV cache {1 / cached[512]:8.1f} tokens/s   recompute {1 / recompute:8.1f} tokens/s   "
          f"ratio {recompute / cached[512]:.1f}x")
    ratio = cached[512] / cached[16]
    print(f"decode per token (KV cache): context 16 {cached[16] * 1e3:.2f} ms   context 512 {cached[512] * 1e3:.2f} ms   "
          f"ratio {ratio:.2f}x ({'ok' if ratio <= 1.5 else 'SLOWER THAN 1.5x'})")
    return 0 if ratio <= 1.5 else 1


if __name__ == "__main__":
    sys.exit(main())
