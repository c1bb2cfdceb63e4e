"""`_can_compile_fullgraph` is False for the composite (the object path reads box counts on the host and its
shapes follow the boxes); the language model inside compiles as one graph, as its own transformers class
does. Inductor on CPU takes about a minute here, so slow."""

import pytest
import torch

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration


@pytest.mark.slow
def test_the_language_model_compiles_as_one_graph_and_matches_eager():
    torch.manual_seed(0)
    model = MGLlavaForConditionalGeneration(MGLlavaConfig.from_preset("tiny")).eval()
    assert model._can_compile_fullgraph is False
    decoder = model.model.language_model
    embeds = decoder.embed_tokens(torch.randint(5, 2000, (2, 12)))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        eager = decoder(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        compiled = torch.compile(decoder, fullgraph=True)(inputs_embeds=embeds, attention_mask=mask)
    torch.testing.assert_close(compiled.last_hidden_state, eager, rtol=1e-5, atol=1e-5)
