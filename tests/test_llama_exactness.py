"""Our Llama computes what transformers' `LlamaForCausalLM` (and PEFT's prompt tuning of it) computes.

The real model is SmolLM2-135M Instruct: its GGUF file is loaded once by transformers
(`from_pretrained(folder, gguf_file=name)`) and once by `llama_checkpoints.load_gguf_llama`, and both run the same
right-padded batches of rt_polarity sentences. Tiny random models written by `save_pretrained` check the
Hugging Face loader, tied and untied. About a minute and a half on 2 cores, most of it transformers' load
and `generate`, and the compilation of the 30-layer model.
"""
import copy
import functools
import json

import gguf
import jax
import numpy as np
import pytest

from prompt_tuning_nb import family, llama, llama_checkpoints
from prompt_tuning_nb.data.bpe_vocab import gguf_vocabulary
from prompt_tuning_nb.data.corpora import CORPORA
from prompt_tuning_nb.data.sources import source_path
from prompt_tuning_nb.formats.tree import CheckpointError

from conftest import relative_error, right_padded, torch_long, valid_BxT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PAD = 2  # SmolLM2's padding and EOS (`<|im_end|>`); id 0 is a real token
PROMPT_LENGTH = 20
DECODE_LENGTH = 10
FLOAT32_TOLERANCE = 1e-5  # max relative error of the logits; measured 4e-6 on 2 cores
BFLOAT16_TOLERANCE = 0.06  # max relative error of bfloat16 activations against float32; measured 0.03

forward = jax.jit(llama.forward, static_argnums=0, static_argnames="placement")


@pytest.fixture(scope="module")
def smollm2():
    "`(transformers model, our config, our params, vocabulary)` of the same GGUF file."
    path = source_path("smollm2_135m_instruct", verbose=False)
    # transformers rebuilds `gguf.get_tensor_name_map(arch, blocks)`, a pure function, for each submodule: cache it
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "get_tensor_name_map", functools.lru_cache(maxsize=None)(gguf.get_tensor_name_map))
        reference = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                      dtype=torch.float32).eval()
    config, params = llama_checkpoints.load_gguf_llama(path)
    return reference, config, params, gguf_vocabulary(path)


@pytest.fixture(scope="module")
def sentences(smollm2):
    "Four rt_polarity sentences of different lengths, tokenized: `(tokens_BxT, lengths_B)`."
    vocab = smollm2[3]
    texts = [example.text for example in CORPORA["rt_polarity"].reader()][:4]
    tokens, lengths = right_padded([vocab.encode(text) for text in texts], PAD)
    assert len(set(lengths)) == 4
    return tokens, lengths


def test_config_from_the_gguf_file(smollm2):
    reference, config, params, _ = smollm2
    hf = reference.config
    assert config == llama.LlamaConfig.from_preset("smollm2_135m", rms_norm_eps=config.rms_norm_eps)
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-7)
    assert (config.rope_theta, config.num_kv_heads) == (hf.rope_parameters["rope_theta"], hf.num_key_value_heads)
    assert family.num_params(config) == sum(p.numel() for p in reference.parameters()) == 134_515_008


def test_logits_equal_transformers(smollm2, sentences):
    reference, config, params, _ = smollm2
    tokens, lengths = sentences
    valid = valid_BxT(lengths, tokens.shape[1])
    with torch.no_grad():
        theirs = reference(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
    ours = np.asarray(forward(config, params, tokens))
    assert ours.shape == theirs.shape == (4, tokens.shape[1], 49152)
    error = relative_error(ours[valid], theirs[valid])
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"


def test_greedy_decoding_equals_transformers_generate(smollm2, sentences):
    """Ours on the padded batch, transformers row by row without padding (its `generate` is wrong on a right-padded
    batch). The chat row ends its answer with EOS: transformers stops there, ours repeats EOS."""
    reference, config, params, vocab = smollm2
    chat = vocab.encode("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")
    rows = [list(row[:n]) for row, n in zip(*sentences)] + [chat]
    tokens, lengths = right_padded(rows, PAD)
    ours = np.asarray(jax.jit(llama.greedy_decode, static_argnums=(0, 4))(config, params, tokens, lengths,
                                                                          DECODE_LENGTH))
    theirs = []
    for row in rows:
        with torch.no_grad():
            out = reference.generate(torch_long([row]), attention_mask=torch_long([[1] * len(row)]),
                                     do_sample=False, num_beams=1, max_new_tokens=DECODE_LENGTH)
        new = out[0, len(row):].tolist()
        theirs.append(new + [PAD] * (DECODE_LENGTH - len(new)))
    assert ours.tolist() == theirs
    assert PAD in theirs[-1] and theirs[-1][-1] == PAD and "Paris" in vocab.decode(theirs[-1])


def test_bfloat16_activations_are_close_to_float32(smollm2, sentences):
    _, config, params, _ = smollm2
    tokens, lengths = sentences
    valid = valid_BxT(lengths, tokens.shape[1])
    full = np.asarray(forward(config, params, tokens))[valid]
    half = np.asarray(forward(config.replace(dtype="bfloat16"), params, tokens))
    assert half.dtype == np.float32
    error = relative_error(half[valid], full)
    assert 1e-3 < error <= BFLOAT16_TOLERANCE, f"max relative error {error:.2e}"  # not float32 in disguise
    assert (half[valid].argmax(-1) == full.argmax(-1)).mean() >= 0.9


def test_prompt_logits_equal_peft_prompt_tuning(smollm2, sentences):
    """PEFT puts the virtual tokens first (our `prefix`), extends the attention mask with ones for them and leaves the
    positions to the model: `0 .. P + T - 1`, as ours. Its logits include the prompt positions; ours do not."""
    reference, config, params, _ = smollm2
    tokens, lengths = sentences
    valid = valid_BxT(lengths, tokens.shape[1])
    embedding = np.asarray(params["token_embedder"]["embedding"])
    rng = np.random.default_rng(0)
    prompt_PxD = embedding[rng.choice(config.vocab_size, PROMPT_LENGTH, replace=False)]
    prompt_PxD = (prompt_PxD + rng.normal(0, 0.02, prompt_PxD.shape)).astype(np.float32)
    prompted = peft.get_peft_model(copy.deepcopy(reference), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH)).eval()
    with torch.no_grad():
        prompted.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt_PxD))
        theirs = prompted(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
        plain = reference(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
    assert theirs.shape[1] == PROMPT_LENGTH + tokens.shape[1]
    theirs = theirs[:, PROMPT_LENGTH:]
    assert relative_error(plain[valid], theirs[valid]) > 0.01  # the prompt matters
    ours = np.asarray(forward(config, params, tokens, prompt_PxD))
    error = relative_error(ours[valid], theirs[valid])
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"


# ----- Hugging Face folders written by transformers -----

HF_CONFIG = dict(vocab_size=300, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=6,
                 num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-5, max_position_embeddings=64,
                 rope_parameters={"rope_type": "default", "rope_theta": 500.0}, initializer_range=0.2)


def save_random_llama(folder, tie: bool) -> "torch.nn.Module":
    "A random `LlamaForCausalLM` with non-trivial norm scales, saved by `save_pretrained` in `folder`."
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG, tie_word_embeddings=tie)).eval()
    with torch.no_grad():
        for name, weight in model.named_parameters():
            if "norm" in name:
                weight.uniform_(0.5, 1.5)
    model.save_pretrained(folder)
    return model


@pytest.mark.parametrize("tie", [True, False])
def test_hugging_face_folder_gives_the_same_logits(tmp_path, tie):
    model = save_random_llama(tmp_path, tie)
    config, params = llama_checkpoints.load_hf_llama(tmp_path)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.rope_theta) == (6, 2, 8, 500.0)
    assert config.tie_embeddings is tie and ("logits_dense" in params["decoder"]) is not tie
    tokens, lengths = right_padded([[5, 0, 17, 299, 3, 8, 1], [0, 0, 9], [4, 2, 2, 7, 11]], PAD)
    valid = valid_BxT(lengths, tokens.shape[1])
    with torch.no_grad():
        theirs = model(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
    ours = np.asarray(forward(config, params, tokens))
    error = relative_error(ours[valid], theirs[valid])
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"


def one_line_error(folder, contains: str, exception=CheckpointError):
    with pytest.raises(exception) as error:
        llama_checkpoints.load_hf_llama(folder)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(folder)) and contains in message, message


@pytest.mark.parametrize("changes, contains", [
    ({"model_type": "qwen2"}, "model_type 'qwen2' is not supported (q/k/v projections with biases); supported"),
    ({"model_type": "mistral"}, "model_type 'mistral' is not supported (sliding-window attention)"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported; supported: 'llama'"),
    ({"attention_bias": True}, "attention_bias is True; only a bias-free Llama"),
    ({"hidden_act": "gelu"}, "hidden_act is 'gelu'"),
    ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}}, "rope_type is 'llama3'"),
    ({"num_attention_heads": 5}, "LlamaConfig.num_heads (5) must be a multiple of num_kv_heads (2)"),
    ({"hidden_size": "48"}, "LlamaConfig.d_model must be a positive integer, got '48'"),
])
def test_bad_config_json(tmp_path, changes, contains):
    save_random_llama(tmp_path, tie=True)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    one_line_error(path.parent, f"config.json: {contains}")


def test_broken_folders(tmp_path):
    save_random_llama(tmp_path, tie=False)
    path = tmp_path / "config.json"
    good = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in good.items() if k != "intermediate_size"}))
    one_line_error(tmp_path, "config.json: no 'intermediate_size' field; expected a Hugging Face Llama config")
    path.write_text("{\"model_type\": \"llama\",")
    one_line_error(tmp_path, "config.json: not JSON (JSONDecodeError")
    path.write_text("[]")
    one_line_error(tmp_path, "config.json: holds a list, expected a JSON object")
    path.write_text(json.dumps({**good, "num_hidden_layers": 3}))
    one_line_error(tmp_path, "weights do not match config.json's Llama (missing: ['model.layers.2.")
    path.write_text(json.dumps({**good, "intermediate_size": 96}))
    one_line_error(tmp_path, "'model.layers.0.mlp.gate_proj.weight' has shape [80, 48]; the config implies [96, 48]")
    (tmp_path / "model.safetensors").unlink()
    one_line_error(tmp_path, "no *.safetensors file (found config.json, generation_config.json)", FileNotFoundError)
    path.unlink()
    one_line_error(tmp_path, "config.json: no such file", FileNotFoundError)


def test_biases_are_refused(tmp_path):
    "A Qwen2-like folder that calls itself llama: its q/k/v biases are unexpected weights, not silently dropped."
    transformers.LlamaForCausalLM(transformers.LlamaConfig(**HF_CONFIG, attention_bias=True)).save_pretrained(tmp_path)
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "attention_bias": False}))
    one_line_error(tmp_path, "unexpected: ['model.layers.0.self_attn.k_proj.bias'")
