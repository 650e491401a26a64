"""Adapters trained in torch, converted with convert/adapters.py, run in MindSpore: the same numbers.

LoRA: a peft adapter (query_key_value and dense_h_to_4h, r 4, alpha 8) trained a few AdamW steps in
torch so that B is far from zero, saved as a peft directory, converted with ``peft_to_ms``, applied
with ``mindspore_glm.lora``: logits, loss, LoRA gradients, greedy tokens; back with ``ms_to_peft``; and
merged with ``merge`` (HF directory for torch, ``.ckpt`` for MindSpore).
P-tuning v2: a prefix (plain, and with ``prefix_projection``) trained in torch, saved as ChatGLM2's
P-tuning checkpoint, converted with ``prefix_to_ms``, loaded in MindSpore; back with ``ms_to_prefix``.
"""
import numpy as np
import pytest
import mindspore as ms
import torch

from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL
from tests.parity.helpers import (BATCH_KEYS, golden, grad_diffs, masked_max_diff, ms_step, ms_tensors,
                                  torch_step)

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
ATOL = 1e-4
R, ALPHA, TARGETS = 4, 8.0, ["query_key_value", "dense_h_to_4h"]


def _kw(g):
    """The golden batch as torch keyword arguments (peft models need keywords)."""
    return dict(input_ids=torch.as_tensor(g["batch_input_ids"]), attention_mask=torch.as_tensor(g["batch_attention_mask"]),
                position_ids=torch.as_tensor(g["batch_position_ids"]))


def _train_torch(model, g, steps=3, lr=1e-2):
    """A few AdamW steps on the golden batch (only the trainable parameters move)."""
    torch.manual_seed(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        opt.zero_grad()
        model(**_kw(g), labels=torch.as_tensor(g["batch_labels"])).loss.backward()
        opt.step()
    model.eval()


def _load_ckpt(model, path):
    """Load a MindSpore .ckpt's tensors into ``model`` (names checked); return the names loaded."""
    items = ((n, p.asnumpy()) for n, p in ms.load_checkpoint(str(path)).items())
    return model.load_weights(items, source=str(path), strict=False)


# ---------------------------------------------------------------------------------------- LoRA
@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    from convert.adapters import peft_to_ms, read_pet_config
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from mindspore_glm.lora import apply_lora as ms_apply_lora
    from torch_glm.lora import apply_lora, save_lora
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    tmp = tmp_path_factory.mktemp("lora")
    g = golden(TINY_MODEL)
    pt = apply_lora(PTModel.from_pretrained(TINY_MODEL), r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS)
    _train_torch(pt, g)
    save_lora(pt, tmp / "peft")
    peft_to_ms(str(tmp / "peft"), str(tmp / "lora.ckpt"), str(tmp / "pet.yaml"))
    pet = read_pet_config(str(tmp / "pet.yaml"))
    msm = MSModel.from_pretrained(TINY_MODEL)
    msm.set_train(False)
    trainable = ms_apply_lora(msm, r=int(pet["lora_rank"]), lora_alpha=float(pet["lora_alpha"]),
                              lora_dropout=float(pet["lora_dropout"]), target_modules=pet["target_modules"])
    loaded = _load_ckpt(msm, tmp / "lora.ckpt")
    assert loaded == {p.name for p in trainable} and len(loaded) == 2 * 2 * len(TARGETS)
    return dict(tmp=tmp, g=g, pt=pt, ms=msm, pet=pet)


def test_lora_b_trained(lora):
    bs = [p.detach().abs().max().item() for n, p in lora["pt"].named_parameters() if "lora_B" in n]
    assert len(bs) == 2 * len(TARGETS) and min(bs) > 1e-3     # B moved away from its zero start


def test_lora_logits_loss_gradients(lora):
    g = lora["g"]
    pt_logits, pt_loss, pt_grads = torch_step(lora["pt"], g)
    ms_logits, ms_loss, ms_grads = ms_step(lora["ms"], g)
    mask = g["batch_attention_mask"]
    assert masked_max_diff(pt_logits, ms_logits, mask) < ATOL
    assert masked_max_diff(pt_logits, g["batch_logits"], mask) > 1e-2       # the adapter changes the output
    assert abs(pt_loss - ms_loss) < 1e-5 * pt_loss
    assert pt_loss < float(g["batch_loss"]) - 0.05                            # and it was trained on this batch
    diffs = grad_diffs(pt_grads, ms_grads)                                    # lora_A and lora_B of 4 layers
    assert len(diffs) == 2 * 2 * len(TARGETS)
    for name, (diff, scale) in diffs.items():
        assert scale > 0 and diff <= 1e-5 * scale, f"{name}: {diff:.3g} (max |grad| {scale:.3g})"


def test_lora_greedy(lora):
    g = lora["g"]
    ids, mask, pos = (g[k].astype(np.int64) for k in ("greedy_batch_prompt", "greedy_batch_attention_mask",
                                                      "greedy_batch_position_ids"))
    base = lora["pt"].get_base_model()          # peft injects the LoRA layers into it
    want = base.generate(torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), position_ids=torch.as_tensor(pos),
                         max_new_tokens=8, eos_token_id=-1)[:, ids.shape[1]:].numpy()
    assert not np.array_equal(want, g["greedy_batch_new"][:, :8])        # the adapter changes the tokens
    got = lora["ms"].generate(ids, attention_mask=mask, position_ids=pos, max_new_tokens=8, eos_token_id=[])
    np.testing.assert_array_equal(got[:, ids.shape[1]:], want)


def test_lora_back_to_peft(lora):
    """MindSpore LoRA .ckpt -> ms_to_peft -> peft.PeftModel on a fresh torch model: the same logits."""
    from convert.adapters import ms_to_peft
    from torch_glm.lora import load_lora
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    tmp, g = lora["tmp"], lora["g"]
    ms_to_peft(str(tmp / "lora.ckpt"), str(tmp / "pet.yaml"), str(tmp / "peft_back"))
    again = load_lora(PTModel.from_pretrained(TINY_MODEL), tmp / "peft_back")
    with torch.no_grad():
        a = again(**_kw(g)).logits.numpy()
    b = lora["ms"](*ms_tensors(g, BATCH_KEYS[:3])).asnumpy()
    assert masked_max_diff(a, b, g["batch_attention_mask"]) < ATOL


def test_lora_merged(lora):
    """``merge`` folds the adapter into the base: torch on the merged HF directory and MindSpore on the
    merged .ckpt give the unmerged LoRA logits."""
    from convert.adapters import merge
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    tmp, g = lora["tmp"], lora["g"]
    merge(str(TINY_MODEL), str(tmp / "merged_hf"), adapter=str(tmp / "peft"), progress=False)
    merge(str(TINY_MODEL), str(tmp / "merged.ckpt"), adapter=str(tmp / "lora.ckpt"),
          pet_config=str(tmp / "pet.yaml"), progress=False)
    mask = g["batch_attention_mask"]
    with torch.no_grad():
        want = lora["pt"](**_kw(g)).logits.numpy()
        pt_merged = PTModel.from_pretrained(tmp / "merged_hf")(**_kw(g)).logits.numpy()
    ms_merged = MSModel.from_pretrained(str(tmp / "merged.ckpt"), config=lora["ms"].config)
    ms_merged.set_train(False)
    got = ms_merged(*ms_tensors(g, BATCH_KEYS[:3])).asnumpy()
    assert masked_max_diff(pt_merged, want, mask) < ATOL
    assert masked_max_diff(got, want, mask) < ATOL


# ---------------------------------------------------------------------------------------- P-tuning v2
@pytest.mark.parametrize("projection", [False, True], ids=["embedding", "projection"])
def test_prefix_trained_in_torch_runs_in_mindspore(tmp_path, projection):
    from safetensors.torch import save_file
    from convert.adapters import ms_to_prefix, prefix_to_ms
    from glm_common.config import ChatGLM2Config
    from mindspore_glm import ChatGLM2ForConditionalGeneration as MSModel
    from torch_glm.lora import apply_ptuning
    from torch_glm.model import ChatGLM2ForConditionalGeneration as PTModel
    from torch_glm.prefix import load_prefix, prefix_state_dict
    g = golden(TINY_PTUNING_MODEL)
    config = ChatGLM2Config.from_hf(TINY_PTUNING_MODEL).replace(prefix_projection=projection)
    pt = apply_ptuning(PTModel.from_pretrained(TINY_PTUNING_MODEL, config=config, strict=False))
    _train_torch(pt, g)
    save_file({k: v.contiguous() for k, v in prefix_state_dict(pt).items()}, str(tmp_path / "prefix.safetensors"))
    prefix_to_ms(str(tmp_path / "prefix.safetensors"), str(tmp_path / "prefix.ckpt"))

    msm = MSModel.from_pretrained(TINY_PTUNING_MODEL, config=config, strict=False)
    msm.set_train(False)
    loaded = _load_ckpt(msm, tmp_path / "prefix.ckpt")
    assert len(loaded) == (5 if projection else 1)
    pt_logits, pt_loss, pt_grads = torch_step(pt, g)
    from mindspore_glm.prefix import freeze_base
    freeze_base(msm)
    ms_logits, ms_loss, ms_grads = ms_step(msm, g)
    mask = g["batch_attention_mask"]
    assert masked_max_diff(pt_logits, ms_logits, mask) < ATOL
    assert masked_max_diff(pt_logits, g["batch_logits"], mask) > 1e-3        # trained: not the golden prefix
    assert abs(pt_loss - ms_loss) < 1e-5 * pt_loss
    for name, (diff, scale) in grad_diffs(pt_grads, ms_grads).items():
        assert scale > 0 and diff <= 1e-5 * scale, f"{name}: {diff:.3g} (max |grad| {scale:.3g})"

    # and back: MindSpore prefix .ckpt -> HF P-tuning checkpoint -> torch
    ms_to_prefix(str(tmp_path / "prefix.ckpt"), str(tmp_path / "back"))
    fresh = PTModel.from_pretrained(TINY_PTUNING_MODEL, config=config, strict=False)
    load_prefix_file = next(p for p in (tmp_path / "back").iterdir() if p.suffix in (".bin", ".safetensors"))
    if load_prefix_file.suffix == ".bin":
        state = torch.load(load_prefix_file, weights_only=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "back.safetensors"))
        load_prefix_file = tmp_path / "back.safetensors"
    load_prefix(fresh, load_prefix_file)
    with torch.no_grad():
        again = fresh(**_kw(g)).logits.numpy()
    assert masked_max_diff(again, pt_logits, mask) < ATOL
