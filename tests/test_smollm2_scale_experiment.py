"""The scale experiment (`experiments/scale.ipynb`'s code) on the packaged SmolLM2-135M: every method runs on a real
pretrained decoder-only model, and few-shot prompt design scores what the experiment stored."""
import pytest

from prompt_tuning_nb import models


@pytest.mark.slow
def test_the_scale_experiment_runs_every_method_on_smollm2(tmp_path):
    import numpy as np

    from prompt_tuning_nb import experiment
    from prompt_tuning_nb.training.evaluation import classification_metrics, prepend_tokens, score_candidates

    settings = experiment.check_settings(
        "smollm2_135m", "model_tuning,prompt_tuning,prompt_design,few_shot", "rt_polarity", prompt_length=4, steps=2,
        batch_size=4, eval_every=2, inputs_length=32, max_eval_examples=8, out_dir=tmp_path / "out",
        results_db=tmp_path / "results.sqlite")
    rows = experiment.run_scale(settings, progress=False)
    test = {row["method"]: row for row in rows if row["split"] == "test"}
    assert sorted(test) == ["few_shot", "model_tuning", "prompt_design", "prompt_tuning"]
    assert {row["params"]["family"] for row in rows} == {"llama"} and test["few_shot"]["params"]["shots"] == 1
    model = models.load_model("smollm2_135m")
    assert test["prompt_tuning"]["trainable_params"] == 4 * 576
    assert test["model_tuning"]["trainable_params"] == test["model_tuning"]["num_params"] == 134_515_008
    data = experiment.load_task("rt_polarity", model.vocabulary, settings)  # few-shot, scored without the experiment
    context = model.vocabulary.encode(experiment.demonstrations("rt_polarity", model.vocabulary, 1, seed=0))
    scores = score_candidates(model.config, model.params, prepend_tokens(data.test[0], context), data.candidates,
                              batch_size=64)  # the experiment's batches: the same rows trimmed to the same widths
    assert test["few_shot"]["metrics"] == pytest.approx(classification_metrics(scores, data.test[1]), abs=1e-9)
    assert len(context) > 2 * 8  # two solved reviews and the instruction
    assert not np.array_equal(scores, score_candidates(model.config, model.params, data.test[0], data.candidates,
                                                       batch_size=8))
