"""LoRA (against plain-numpy merged weights) and the P-tuning v2 prefix encoder."""
import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from glm_common.config import ChatGLM2Config
from mindspore_glm import ChatGLM2ForConditionalGeneration
from mindspore_glm.lora import apply_lora, lora_layers, merge_lora, unmerge_lora
from mindspore_glm.prefix import PrefixEncoder, freeze_base
from tests.conftest import TINY_MODEL, TINY_PTUNING_MODEL

ms.set_context(mode=ms.PYNATIVE_MODE, device_target="CPU")
RANK, ALPHA = 4, 8.0


def _ids():
    g = np.load(TINY_MODEL / "golden.npz")
    return [Tensor(g[k].astype(np.int32)) for k in ("batch_input_ids", "batch_attention_mask", "batch_position_ids")]


@pytest.fixture(scope="module")
def lora_model():
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    model.set_train(False)
    trainable = apply_lora(model, r=RANK, lora_alpha=ALPHA, lora_dropout=0.0)
    rng = np.random.default_rng(7)
    for p in trainable:   # B starts at zero; give it values so the update is visible
        if p.name.endswith("_b"):
            p.set_data(Tensor(rng.normal(0, 0.2, p.shape).astype(np.float32)))
    return model


def test_lora_names_and_trainable(lora_model):
    names = {p.name: p.shape for p in lora_model.trainable_params()}
    assert names == {
        f"transformer.encoder.layers.{i}.self_attention.query_key_value.mindpet_delta_lora_{ab}":
            shape for i in range(2) for ab, shape in (("a", (RANK, 64)), ("b", (128, RANK)))}
    assert all(not p.requires_grad for p in lora_model.get_parameters() if "lora" not in p.name)


def test_lora_matches_numpy_merged_weights(lora_model):
    """Unmerged LoRA logits == logits of a plain model whose weights are W + alpha/r * B @ A (numpy)."""
    params = {p.name: p.asnumpy() for p in lora_model.get_parameters()}
    plain = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)
    for p in plain.get_parameters():
        if p.name.endswith("query_key_value.weight"):
            base = p.name[:-len(".weight")]
            a = params[base + ".mindpet_delta_lora_a"].astype(np.float64)
            b = params[base + ".mindpet_delta_lora_b"].astype(np.float64)
            p.set_data(Tensor((params[p.name].astype(np.float64) + ALPHA / RANK * b @ a).astype(np.float32)))
    want = plain(*_ids()).asnumpy()
    got = lora_model(*_ids()).asnumpy()
    assert np.abs(got - want).max() < 1e-4
    base_logits = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL)(*_ids()).asnumpy()
    assert np.abs(got - base_logits).max() > 1e-2   # the adapter changes the output


def test_merge_unmerge(lora_model):
    before = lora_model(*_ids()).asnumpy()
    w0 = lora_model.transformer.encoder.layers[0].self_attention.query_key_value.weight.asnumpy().copy()
    assert merge_lora(lora_model) == 2
    merged = lora_model(*_ids()).asnumpy()
    assert np.abs(merged - before).max() < 1e-4
    assert all(c.lora_merged for c in lora_layers(lora_model).values())
    assert unmerge_lora(lora_model) == 2
    w1 = lora_model.transformer.encoder.layers[0].self_attention.query_key_value.weight.asnumpy()
    assert np.abs(w1 - w0).max() < 1e-6
    assert np.abs(lora_model(*_ids()).asnumpy() - before).max() < 1e-5


def test_lora_training_step_graph(lora_model):
    """GRAPH-compiled training step (gradient + SGD inside the graph): only the LoRA matrices get
    gradients and move, and the loss goes down."""
    g = np.load(TINY_MODEL / "golden.npz")
    labels = Tensor(g["batch_labels"].astype(np.int32))
    params = lora_model.trainable_params()
    frozen = lora_model.transformer.encoder.layers[0].self_attention.query_key_value.weight.asnumpy().copy()
    saved = [p.asnumpy().copy() for p in params]

    def loss_fn(*ids):
        return lora_model(*ids, labels)[0]

    grad_fn = ms.value_and_grad(loss_fn, None, params)
    optimizer = ms.nn.SGD(params, learning_rate=0.05)

    def train_step(input_ids, attention_mask, position_ids):
        loss, grads = grad_fn(input_ids, attention_mask, position_ids)
        optimizer(grads)
        return loss, grads

    train_step = ms.jit(train_step)
    loss0, grads = train_step(*_ids())
    assert len(grads) == 4 and all(np.linalg.norm(gr.asnumpy()) > 0 for gr in grads)
    loss1, _ = train_step(*_ids())
    assert float(loss1) < float(loss0)
    assert all(np.abs(p.asnumpy() - s).max() > 0 for p, s in zip(params, saved))
    weight = lora_model.transformer.encoder.layers[0].self_attention.query_key_value.weight.asnumpy()
    np.testing.assert_array_equal(weight, frozen)
    for p, s in zip(params, saved):
        p.set_data(Tensor(s))


def test_lora_targets_and_errors():
    model = ChatGLM2ForConditionalGeneration(ChatGLM2Config.from_hf(TINY_MODEL))
    train = apply_lora(model, 2, 4, 0.1, ["dense_h_to_4h", "dense_4h_to_h"])
    assert len(train) == 8 and all(".mlp." in p.name for p in train)
    model.set_train(True)     # LoRA dropout active
    out = model(*_ids())
    assert out.shape == (2, 24, 3072) and np.isfinite(out.asnumpy()).all()
    with pytest.raises(ValueError, match="already has LoRA"):
        apply_lora(model, 2, target_modules=".*dense_h_to_4h")
    with pytest.raises(ValueError, match="matches no Linear layer"):
        apply_lora(model, 2, target_modules="wq")
    with pytest.raises(ValueError, match="r must be a positive integer"):
        apply_lora(model, r=0)


# ------------------------------------------------------------------ prefix
def test_prefix_base_frozen():
    model = ChatGLM2ForConditionalGeneration.from_pretrained(TINY_PTUNING_MODEL)
    train = freeze_base(model)
    assert [p.name for p in train] == ["prefix_encoder.mindpet_delta_prefixtuning_embedding.embedding_table"]
    with pytest.raises(ValueError, match="no prefix_encoder"):
        freeze_base(ChatGLM2ForConditionalGeneration.from_pretrained(TINY_MODEL))


def test_prefix_projection_against_numpy():
    """With prefix_projection: Embedding -> Linear -> tanh -> Linear, viewed as per-layer keys/values."""
    cfg = ChatGLM2Config.from_hf(TINY_PTUNING_MODEL).replace(prefix_projection=True)
    enc = PrefixEncoder(cfg)
    enc.set_train(False)
    names = sorted(p.name for p in enc.get_parameters())
    assert names == sorted(["mindpet_delta_prefixtuning_embedding.embedding_table",
                            "mindpet_delta_prefixtuning_dense_in.weight", "mindpet_delta_prefixtuning_dense_in.bias",
                            "mindpet_delta_prefixtuning_dense_out.weight", "mindpet_delta_prefixtuning_dense_out.bias"])
    p = {q.name.split("mindpet_delta_prefixtuning_")[1]: q.asnumpy().astype(np.float64) for q in enc.get_parameters()}
    rng = np.random.default_rng(0)
    enc.mindpet_delta_prefixtuning_dense_in.bias.set_data(Tensor(rng.normal(size=64).astype(np.float32)))
    p["dense_in.bias"] = enc.mindpet_delta_prefixtuning_dense_in.bias.asnumpy().astype(np.float64)
    h = np.tanh(p["embedding.embedding_table"] @ p["dense_in.weight"].T + p["dense_in.bias"])
    kv = h @ p["dense_out.weight"].T + p["dense_out.bias"]                     # [P, layers*2*g*hn]
    want = kv.reshape(4, 4, 2, 16).transpose(1, 2, 0, 3)                       # [2L, g, P, hn]
    got = enc(3).asnumpy()
    assert got.shape == (4, 3, 2, 4, 16)
    for b in range(3):
        np.testing.assert_allclose(got[:, b], want, atol=1e-5)
    # the whole model runs with a projected prefix, and its dropout is off in eval
    model = ChatGLM2ForConditionalGeneration(cfg)
    model.set_train(False)
    out = model(*_ids())
    assert out.shape == (2, 24, 3072) and np.isfinite(out.asnumpy()).all()
