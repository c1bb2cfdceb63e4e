"""Helpers for the harness tests: the straightforward computation a continuation's score is checked against."""

import torch

from mgllava.inference import GenerationSettings


def plain_scores(engine, messages, continuation, images=None, boxes=None) -> tuple[float, bool]:
    """(sum of log-probabilities, greedy?) of `continuation` after the conversation's generation prompt: one
    unpadded forward over prompt + continuation, the image tensors given as pixels, all logits kept, the
    log_softmax over every column but the `<image>` placeholder's (which the reference does not have)."""
    prepared = engine.prepare(
        messages, images=images, boxes=boxes, settings=GenerationSettings(max_new_tokens=4)
    )
    ids = torch.tensor([prepared.input_ids + list(continuation)])
    tensors = {k: torch.cat([f.tensors[k] for f in prepared.frames]) for k in prepared.frames[0].tensors}
    with torch.no_grad():
        logits = engine.model(input_ids=ids, **tensors).logits[0]
    n, image_id = len(prepared.input_ids), engine.model.config.image_token_id
    real = [
        i for i in range(logits.shape[-1]) if i != image_id
    ]  # the LLM's own vocabulary, as the reference's
    assert image_id not in continuation
    target = torch.tensor([real.index(t) for t in continuation])
    logprobs = logits[n - 1 : n - 1 + len(target), real].float().log_softmax(-1)
    picked = logprobs[torch.arange(len(target)), target]
    return picked.sum().item(), bool((logprobs.argmax(-1) == target).all())
