"""Prompt tuning really learns on a real pretrained model: the packaged SmolLM2-135M, through the original's gin
command (`models/smollm2_135m_prompt.gin`, `prompts/from_class_labels.gin`, `runs/prompt_finetune.gin`), then
`runs/prompt_eval.gin` on the exported prompt.

The margin was measured before it was asserted. On the first 128 rt_polarity validation examples, the class-label
prompt scores AUC 0.818 (accuracy 0.734) and, after 30 steps at batch 16 and learning rate 0.1, AUC 0.907 (accuracy
0.789). On the first 256 (the test's size until the suite had to fit its time budget), AUC went from 0.796 to 0.865
(accuracy 0.707 to 0.738) on one machine and to 0.844 (accuracy 0.598, most answers " positive") on another, with
the same code and data: 30 steps from a prompt whose gradient norm starts at 150 amplify the machines'
floating-point differences, and accuracy also moves with the label bias of the moment. The ranking (AUC) gains
on both, so it is what the test asserts; the accuracy gain shows at more steps (`experiments/scale.ipynb`). The
trained prompt keeps its label words as the nearest tokens of the positions they initialized (the paper's
section 7; measured cosines 0.44 for both). Rank classification of " negative" / " positive" after
"{text}\\nSentiment:", the causal-LM text format.

At the paper's rate of 0.3, the first updates (0.3 per value, twice the RMS of SmolLM2's embedding, 0.136) knock the
prompt about and 24 steps end at 0.672 (AUC 0.862). The T5 recipe's dropout of 0.1 must stay off: it takes the loss
on a label from 2.8 to 10.6 nats, and 24 steps then end at 0.715 (AUC 0.782)."""
import json

import pytest

from prompt_tuning_nb import gin_glue, models
from prompt_tuning_nb.family import embedding_of
from prompt_tuning_nb.formats.prompt_files import load_prompt
from prompt_tuning_nb.interpretation import neighbour_table

CONFIGS = "prompt_tuning_nb/configs"
STEPS = 30
EXAMPLES = 128
AUC_MARGIN = 0.04  # gained over the class-label prompt it started from (measured: 0.089 on 128; 0.069 and 0.048 on 256)
SETTINGS = ["TASK_FEATURE_LENGTHS = {'inputs': 64, 'targets': 4}", "BATCH_SIZE = 16", "PROMPT_LENGTH = 20",
            f"EVALUATOR_NUM_EXAMPLES = {EXAMPLES}", "MIXTURE_OR_TASK_NAME = 'rt_polarity'"]


def _configure_and_run(files, bindings):
    gin_glue.parse_gin([f"{CONFIGS}/{f}" for f in files], bindings)
    return gin_glue.run_configured()


@pytest.mark.slow
def test_smollm2_prompt_learns_rt_polarity_then_evaluates_the_exported_prompt(tmp_path):
    model_dir = tmp_path / "run"
    result = _configure_and_run(
        ["models/smollm2_135m_prompt.gin", "prompts/from_class_labels.gin", "runs/prompt_finetune.gin"],
        [*SETTINGS, f"MODEL_DIR = '{model_dir}'", f"TRAIN_STEPS = {STEPS}", f"EVAL_PERIOD = {STEPS}",
         "CLASS_LABELS = ['negative', 'positive']", "optim.prompt_tuning_rules.learning_rate = 0.1"])
    logged = [json.loads(line) for line in (model_dir / "metrics.jsonl").read_text().splitlines()]
    validation = {r["step"]: r for r in logged if r["split"] == "validation"}
    initial, tuned = validation[0], validation[STEPS]
    print(f"rt_polarity validation ({EXAMPLES} examples): class-label prompt {initial['accuracy']:.3f} (AUC "
          f"{initial['auc']:.3f}), after {STEPS} steps {tuned['accuracy']:.3f} (AUC {tuned['auc']:.3f})")
    assert tuned["auc"] >= initial["auc"] + AUC_MARGIN, (initial, tuned)

    prompt_file = model_dir / "numpy_checkpoints" / f"checkpoint_{STEPS}" / "decoder.prompt.prompt.prompt"
    assert prompt_file.is_file()  # the original's name for a decoder-only prompt
    model = models.load_model("smollm2_135m")
    neighbours = neighbour_table(load_prompt(prompt_file), embedding_of(model.config, model.params), model.vocabulary)
    assert [row["neighbours"][0][0] for row in neighbours[:2]] == [" negative", " positive"], neighbours[:2]
    assert all(row["neighbours"][0][1] < 0.9 for row in neighbours[:2])  # moved away from the words, yet nearest them
    metrics = _configure_and_run(
        ["models/smollm2_135m_prompt.gin", "runs/prompt_eval.gin"],
        [*SETTINGS, "CHECKPOINT_PATH = 'smollm2_135m'", f"PROMPT_FILE = '{prompt_file}'"])
    for name in ("accuracy", "macro_f1", "auc"):  # the exported prompt scores as it did in training
        assert metrics[name] == pytest.approx(validation[STEPS][name], abs=1e-6)
    assert result.step == STEPS
