import os

import lora_fx
import lora_fx.passes


def test_passes_installed_as_subpackage():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.abspath(lora_fx.passes.__file__)) == os.path.join(here, "passes")


def test_public_api_names():
    for name in ("transform", "fold", "sites", "mark_only_lora_as_trainable", "lora_state_dict", "LoraConfig"):
        assert hasattr(lora_fx, name)
