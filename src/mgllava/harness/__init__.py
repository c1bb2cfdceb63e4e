"""Adapters for evaluation harnesses, over the same `inference.Engine` as chat, serve and `mgllava eval`
(docs/harnesses.md):

- `lmms`: the lmms-eval model `mgllava` (`lmms-eval --model mgllava ...`; needs the `lmms` extra, and is
  registered through the `lmms_eval.models` entry point, so importing this package does not import lmms-eval);
- `vlmeval`: `MGLlavaVLMEval`, a model with VLMEvalKit's interface (`generate`, `generate_inner`,
  `use_custom_prompt`, `build_prompt`, `chat_inner`), needing no VLMEvalKit import;
- `common`: the engine with an online detector, box-file look-ups with the harness's ids, decoding settings;
- `likelihood`: log-probabilities of a continuation after a prompt with images (lmms-eval's loglikelihood).

Harnesses that speak OpenAI's chat API reach the model through `mgllava serve` instead.
"""
