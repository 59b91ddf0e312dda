"""Checkpoints and prompt files: the original's artifacts load, our files are what the original and PEFT read.

Covers `prompt_tuning_nb.formats` (tree, T5X, Hugging Face, prompt files) and the two scripts against `../shared/fixtures` (the T5X tiny
checkpoint and the released prompts), against `transformers`/`peft` as independent references, and every
bad input the loaders promise a one-line error for.
"""
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import msgpack
import numpy as np
import pytest
import tensorstore as ts
from flax import serialization

from prompt_tuning_nb import t5
from prompt_tuning_nb.formats.hf import load_hf_t5, save_hf_t5
from prompt_tuning_nb.formats.prompt_files import (load_peft_prompt, load_prompt, save_npy_prompt, save_numpy,
                                                   save_peft_prompt, save_t5x_numpy_prompt)
from prompt_tuning_nb.formats.t5x import load_t5x_checkpoint, load_t5x_variable, t5x_array_spec
from prompt_tuning_nb.formats.tree import (CheckpointError, CheckpointNotFoundError, flatten_params, kvstore_spec,
                                           unflatten_params)
from prompt_tuning_nb.scripts import extract_variable, find_module
from prompt_tuning_nb.t5_shapes import config_from_params, t5x_param_shapes

# The fixture checkpoint's model (fixtures/README.md): relpos max distance 8 is not stored in the weights.
TINY = t5.T5Config(vocab_size=32128, d_model=4, num_heads=2, head_dim=2, num_encoder_layers=2, num_decoder_layers=2,
                   mlp_dim=8, relpos_buckets=4, relpos_max_distance=8)
RELEASED = ("sst2", "mrpc", "rte")


@pytest.fixture(scope="module")
def tiny_t5x(fixtures_dir) -> Path:
    return fixtures_dir / "t5x_tiny_checkpoint" / "checkpoint_3"


@pytest.fixture(scope="module")
def tiny_loaded(tiny_t5x):
    return load_t5x_checkpoint(tiny_t5x, TINY)


@pytest.fixture
def tiny_copy(tiny_t5x, tmp_path) -> Path:
    """A writable copy of the fixture checkpoint (the fixture files are read-only)."""
    folder = tmp_path / "checkpoint_3"
    shutil.copytree(tiny_t5x, folder, copy_function=shutil.copyfile)
    for path in [folder, *folder.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    return folder


def one_line_error(excinfo, *fragments):
    """The error is a single line and mentions every fragment (path, expectation)."""
    message = str(excinfo.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert str(fragment) in message, (fragment, message)


def read_msgpack(folder):
    return msgpack.unpackb((folder / "checkpoint").read_bytes(), raw=False, strict_map_key=False)


def write_msgpack(folder, tree):
    (folder / "checkpoint").write_bytes(msgpack.packb(tree, use_bin_type=True))


def relative_error(ours, reference):
    ours, reference = np.asarray(ours, np.float64), np.asarray(reference, np.float64)
    return np.abs(ours - reference).max() / np.abs(reference).max()


# --- shapes and configs -------------------------------------------------------------------------------------

def test_config_from_params_round_trips_presets():
    for config in (t5.T5Config.from_preset("xxl"), TINY.replace(num_encoder_layers=3, decoder_only=False),
                   TINY.replace(decoder_only=True)):
        shapes = unflatten_params({k: jax.ShapeDtypeStruct(s, jnp.float32)
                                   for k, s in t5x_param_shapes(config, 7).items()})
        got = config_from_params(shapes, relpos_max_distance=config.relpos_max_distance)
        assert got == config.replace(num_encoder_layers=0) if config.decoder_only else got == config


def test_kvstore_maps_gs_and_local_and_gfile():
    base = kvstore_spec("gs://t5-data/pretrained_models/t5x/t5_1_1_lm100k_xxl/checkpoint_1100000")
    assert base == {"driver": "gcs", "bucket": "t5-data",
                    "path": "pretrained_models/t5x/t5_1_1_lm100k_xxl/checkpoint_1100000/"}
    gfile = {"driver": "zarr", "kvstore": {"driver": "gfile", "path": "target.decoder.logits_dense.kernel"}}
    assert t5x_array_spec(base, gfile)["kvstore"] == {
        **base, "path": base["path"] + "target.decoder.logits_dense.kernel/"}
    assert t5x_array_spec(kvstore_spec("/a/b"), gfile)["kvstore"] == {
        "driver": "file", "path": "/a/b/target.decoder.logits_dense.kernel/"}


# --- the T5X fixture checkpoint -----------------------------------------------------------------------------

def test_fixture_loads_completely(tiny_t5x, tiny_loaded):
    config, params = tiny_loaded
    flat = flatten_params(params)
    assert config == TINY
    assert {k: v.shape for k, v in flat.items()} == t5x_param_shapes(TINY)
    assert all(v.dtype == np.float32 for v in flat.values())
    # Independent read of the same bytes: inline arrays via flax, zarr folders via tensorstore directly.
    whole = serialization.msgpack_restore((tiny_t5x / "checkpoint").read_bytes())["optimizer"]["target"]
    zarr_read = 0
    for path, value in flatten_params(whole, is_leaf=lambda n: not isinstance(n, dict) or "driver" in n).items():
        if isinstance(value, dict):
            folder = tiny_t5x / value["kvstore"]["path"]
            value = ts.open({"driver": "zarr", "kvstore": {"driver": "file", "path": str(folder)}}).result().read().result()
            zarr_read += 1
        assert np.array_equal(flat[path], value), path
    assert zarr_read == len(list(tiny_t5x.glob("target.*"))) == 38


def test_fixture_config_is_inferred(tiny_t5x):
    config, _ = load_t5x_checkpoint(tiny_t5x)
    assert config == TINY.replace(relpos_max_distance=128)  # max distance is not in the weights


def test_fixture_restores_in_bfloat16(tiny_t5x, tiny_loaded):
    config, params = load_t5x_checkpoint(tiny_t5x, dtype="bfloat16")
    assert config.dtype == "bfloat16"
    for path, value in flatten_params(params).items():
        assert value.dtype == jnp.bfloat16
        assert np.array_equal(value, flatten_params(tiny_loaded[1])[path].astype(jnp.bfloat16)), path


def test_fixture_forward_matches_transformers(tiny_loaded):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = tiny_loaded
    hf_config = transformers.T5Config(
        vocab_size=config.vocab_size, d_model=config.d_model, d_kv=config.head_dim, d_ff=config.mlp_dim,
        num_layers=config.num_encoder_layers, num_decoder_layers=config.num_decoder_layers, num_heads=config.num_heads,
        relative_attention_num_buckets=config.relpos_buckets, relative_attention_max_distance=config.relpos_max_distance,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0, layer_norm_epsilon=1e-6)
    model = transformers.T5ForConditionalGeneration(hf_config).eval()
    # transformers 5 ties T5's lm_head to the embedding whatever the config says: untie it explicitly.
    model.lm_head.weight = torch.nn.Parameter(torch.zeros_like(model.lm_head.weight))
    assert getattr(model.config, "scale_decoder_outputs", False) is False
    # Our own mapping, written independently of checkpoints.py.
    flat = {k: np.array(v, np.float32) for k, v in flatten_params(params).items()}
    state = {"shared.weight": flat["token_embedder/embedding"], "lm_head.weight": flat["decoder/logits_dense/kernel"].T}
    for stack in ("encoder", "decoder"):
        state[f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"] = \
            flat[f"{stack}/relpos_bias/rel_embedding"].T
        state[f"{stack}.final_layer_norm.weight"] = flat[f"{stack}/{stack}_norm/scale"]
        for i in range(2):
            ours, hf = f"{stack}/layers_{i}", f"{stack}.block.{i}.layer"
            parts = ([("attention", "SelfAttention", "pre_attention_layer_norm")] if stack == "encoder" else
                     [("self_attention", "SelfAttention", "pre_self_attention_layer_norm"),
                      ("encoder_decoder_attention", "EncDecAttention", "pre_cross_attention_layer_norm")])
            for j, (name, hf_name, norm) in enumerate(parts):
                state[f"{hf}.{j}.layer_norm.weight"] = flat[f"{ours}/{norm}/scale"]
                for n, h in (("query", "q"), ("key", "k"), ("value", "v"), ("out", "o")):
                    state[f"{hf}.{j}.{hf_name}.{h}.weight"] = flat[f"{ours}/{name}/{n}/kernel"].T
            j = len(parts)
            state[f"{hf}.{j}.layer_norm.weight"] = flat[f"{ours}/pre_mlp_layer_norm/scale"]
            for n in ("wi_0", "wi_1", "wo"):
                state[f"{hf}.{j}.DenseReluDense.{n}.weight"] = flat[f"{ours}/mlp/{n}/kernel"].T
    named = dict(model.named_parameters())
    assert set(named) == set(state)
    with torch.no_grad():
        for name, weight in named.items():
            weight.copy_(torch.from_numpy(np.ascontiguousarray(state[name])))
    # Padded batch; the first row is longer than the max distance 8, so far buckets are exercised.
    encoder = np.array([[37, 423, 7, 1000, 5, 19, 8, 31000, 22, 64, 3, 90, 17, 1],
                        [8, 6079, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]])
    decoder = np.array([[0, 1010, 7, 55, 8, 2, 999, 12, 4, 30000, 6],
                        [0, 42, 9, 0, 0, 0, 0, 0, 0, 0, 0]])
    ours = np.asarray(t5.forward(config, params, encoder, decoder))
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(encoder), attention_mask=torch.from_numpy(encoder != 0),
                       decoder_input_ids=torch.from_numpy(decoder)).logits.numpy()
    valid = np.array([[True] * 11, [True] * 3 + [False] * 8])  # decoder positions before the padding
    assert relative_error(ours[valid], theirs[valid]) <= 1e-5


def test_only_target_is_read(tiny_copy):
    tree = read_msgpack(tiny_copy)
    # Optimizer state pointing at array folders that do not exist: never opened, so no error.
    states = tree["optimizer"]["state"]["param_states"]
    states["decoder"]["logits_dense"]["kernel"]["v"] = {
        "driver": "zarr", "kvstore": {"driver": "gfile", "path": "state.param_states.decoder.logits_dense.kernel.v"},
        "metadata": {"shape": [4, 32128], "chunks": [4, 4096], "dtype": "<f4"}}
    write_msgpack(tiny_copy, tree)
    config, params = load_t5x_checkpoint(tiny_copy, TINY)
    assert "state" not in params and "param_states" not in json.dumps(list(flatten_params(params)))


def test_any_tensorstore_url_goes_through_the_same_code(tiny_t5x):
    """gs:// cannot be reached here; memory:// is the same code path (kvstore URL -> spec -> re-rooted arrays)."""
    context = ts.Context()
    store = ts.KvStore.open("memory://bucket/run/checkpoint_3/", context=context).result()
    for path in tiny_t5x.rglob("*"):
        if path.is_file():
            store.write(path.relative_to(tiny_t5x).as_posix(), path.read_bytes()).result()
    config, params = load_t5x_checkpoint("memory://bucket/run/checkpoint_3", TINY, context=context)
    reference = load_t5x_checkpoint(tiny_t5x, TINY)[1]
    for path, value in flatten_params(reference).items():
        assert np.array_equal(flatten_params(params)[path], value), path
    with pytest.raises(CheckpointNotFoundError) as e:
        load_t5x_checkpoint("memory://bucket/elsewhere", context=context)
    one_line_error(e, "memory://bucket/elsewhere", "no such folder")
    assert load_t5x_checkpoint(f"file://{tiny_t5x}")[0] == TINY.replace(relpos_max_distance=128)


def test_prompt_from_a_url(fixtures_dir):
    path = fixtures_dir / "pretrained_prompts" / "t5_1_1_lm100k_base" / "rte.npy"
    assert np.array_equal(load_prompt(f"file://{path.resolve()}"), np.load(path))
    with pytest.raises(CheckpointNotFoundError) as e:
        load_prompt(f"file://{path.resolve()}.missing")
    one_line_error(e, "rte.npy.missing", "no such file")


def test_load_t5x_variable_reads_one(tiny_t5x, tiny_loaded):
    embedding = tiny_loaded[1]["token_embedder"]["embedding"]
    for name in ("target/token_embedder/embedding", "/token_embedder/embedding/"):
        assert np.array_equal(load_t5x_variable(tiny_t5x, name), embedding)


# --- bad T5X input: one line, naming the path and the expectation --------------------------------------------

def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_t5x_checkpoint(tmp_path / "nope")
    one_line_error(e, tmp_path / "nope", "no such folder", "T5X checkpoint")


def test_missing_checkpoint_file(tiny_copy):
    (tiny_copy / "checkpoint").unlink()
    with pytest.raises(CheckpointNotFoundError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy / "checkpoint", "no such file", "msgpack")


@pytest.mark.parametrize("damage", ["truncated", "garbage", "not_t5x"])
def test_corrupt_msgpack(tiny_copy, damage):
    raw = (tiny_copy / "checkpoint").read_bytes()
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    elif damage == "garbage":
        raw = bytes([0xC1]) + raw[1:]  # 0xC1 is never used by msgpack
    else:
        raw = msgpack.packb({"version": 3, "params": {}})
    (tiny_copy / "checkpoint").write_bytes(raw)
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy / "checkpoint", "expected a T5X checkpoint file")


def test_missing_array_folder(tiny_copy):
    shutil.rmtree(tiny_copy / "target.encoder.layers_1.mlp.wo.kernel")
    with pytest.raises(CheckpointNotFoundError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy / "target.encoder.layers_1.mlp.wo.kernel", "array folder missing",
                   "target/encoder/layers_1/mlp/wo/kernel")


def test_array_folder_missing_a_chunk(tiny_copy):
    (tiny_copy / "target.token_embedder.embedding" / "3.0").unlink()  # would silently read as zeros
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy / "target.token_embedder.embedding", "chunk file(s) missing", "truncated")


def test_array_chunk_truncated(tiny_copy):
    chunk = tiny_copy / "target.token_embedder.embedding" / "2.0"
    chunk.write_bytes(chunk.read_bytes()[:100])
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy / "target.token_embedder.embedding", "cannot read", "truncated or corrupt")


def test_array_metadata_missing(tiny_copy):
    (tiny_copy / "target.decoder.logits_dense.kernel" / ".zarray").unlink()
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy / "target.decoder.logits_dense.kernel", "expected")


def test_shapes_that_are_not_t5_1_1(tiny_copy):
    tree = read_msgpack(tiny_copy)
    tree["optimizer"]["target"]["encoder"]["layers_0"]["pre_mlp_layer_norm"]["scale"] = msgpack.unpackb(
        serialization.msgpack_serialize({"x": np.ones(5, np.float32)}))["x"]  # a Flax ext value, width 5 not 4
    write_msgpack(tiny_copy, tree)
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_copy)
    one_line_error(e, tiny_copy, "shapes do not form a T5 1.1", "encoder/layers_0/pre_mlp_layer_norm/scale")


def test_t5_1_0_is_refused():
    flat = {path: np.zeros(shape, np.float32) for path, shape in t5x_param_shapes(TINY).items()}
    flat["encoder/layers_0/mlp/wi/kernel"] = flat.pop("encoder/layers_0/mlp/wi_0/kernel")
    flat["decoder/layers_0/mlp/wi/kernel"] = flat.pop("decoder/layers_0/mlp/wi_0/kernel")
    with pytest.raises(CheckpointError) as e:
        config_from_params(unflatten_params(flat), source="t5_1_0")
    one_line_error(e, "t5_1_0", "T5 1.0", "wi_0")


def test_config_that_disagrees(tiny_t5x):
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_t5x, TINY.replace(num_heads=4, head_dim=1, mlp_dim=16))
    one_line_error(e, tiny_t5x, "disagrees", "num_heads=4 (config) vs 2 (checkpoint)", "mlp_dim=16")


def test_bad_restore_dtype(tiny_t5x):
    with pytest.raises(CheckpointError) as e:
        load_t5x_checkpoint(tiny_t5x, dtype="float16")
    one_line_error(e, "float16", "float32, bfloat16")


# --- prompt files -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", RELEASED)
def test_released_prompts_survive_every_format(fixtures_dir, tmp_path, task):
    original = load_prompt(fixtures_dir / "pretrained_prompts" / "t5_1_1_lm100k_base" / f"{task}.npy", d_model=768)
    assert original.shape == (100, 768) and original.dtype == np.float32
    t5x_file = save_t5x_numpy_prompt(tmp_path / "model", 1000, original)
    assert t5x_file == tmp_path / "model" / "numpy_checkpoints" / "checkpoint_1000" / "encoder.prompt.prompt.prompt"
    assert t5x_file.read_bytes()[:6] == b"\x93NUMPY"
    with_suffix = t5x_file.with_name(t5x_file.name + ".npy")
    shutil.copyfile(t5x_file, with_suffix)
    copies = [t5x_file, with_suffix, t5x_file.parent / "encoder.prompt.prompt.prompt",
              save_npy_prompt(tmp_path / f"{task}.npy", original),
              save_peft_prompt(tmp_path / f"{task}_peft", original, "google/t5-v1_1-base")]
    for copy in copies[:2]:
        assert np.array_equal(load_prompt(copy, d_model=768), original)
    for copy in copies[2:]:
        again = load_prompt(copy, d_model=768)
        assert again.dtype == original.dtype and again.tobytes() == original.tobytes(), copy
    # A chain through every format is still bit-exact.
    via_t5x = load_prompt(save_t5x_numpy_prompt(tmp_path / "chain_model", 1, original))
    via_npy = load_prompt(save_npy_prompt(tmp_path / "chain.npy", via_t5x))
    chained = load_prompt(save_peft_prompt(tmp_path / "chain", via_npy))
    assert chained.tobytes() == original.tobytes()


def test_float64_and_bfloat16_prompts(fixtures_dir, tmp_path):
    prompt = load_prompt(fixtures_dir / "prompt_5x256.npy")
    assert prompt.dtype == np.float64  # kept as stored
    assert load_prompt(save_peft_prompt(tmp_path / "peft", prompt)).tobytes() == prompt.tobytes()
    bf16 = prompt.astype(jnp.bfloat16)
    assert np.array_equal(load_prompt(save_npy_prompt(tmp_path / "bf16.npy", bf16)), bf16.astype(np.float32))
    with open(tmp_path / "raw_bf16", "wb") as f:  # what the original extract_variable writes for bfloat16
        np.save(f, bf16)
    raw = load_prompt(tmp_path / "raw_bf16")
    assert raw.dtype == jnp.bfloat16 and np.array_equal(raw, bf16)


def test_step_folder_backup_and_atomicity(tmp_path, monkeypatch):
    first = np.arange(8, dtype=np.float32).reshape(2, 4)
    path = save_t5x_numpy_prompt(tmp_path, 5, first)
    second = save_t5x_numpy_prompt(tmp_path, 5, first + 1)
    numpy_dir = tmp_path / "numpy_checkpoints"
    names = sorted(p.name for p in numpy_dir.iterdir())
    assert names[0] == "checkpoint_5" and len(names) == 2 and names[1].startswith("checkpoint_5.backup-")
    assert np.array_equal(load_prompt(second), first + 1)
    assert np.array_equal(load_prompt(numpy_dir / names[1]), first)
    # A write that dies halfway leaves the step folder as it was and no temporary behind.
    real_save = np.save

    def dying_save(file, array, **kwargs):
        real_save(file, array, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", dying_save)
    for write in (lambda: save_t5x_numpy_prompt(tmp_path, 5, first + 2), lambda: save_t5x_numpy_prompt(tmp_path, 6, first),
                  lambda: save_npy_prompt(tmp_path / "p.npy", first)):
        with pytest.raises(OSError):
            write()
    monkeypatch.undo()
    assert sorted(p.name for p in numpy_dir.iterdir()) == names
    assert np.array_equal(load_prompt(path), first + 1)
    assert not (tmp_path / "p.npy").exists() and not list(tmp_path.glob(".p.npy*"))


def test_peft_writes_what_peft_reads(tmp_path):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = TINY.replace(vocab_size=64)
    prompt = np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32)
    folder = save_peft_prompt(tmp_path / "ours", prompt, config=config)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=4, d_kv=2, d_ff=8, num_layers=2, num_heads=2, relative_attention_num_buckets=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False))
    loaded = peft.PeftModel.from_pretrained(model, folder)
    assert loaded.peft_config["default"].peft_type == peft.PeftType.PROMPT_TUNING
    assert np.array_equal(loaded.prompt_encoder["default"].embedding.weight.detach().numpy(), prompt)
    # PEFT's own default for seq2seq: 2P rows, the first P for the encoder.
    own = peft.get_peft_model(transformers.T5ForConditionalGeneration(model.config),
                              peft.PromptTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=3))
    own.save_pretrained(tmp_path / "theirs")
    rows = own.prompt_encoder["default"].embedding.weight.detach().numpy()
    assert rows.shape == (6, 4)
    assert np.array_equal(load_prompt(tmp_path / "theirs", d_model=4), rows[:3])


def test_peft_folder_that_is_not_prompt_tuning(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=4, d_kv=2, d_ff=8, num_layers=1, num_heads=2, feed_forward_proj="gated-gelu"))
    peft.get_peft_model(model, peft.LoraConfig(task_type="SEQ_2_SEQ_LM", target_modules=["q", "v"], r=2)
                        ).save_pretrained(tmp_path / "lora")
    with pytest.raises(CheckpointError) as e:
        load_prompt(tmp_path / "lora")
    one_line_error(e, tmp_path / "lora" / "adapter_config.json", "'LORA'", "expected 'PROMPT_TUNING'")


def test_peft_seq2seq_layout_is_logged(tmp_path, caplog):
    folder = save_peft_prompt(tmp_path / "a", np.ones((6, 4), np.float32))
    adapter = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**adapter, "num_virtual_tokens": 3,
                                                            "num_transformer_submodules": 2}))
    with caplog.at_level(logging.INFO, logger="prompt_tuning_nb.formats.prompt_files"):
        assert load_peft_prompt(folder).shape == (3, 4)
    assert "using the first 3, the encoder prompt" in caplog.text
    (folder / "adapter_config.json").write_text(json.dumps({**adapter, "num_virtual_tokens": 4}))
    with pytest.raises(CheckpointError) as e:
        load_peft_prompt(folder)
    one_line_error(e, folder / "adapter_model.safetensors", "expected [4, token_dim]")


def test_prompt_width_differs_from_d_model(tmp_path):
    path = save_npy_prompt(tmp_path / "p.npy", np.zeros((3, 4), np.float32))
    for bad in (lambda: load_prompt(path, d_model=768),
                lambda: save_peft_prompt(tmp_path / "peft", np.zeros((3, 4)), config=TINY.replace(d_model=8))):
        with pytest.raises(CheckpointError) as e:
            bad()
        one_line_error(e, "differs from the model's d_model", "expected [P, ")
    assert not (tmp_path / "peft").exists()


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_prompt_with_nan_or_inf(tmp_path, value):
    prompt = np.ones((3, 4), np.float32)
    prompt[1, 2] = value
    writers = {"t5x": lambda: save_t5x_numpy_prompt(tmp_path / "model", 1, prompt),
               "npy": lambda: save_npy_prompt(tmp_path / "p.npy", prompt),
               "peft": lambda: save_peft_prompt(tmp_path / "peft", prompt)}
    for name, write in writers.items():
        with pytest.raises(CheckpointError) as e:
            write()
        one_line_error(e, "expected finite numbers")
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a temporary
    with open(tmp_path / "bad.npy", "wb") as f:
        np.save(f, prompt)
    with pytest.raises(CheckpointError) as e:
        load_prompt(tmp_path / "bad.npy")
    one_line_error(e, tmp_path / "bad.npy", "expected finite numbers")


def test_bad_prompt_files(tmp_path):
    (tmp_path / "text.npy").write_text("not numpy")
    cases = [(tmp_path / "missing", CheckpointNotFoundError, "no such file"),
             (tmp_path / "text.npy", CheckpointError, "not a numpy .npy file"),
             (tmp_path, CheckpointError, "expected a PEFT adapter folder")]
    save_numpy(tmp_path / "cube.npy", np.zeros((2, 3, 4), np.float32))
    cases.append((tmp_path / "cube.npy", CheckpointError, "expected a floating [P, d_model] array"))
    for path, kind, fragment in cases:
        with pytest.raises(kind) as e:
            load_prompt(path)
        one_line_error(e, path, fragment)


# --- Hugging Face folders -----------------------------------------------------------------------------------

def test_hf_round_trip_and_transformers_reads_it(tiny_loaded, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config, params = tiny_loaded
    folder = save_hf_t5(tmp_path / "hf", config, params)
    config_back, params_back = load_hf_t5(folder)
    assert config_back == config
    for path, value in flatten_params(params).items():
        assert np.array_equal(flatten_params(params_back)[path], value), path
    model = transformers.T5ForConditionalGeneration.from_pretrained(folder).eval()
    assert not np.array_equal(model.lm_head.weight.detach().numpy(), model.shared.weight.detach().numpy())
    encoder, decoder = np.array([[37, 423, 7, 1000, 5, 19, 8, 1]]), np.array([[0, 1010, 7, 55]])
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(encoder), decoder_input_ids=torch.from_numpy(decoder)).logits.numpy()
    assert relative_error(t5.forward(config, params, encoder, decoder), theirs) <= 1e-5


def test_hf_tied_and_scaled_output_layer(tmp_path):
    """A folder without lm_head.weight whose outputs are scaled (T5 1.0 style head) gives the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(
        vocab_size=64, d_model=8, d_kv=4, d_ff=16, num_layers=2, num_heads=2, relative_attention_num_buckets=4,
        relative_attention_max_distance=8, feed_forward_proj="gated-gelu", dropout_rate=0.0)).eval()
    assert model.config.scale_decoder_outputs and model.lm_head.weight is model.shared.weight
    model.save_pretrained(tmp_path / "tied")
    config, params = load_hf_t5(tmp_path / "tied")
    encoder, decoder = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 1]]), np.array([[0, 20, 21, 22]])
    with torch.no_grad():
        theirs = model(input_ids=torch.from_numpy(encoder), decoder_input_ids=torch.from_numpy(decoder)).logits.numpy()
    assert relative_error(t5.forward(config, params, encoder, decoder), theirs) <= 1e-5


def test_bad_hf_folders(tmp_path, tiny_loaded):
    config, params = tiny_loaded
    folder = save_hf_t5(tmp_path / "hf", config, params)
    with pytest.raises(CheckpointNotFoundError) as e:
        load_hf_t5(tmp_path / "nope")
    one_line_error(e, tmp_path / "nope", "no such folder", "config.json")
    hf_config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**hf_config, "feed_forward_proj": "relu"}))
    with pytest.raises(CheckpointError) as e:
        load_hf_t5(folder)
    one_line_error(e, folder / "config.json", "'relu'", "expected 'gated-gelu'")
    (folder / "config.json").write_text(json.dumps({**hf_config, "d_ff": 16}))
    with pytest.raises(CheckpointError) as e:
        load_hf_t5(folder)
    one_line_error(e, folder, "disagrees", "mlp_dim=16")
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointNotFoundError) as e:
        load_hf_t5(folder)
    one_line_error(e, folder / "config.json", "no such file")


# --- scripts ------------------------------------------------------------------------------------------------

def test_extract_variable(tiny_t5x, tiny_loaded, tmp_path, capsys):
    out = extract_variable.main(["--checkpoint_dir", str(tiny_t5x), "--variable_path",
                                 "target/token_embedder/embedding", "--restore_dtype", "float32",
                                 "--output_path", str(tmp_path / "sub" / "embedding")])
    assert out == tmp_path / "sub" / "embedding"  # written exactly there, no .npy appended
    assert np.array_equal(np.load(out), tiny_loaded[1]["token_embedder"]["embedding"])
    extract_variable.main([f"--checkpoint_dir={tiny_t5x}", "--variable_path=decoder/logits_dense/kernel",
                           "--restore_dtype=bfloat16", f"--output_path={tmp_path / 'logits.npy'}"])
    assert np.array_equal(np.load(tmp_path / "logits.npy"),
                          tiny_loaded[1]["decoder"]["logits_dense"]["kernel"].astype(jnp.bfloat16).astype(np.float32))
    with pytest.raises(SystemExit) as e:
        extract_variable.main(["--checkpoint_dir", str(tmp_path / "nope"), "--variable_path", "x",
                               "--output_path", str(tmp_path / "x")])
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(tmp_path / "nope") in err


def test_extract_variable_runs_as_a_module(tiny_t5x, tiny_loaded, tmp_path):
    subprocess.run([sys.executable, "-m", "prompt_tuning_nb.scripts.extract_variable", f"--checkpoint_dir={tiny_t5x}",
                    "--variable_path=target/encoder/relpos_bias/rel_embedding", f"--output_path={tmp_path / 'rel'}"],
                   check=True, capture_output=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert np.array_equal(np.load(tmp_path / "rel"), tiny_loaded[1]["encoder"]["relpos_bias"]["rel_embedding"])


def test_find_module_prints_the_install_folder():
    import prompt_tuning_nb
    done = subprocess.run([sys.executable, "-m", "prompt_tuning_nb.scripts.find_module", "prompt_tuning_nb"],
                          capture_output=True, text=True, check=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert done.stdout.strip() == str(Path(prompt_tuning_nb.__file__).resolve().parent)
    assert find_module.main(["json"]) == Path(json.__file__).resolve().parent
