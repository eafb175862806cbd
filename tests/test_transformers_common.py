"""transformers' own common model and config tests, run against VQRAE (FSQ and VQ variants).

The tester is written the way transformers writes one for its models (`tests/models/siglip/test_modeling_siglip.py`):
a `VQRAEModelTester` that builds a tiny config and inputs, and a `unittest.TestCase` per variant that mixes in
`ModelTesterMixin` and runs `ConfigTester`. The common tests come from the installed transformers version's source
distribution, fetched by `python scripts/fetch_transformers_tests.py` into the git-ignored `.transformers-tests/`
(part of the README's test set-up); without it, the one test below fails and says so, rather than skipping.
"""

import contextlib
import copy
import importlib.metadata
import sys
import unittest
from pathlib import Path
from unittest.mock import patch

import pytest
import torch
from transformers.models.auto.modeling_auto import MODEL_MAPPING, MODEL_MAPPING_NAMES

from conftest import TINY_VISION
from vqrae import VQRAEConfig, VQRAEModel

FETCHED = Path(__file__).resolve().parent.parent / ".transformers-tests"
SET_UP = "python scripts/fetch_transformers_tests.py"
_VERSION_FILE = FETCHED / "transformers_tests" / "VERSION"
_FETCHED_VERSION = _VERSION_FILE.read_text().strip() if _VERSION_FILE.is_file() else None


def test_transformers_common_tests_are_fetched():
    """The common tests below exist only once the set-up has fetched them, for the transformers that runs them."""
    installed = importlib.metadata.version("transformers")
    if _FETCHED_VERSION != installed:
        found = f"holds transformers {_FETCHED_VERSION}'s" if _FETCHED_VERSION else "is missing"
        pytest.fail(
            f"{FETCHED} {found} common tests, but transformers {installed} is installed: run `{SET_UP}` "
            "(the README's test set-up does) so transformers' common model tests run against VQRAE.",
            pytrace=False,
        )


if _FETCHED_VERSION is not None:
    sys.path.insert(0, str(FETCHED))
    from transformers_tests.test_configuration_common import ConfigTester
    from transformers_tests.test_modeling_common import ModelTesterMixin, floats_tensor
else:  # test_transformers_common_tests_are_fetched fails; nothing else here can run.
    ModelTesterMixin = object


class VQRAEModelTester:
    def __init__(self, parent, use_fsq: bool, batch_size: int = 2, is_training: bool = True):
        self.parent = parent
        self.use_fsq = use_fsq
        self.batch_size = batch_size
        self.is_training = is_training
        self.image_size = TINY_VISION["image_size"]
        self.patch_size = TINY_VISION["patch_size"]
        self.num_channels = 3
        self.hidden_size = TINY_VISION["hidden_size"]
        self.num_hidden_layers = TINY_VISION["num_hidden_layers"]
        self.num_attention_heads = TINY_VISION["num_attention_heads"]
        # The encoder's hidden states and attentions are the model's: one token per patch, no class token.
        self.seq_length = (self.image_size // self.patch_size) ** 2

    def get_config(self) -> VQRAEConfig:
        quantizer = {"fsq_levels": [4, 4, 3]} if self.use_fsq else {"use_fsq": False, "num_embeddings": 64}
        return VQRAEConfig(
            vision_config=dict(TINY_VISION, num_channels=self.num_channels),
            decoder_intermediate_size=37,
            use_post_quant_conv=True,
            **quantizer,
        )

    def prepare_config_and_inputs(self):
        pixel_values = floats_tensor([self.batch_size, self.num_channels, self.image_size, self.image_size])
        return self.get_config(), pixel_values

    def create_and_check_model(self, config, pixel_values):
        model = VQRAEModel(config).eval()
        with torch.no_grad():
            output = model(pixel_values)
        grid = self.image_size // self.patch_size
        self.parent.assertEqual(output.reconstruction.shape, pixel_values.shape)
        self.parent.assertEqual(output.indices.shape, (self.batch_size, grid, grid))
        self.parent.assertEqual(output.last_hidden_state.shape, (self.batch_size, self.seq_length, self.hidden_size))

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        return config, {"pixel_values": pixel_values}


class _VQRAECommonTests(ModelTesterMixin):
    """The common tests for one quantizer variant (`use_fsq`).

    The tests the mixin skips itself, and why they do not apply: those that need an accelerator, several, MPS,
    DeepSpeed, the kernels library or Flash Attention 2/3/4 (run where they exist; this model supports them through
    `_supports_flash_attn`); `@slow` ones (transformers' own CI runs them nightly); those for language-model heads,
    caches, `inputs_embeds`, sliding-window masks, RoPE, sparse experts / router logits, grouped_mm, tensor-parallel
    plans and resizing token or position embeddings (VQRAE has none of these); the SDPA dispatch test for VLMs
    (needs a language sub-model); and the reverse key-mapping test (VQRAE defines no checkpoint conversion).
    """

    use_fsq = True
    all_model_classes = (VQRAEModel,)
    # No token embeddings to resize: the model reads pixels (as SiglipVisionModel's tester says).
    test_resize_embeddings = False
    # `torch.export` tests come from a module the sdist does not ship (the fetch script's stand-in is empty); the
    # flag says so to anything that reads it.
    test_torch_exportable = False
    # Composite: a SigLIP sub-model with its own config (`vision_config`) beside VQRAE's decoder, so the composite
    # attention-implementation tests run (the non-composite SDPA dispatch test is for single-config models).
    _is_composite = True
    # The test reads a model's age from a "# Copyright <year>" line in its configuration file and skips models
    # "added before 2023", which is every file without such a line; VQRAE is new and its `_init_weights` must
    # cover every weight, so the test runs.
    test_can_init_all_missing_weights_before_2023 = True

    def setUp(self):
        self.model_tester = VQRAEModelTester(self, use_fsq=self.use_fsq)
        # VQRAE takes pixels, not text; `hidden_size` is a field of its vision sub-config, so no common property is
        # checked on the top-level config.
        self.config_tester = ConfigTester(
            self, config_class=VQRAEConfig, has_text_modality=False, common_properties=[], **self._config_kwargs()
        )

    def _config_kwargs(self) -> dict:
        """The tester's quantizer fields; `ConfigTester` compares each given value with the saved JSON, so the
        vision config (saved with all its defaults) is left at its default here."""
        config = self.model_tester.get_config()
        return {key: copy.deepcopy(getattr(config, key)) for key in ("use_fsq", "fsq_levels", "num_embeddings")}

    def test_model_get_set_embeddings(self):
        # As SiglipVisionModel's tester overrides it: the input embedding is a patch convolution, not a token
        # `nn.Embedding`, and there is no output embedding.
        model = VQRAEModel(self.model_tester.get_config())
        self.assertIsInstance(model.get_input_embeddings(), torch.nn.Conv2d)
        self.assertIs(model.get_input_embeddings(), model.encoder.embeddings.patch_embedding)
        self.assertIsNone(model.get_output_embeddings())

    # -- two artefacts of testing a model outside transformers' repository ------------------------------------------

    @contextlib.contextmanager
    def _listed_as_base_model(self):
        """The training tests skip base models (whose output has no `loss`) by looking their class name up in
        `MODEL_MAPPING_NAMES`, a list written in transformers' source. VQRAEModel is AutoModel's class for
        VQRAEConfig by registration (`vqrae/__init__.py`), which reaches the lazy `MODEL_MAPPING` but never that
        list; list it there for the test, from the registration itself."""
        registered = MODEL_MAPPING[VQRAEConfig]
        with patch.dict(MODEL_MAPPING_NAMES, {VQRAEConfig.model_type: registered.__name__}):
            yield

    def test_training(self):
        with self._listed_as_base_model():
            super().test_training()

    def test_training_gradient_checkpointing(self):
        with self._listed_as_base_model():
            super().test_training_gradient_checkpointing()

    def test_training_gradient_checkpointing_use_reentrant_false(self):
        with self._listed_as_base_model():
            super().test_training_gradient_checkpointing_use_reentrant_false()

    def test_training_gradient_checkpointing_use_reentrant_true(self):
        with self._listed_as_base_model():
            super().test_training_gradient_checkpointing_use_reentrant_true()

    def test_can_init_all_missing_weights(self):
        """Two patches, for this test only:
        - transformers treats every model defined outside its package as custom code, and for custom code skips
          `_init_weights` of a module whose own (direct) parameters are all initialised, to protect remote code that
          writes weights in place instead of through `transformers.initialization`. Its SigLIP encoder's attention and
          MLP blocks have no direct parameters (their linear layers are children), so under VQRAE the loader never
          gives them SigLIP's xavier initialisation, which `VQRAEModel(config)` does (SigLIP's own `post_init`, as
          in-tree code). VQRAE's `_init_weights` uses only `transformers.initialization`, so the test runs as for an
          in-tree model.
        - the test loads `from_pretrained(None, config=..., state_dict={})` and expects every weight to be
          initialised; VQRAE refuses a load with missing weights unless `output_loading_info=True` asks for them to
          be reported (test_bad_input.py checks the refusal), so the test's load asks for that."""
        strict = VQRAEModel.from_pretrained.__func__

        def reporting(cls, *args, **kwargs):
            return strict(cls, *args, output_loading_info=True, **kwargs)[0]

        with (
            patch.object(VQRAEModel, "is_custom_code", classmethod(lambda cls: False)),
            patch.object(VQRAEModel, "from_pretrained", classmethod(reporting)),
        ):
            super().test_can_init_all_missing_weights()

    # -- VQRAE's own ------------------------------------------------------------------------------------------------

    def test_config(self):
        self.config_tester.run_common_tests()

    def test_model(self):
        self.model_tester.create_and_check_model(*self.model_tester.prepare_config_and_inputs())


@unittest.skipIf(_FETCHED_VERSION is None, "transformers' common tests are not fetched (see the test above)")
class VQRAEFSQModelTest(_VQRAECommonTests, unittest.TestCase):
    use_fsq = True


@unittest.skipIf(_FETCHED_VERSION is None, "transformers' common tests are not fetched (see the test above)")
class VQRAEVQModelTest(_VQRAECommonTests, unittest.TestCase):
    use_fsq = False
