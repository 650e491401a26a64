"""torch_glm.model against the golden vectors of the reference ChatGLM2 (float32, CPU)."""
import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL
from torch_glm import ChatGLM2ForConditionalGeneration
from torch_glm.model import WeightError
from torch_glm.prefix import freeze_base

MODELS = {"tiny_glm2": TINY_MODEL, "tiny_glm2_ptuning": TINY_PTUNING_MODEL}


def golden(path):
    g = np.load(path / "golden.npz")
    return {k: torch.from_numpy(g[k]) for k in g.files}


def batch_kwargs(g, labels=True):
    kw = dict(input_ids=g["batch_input_ids"], attention_mask=g["batch_attention_mask"],
              position_ids=g["batch_position_ids"])
    if labels:
        kw["labels"] = g["batch_labels"]
    return kw


@pytest.fixture(scope="module", params=list(MODELS))
def loaded(request):
    path = MODELS[request.param]
    return request.param, path, ChatGLM2ForConditionalGeneration.from_pretrained(path), golden(path)


def test_batch_logits_and_loss(loaded):
    _, _, model, g = loaded
    with torch.no_grad():
        out = model(**batch_kwargs(g))
    mask = g["batch_attention_mask"].bool()
    err = (out.logits - g["batch_logits"]).abs()[mask].max().item()
    assert err <= 1e-4, err
    assert out.loss.dtype == torch.float32
    assert abs(out.loss.item() - g["batch_loss"].item()) <= 1e-5 * abs(g["batch_loss"].item())


def test_single_logits_causal_path(loaded):
    _, _, model, g = loaded
    with torch.no_grad():
        out = model(input_ids=g["single_input_ids"])
    assert (out.logits - g["single_logits"]).abs().max().item() <= 1e-4


def test_grad_norms(loaded):
    name, path, _, g = loaded
    model = ChatGLM2ForConditionalGeneration.from_pretrained(path)  # eval mode, fresh grads
    expected = json.loads((path / "grad_norms.json").read_text())
    if name.endswith("ptuning"):
        freeze_base(model)
        assert [n for n, p in model.named_parameters() if p.requires_grad] == list(expected)
    model(**batch_kwargs(g)).loss.backward()
    got = {n: p.grad.norm().item() for n, p in model.named_parameters() if p.grad is not None}
    assert sorted(got) == sorted(expected)
    for n, v in expected.items():
        assert abs(got[n] - v) <= 1e-4 * abs(v), (n, got[n], v)


def test_gradient_checkpointing_same_grads():
    g = golden(TINY_MODEL)
    grads = []
    for ckpt in (False, True):
        model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
        model.train()  # dropouts are 0 in the tiny config: train mode is deterministic
        if ckpt:
            model.gradient_checkpointing_enable()
        model(**batch_kwargs(g)).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7)


def test_greedy_single_and_batched(loaded):
    _, _, model, g = loaded
    prompt = g["greedy_single_prompt"]
    out = model.generate(prompt, max_new_tokens=g["greedy_single_new"].shape[1], eos_token_id=-1)
    assert torch.equal(out[:, :prompt.shape[1]], prompt)
    assert torch.equal(out[:, prompt.shape[1]:], g["greedy_single_new"])
    prompt = g["greedy_batch_prompt"]
    out = model.generate(prompt, attention_mask=g["greedy_batch_attention_mask"],
                         position_ids=g["greedy_batch_position_ids"],
                         max_new_tokens=g["greedy_batch_new"].shape[1], eos_token_id=-1)
    assert torch.equal(out[:, prompt.shape[1]:], g["greedy_batch_new"])
    # position ids derived from the mask are the tokenizer's: same tokens without passing them
    out2 = model.generate(prompt, attention_mask=g["greedy_batch_attention_mask"],
                          max_new_tokens=g["greedy_batch_new"].shape[1], eos_token_id=-1)
    assert torch.equal(out, out2)


def test_kv_cache_matches_full_forward():
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_PTUNING_MODEL)
    g = golden(TINY_PTUNING_MODEL)
    kw = batch_kwargs(g, labels=False)
    with torch.no_grad():
        full = model(**kw).logits
        first = model(input_ids=kw["input_ids"][:, :20], attention_mask=kw["attention_mask"][:, :20],
                      position_ids=kw["position_ids"][:, :20], use_cache=True)
        assert len(first.past_key_values) == 2 and first.past_key_values[0][0].shape == (2, 2, 4 + 20, 16)
        rest = model(input_ids=kw["input_ids"][:, 20:], attention_mask=kw["attention_mask"],
                     position_ids=kw["position_ids"][:, 20:], past_key_values=first.past_key_values, use_cache=True)
    torch.testing.assert_close(rest.logits, full[:, 20:], rtol=0, atol=1e-5)


# Measured on the golden batch (tokens where batch_attention_mask is 1; logits span about +-5.3):
#   float16 : max |logit - fp32 golden| = 0.0051, top-1 agreement 100%, loss 9.00222 vs 9.00198
#   bfloat16: max |logit - fp32 golden| = 0.0452, top-1 agreement 100%, loss 8.99958 vs 9.00198
@pytest.mark.parametrize("dtype,max_err,min_top1", [("float16", 0.02, 1.0), ("bfloat16", 0.1, 0.99)])
def test_half_precision_close_to_float32(dtype, max_err, min_top1):
    g = golden(TINY_MODEL)
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL, torch_dtype=dtype)
    assert model.dtype == getattr(torch, dtype)
    with torch.no_grad():
        out = model(**batch_kwargs(g))
    assert out.logits.dtype == getattr(torch, dtype)
    mask = g["batch_attention_mask"].bool()
    logits = out.logits.float()
    err = (logits - g["batch_logits"]).abs()[mask].max().item()
    top1 = (logits.argmax(-1) == g["batch_logits"].argmax(-1))[mask].float().mean().item()
    assert err <= max_err and top1 >= min_top1, (err, top1)
    assert abs(out.loss.item() - g["batch_loss"].item()) <= 5e-3 * g["batch_loss"].item()


# ---------------------------------------------------------------------------------------- layouts
def _copy_config(dst, src=TINY_MODEL):
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")


def _split(state, n):
    names = list(state)
    return [{k: state[k] for k in names[i::n]} for i in range(n)]


def _write_index(path, shards, files):
    total = sum(t.numel() * t.element_size() for s in shards for t in s.values())
    index = {"metadata": {"total_size": total}, "weight_map": {k: f for s, f in zip(shards, files) for k in s}}
    path.write_text(json.dumps(index))


def _assert_golden_logits(model):
    g = golden(TINY_MODEL)
    with torch.no_grad():
        out = model(**batch_kwargs(g))
    mask = g["batch_attention_mask"].bool()
    assert (out.logits - g["batch_logits"]).abs()[mask].max().item() <= 1e-4


def test_load_sharded_safetensors(tmp_path):
    state = load_file(TINY_MODEL / "model.safetensors")
    shards = _split(state, 3)
    files = [f"model-{i + 1:05d}-of-00003.safetensors" for i in range(3)]
    for s, f in zip(shards, files):
        save_file(s, tmp_path / f, metadata={"format": "pt"})
    _write_index(tmp_path / "model.safetensors.index.json", shards, files)
    _copy_config(tmp_path)
    _assert_golden_logits(ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path))


def test_load_sharded_bin_with_inv_freq(tmp_path):
    state = load_file(TINY_MODEL / "model.safetensors")
    shards = _split(state, 2)
    # old ChatGLM2 .bin files carry the rotary inv_freq buffer: derived, to be ignored
    shards[0]["transformer.rotary_pos_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, 8, 2).float() / 8))
    files = [f"pytorch_model-{i + 1:05d}-of-00002.bin" for i in range(2)]
    for s, f in zip(shards, files):
        torch.save(s, tmp_path / f)
    _write_index(tmp_path / "pytorch_model.bin.index.json", shards, files)
    _copy_config(tmp_path)
    _assert_golden_logits(ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path))


def test_load_single_bin(tmp_path):
    torch.save(load_file(TINY_MODEL / "model.safetensors"), tmp_path / "pytorch_model.bin")
    _copy_config(tmp_path)
    _assert_golden_logits(ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path))


def test_load_single_safetensors_in_each_dtype():
    for dtype in ("float32", torch.float16, "bfloat16"):
        model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL, torch_dtype=dtype)
        assert all(p.dtype == model.dtype for p in model.parameters())


@pytest.mark.parametrize("safe,shard", [(True, None), (True, 200_000), (False, 200_000)])
def test_save_pretrained_round_trip(tmp_path, safe, shard):
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_PTUNING_MODEL)
    files = model.save_pretrained(tmp_path, max_shard_size=shard, safe_serialization=safe)
    assert (len(files) > 1) == (shard is not None)
    if shard is not None:
        index = json.loads((tmp_path / ("model.safetensors.index.json" if safe else
                                        "pytorch_model.bin.index.json")).read_text())
        assert set(index["weight_map"]) == set(model.state_dict())
        assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in model.state_dict().values())
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["pre_seq_len"] == 4 and cfg["model_type"] == "chatglm"
    again = ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path)
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k
    assert not list(tmp_path.glob("*.tmp"))


def test_load_errors(tmp_path):
    with pytest.raises(WeightError, match="no weights found"):
        _copy_config(tmp_path / "empty")
        ChatGLM2ForConditionalGeneration.from_pretrained(tmp_path / "empty")
    state = load_file(TINY_MODEL / "model.safetensors")

    bad = tmp_path / "missing_shard"
    _copy_config(bad)
    shards = _split(state, 2)
    files = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    save_file(shards[0], bad / files[0])
    _write_index(bad / "model.safetensors.index.json", shards, files)
    with pytest.raises(WeightError, match="model-00002-of-00002.safetensors.*missing"):
        ChatGLM2ForConditionalGeneration.from_pretrained(bad)

    for case, edit, pattern in [
        ("unknown", lambda s: s.update({"transformer.extra.weight": torch.zeros(2)}), "transformer.extra.weight: unknown"),
        ("missing", lambda s: s.pop("transformer.output_layer.weight"), "transformer.output_layer.weight: missing"),
        ("shape", lambda s: s.update({"transformer.encoder.final_layernorm.weight": torch.ones(3)}),
         r"final_layernorm.weight: shape \[3\], expected \[64\]"),
    ]:
        d = tmp_path / case
        _copy_config(d)
        s = dict(state)
        edit(s)
        save_file(s, d / "model.safetensors")
        with pytest.raises(WeightError, match=pattern) as e:
            ChatGLM2ForConditionalGeneration.from_pretrained(d)
        assert "\n" not in str(e.value) and str(d) in str(e.value)


def test_prefix_config_on_base_checkpoint():
    """A base checkpoint loaded with pre_seq_len set: prefix weights are initialised, the base is the checkpoint's."""
    from glm_common.config import ChatGLM2Config
    cfg = ChatGLM2Config.from_hf(TINY_MODEL).replace(pre_seq_len=3)
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL, config=cfg)
    assert model.transformer.prefix_encoder.embedding.weight.shape == (3, 2 * 2 * 2 * 16)
    assert torch.isfinite(model.transformer.prefix_encoder.embedding.weight).all()
    base = load_file(TINY_MODEL / "model.safetensors")
    assert torch.equal(model.state_dict()["transformer.output_layer.weight"], base["transformer.output_layer.weight"])


def test_without_multi_query_heads_are_interleaved():
    """Without MQA the fused output is [np, 3*hn] per head; permuted into [q | k | v] blocks, the same
    weights in the (golden-checked) grouped layout with g = np give the same logits."""
    from glm_common.config import ChatGLM2Config
    base = ChatGLM2Config.from_hf(TINY_MODEL)
    plain_cfg = base.replace(multi_query_attention=False)
    grouped_cfg = base.replace(multi_query_attention=True, multi_query_group_num=base.num_attention_heads)
    torch.manual_seed(0)
    plain = ChatGLM2ForConditionalGeneration(plain_cfg).eval()
    grouped = ChatGLM2ForConditionalGeneration(grouped_cfg).eval()
    nh, hn = base.num_attention_heads, base.kv_channels
    order = torch.arange(nh * 3 * hn).view(nh, 3, hn).transpose(0, 1).reshape(-1)  # [q_h..., k_h..., v_h...]
    state = plain.state_dict()
    for k, v in list(state.items()):
        if "query_key_value" in k:
            state[k] = v[order]
    grouped.load_state_dict(state)
    g = golden(TINY_MODEL)
    with torch.no_grad():
        a = plain(**batch_kwargs(g)).logits
        b = grouped(**batch_kwargs(g)).logits
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
