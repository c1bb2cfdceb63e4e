"""transformers' own `ModelTesterMixin` (124 tests) and `ConfigTester`, from the sdist of the installed
release, run on MG-LLaVA as `tests/models/llava/test_modeling_llava.py` runs them on LLaVA (`make test-hf`).

`MGLlavaModelTester` is ours: the `tiny` preset, `batch_size` samples of one image each with `boxes`
object boxes, laid out as the processor lays them out: `[BOS][576 + n placeholders][text]` (here 16 + n).
Tests that cannot apply are skipped below, each with its reason.
"""

from __future__ import annotations

import unittest
from unittest import mock

import pytest
import torch

from mgllava import MGLlavaConfig, MGLlavaForConditionalGeneration, MGLlavaModel

common = pytest.importorskip(
    "transformers_tests.test_modeling_common",
    reason="run `make test-hf` (scripts/transformers_tests.py fetches transformers' common tests)",
)
config_common = pytest.importorskip("transformers_tests.test_configuration_common")


class MGLlavaModelTester:
    """The attributes `ModelTesterMixin` reads (sizes of the text model, `seq_length`, `is_training`) and
    `prepare_config_and_inputs_for_common`."""

    def __init__(self, parent: unittest.TestCase, batch_size: int = 3, boxes: int = 2, text: int = 7) -> None:
        self.parent, self.batch_size, self.boxes, self.text = parent, batch_size, boxes, text
        config = self.get_config()
        text_config = config.text_config
        self.vocab_size = text_config.vocab_size
        self.hidden_size = text_config.hidden_size
        self.num_hidden_layers = text_config.num_hidden_layers
        self.num_attention_heads = text_config.num_attention_heads
        self.seq_length = 1 + config.num_image_tokens + boxes + text
        self.encoder_seq_length = self.seq_length
        self.is_training = True
        self.image_token_id = config.image_token_id

    def get_config(self) -> MGLlavaConfig:
        return MGLlavaConfig.from_preset("tiny")

    def prepare_config_and_inputs_for_common(self) -> tuple[MGLlavaConfig, dict]:
        config = self.get_config()
        b, text = self.batch_size, config.text_config
        words = torch.randint(config.image_token_id + 1, text.vocab_size, (b, self.text))
        placeholders = torch.full((b, config.num_image_tokens + self.boxes), config.image_token_id)
        input_ids = torch.cat([torch.full((b, 1), text.bos_token_id), placeholders, words], 1)
        low, high = config.vision_config.image_size, config.high_res_config.image_size
        corners = torch.randint(0, high // 2, (b * self.boxes, 2)).float()
        sizes = torch.randint(4, high // 2, (b * self.boxes, 2)).float()
        inputs = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": torch.randn(b, 3, low, low),
            "high_res_pixel_values": torch.randn(b, 3, high, high),
            "object_boxes": torch.cat([corners, corners + sizes], 1),
            "object_counts": torch.full((b,), self.boxes),
        }
        return config, inputs


class MGLlavaCommonTest(common.ModelTesterMixin, unittest.TestCase):
    all_model_classes = (MGLlavaModel, MGLlavaForConditionalGeneration)
    # `GenerationTesterMixin` is not in the sdist (see scripts/transformers_tests.py), so no generate test runs
    # from here; `generate` is tested in tests/model/test_hf_common.py and tests/inference.
    all_generative_model_classes = ()
    _is_composite = True

    def setUp(self) -> None:
        # The mixin picks what to test per class (base models have no loss; image-text-to-text models get
        # labels) from transformers' static tables of in-library models; ours are registered at run time
        # (`AutoModel.register`, ...), so they are added to those tables here.
        tables = [(common.MODEL_MAPPING_NAMES, MGLlavaModel),
                  (common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, MGLlavaForConditionalGeneration)]  # fmt: skip
        for table, model_class in tables:
            patcher = mock.patch.dict(table, {MGLlavaConfig.model_type: model_class.__name__})
            patcher.start()
            self.addCleanup(patcher.stop)
        self.model_tester = MGLlavaModelTester(self)
        self.config_tester = config_common.ConfigTester(
            self,
            config_class=MGLlavaConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "vision_feature_layer", "num_image_tokens"],
        )

    def test_config(self) -> None:
        self.config_tester.run_common_tests()
