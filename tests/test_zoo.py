"""The zoo's pretraining makes the encoder matter: shuffling encoder outputs across the batch hurts."""
import pytest

from prompt_tuning_nb.zoo import PretrainingRecipe, pretrained_model


@pytest.mark.slow
def test_span_corruption_makes_the_decoder_use_the_encoder(tmp_path):
    recipe = PretrainingRecipe(stages=(("wikitext2_span_corruption", 150),), batch_size=16, inputs_length=64,
                               checkpoint_every=150)
    _, _, info = pretrained_model("mini_xs", recipe, root=tmp_path, progress=False)
    stage = info["stages"][0]
    assert stage["shuffled_loss"] > stage["loss"] + 0.1, stage  # clearly worse without the true encoder outputs
