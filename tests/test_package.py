import importlib
import os
import tomllib

import pytest

import lora_fx
import lora_fx.passes


def test_passes_installed_as_subpackage():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert os.path.dirname(os.path.abspath(lora_fx.passes.__file__)) == os.path.join(here, "passes")


def test_public_api_names():
    for name in ("transform", "fold", "sites", "mark_only_lora_as_trainable", "lora_state_dict", "LoraConfig"):
        assert hasattr(lora_fx, name)


# old module path -> (new module, names that must be the very same objects)
OLD_PATHS = {
    "lora_fx.adapter": ("lora_fx.adapters.module", ["LoraAdapter", "ADAPTER_ATTR", "adapter_path"]),
    "lora_fx.adapters": ("lora_fx.adapters.lifecycle", ["add_adapter", "adapter_names", "active_adapters",
                                                        "set_active_adapters", "set_adapter_weights",
                                                        "disable_adapters", "delete_adapter", "named_adapters"]),
    "lora_fx.control": ("lora_fx.adapters.hotswap", ["select_adapters", "set_scale_", "enable_adapters_",
                                                     "disable_adapters", "load_adapter_values_", "reserve_rank_"]),
    "lora_fx.init": ("lora_fx.adapters.init", ["pissa_init_", "dora_init_"]),
    "lora_fx.training": ("lora_fx.adapters.trainable", ["mark_only_lora_as_trainable", "adapter_parameters",
                                                        "register_model_param_after_backward"]),
    "lora_fx.remat": ("lora_fx.recompute", ["down", "PRODUCERS", "module_kind"]),
    "lora_fx.peft_io": ("lora_fx.io.peft", ["save_adapter", "load_adapter", "WEIGHTS_NAME", "CONFIG_NAME",
                                            "PEFT_PREFIX", "_from_peft", "_to_peft"]),
    "lora_fx.loralib_io": ("lora_fx.io.loralib", ["load_loralib_state_dict", "loralib_state_dict"]),
    "lora_fx.folded_export": ("lora_fx.deploy", ["export_folded", "export_onnx", "parity_report"]),
    "lora_fx.io": ("lora_fx.io._files", ["atomic_write", "atomic_write_bytes", "safetensors_bytes"]),
    "lora_fx.nn.pass_rule": ("lora_fx.nn.rule", ["LORA_LAYER_RULE"]),
    "lora_fx.passes.trace": ("lora_fx.passes.trace_fx", ["LoraTracer", "assert_is_none", "trace_hierarchy",
                                                         "build_graph_module", "graph_modules"]),
    "lora_fx.passes.export": ("lora_fx.passes.trace_export", ["export_hierarchy", "normalize_example_inputs",
                                                              "default_dynamic_shapes", "resolve_dynamic_shapes"]),
    "lora_fx.passes.remat": ("lora_fx.passes.match_recompute", ["remat_spec"]),
}
# names whose new home differs from the table's main module
MOVED_ELSEWHERE = {
    ("lora_fx.training", "lora_state_dict"): "lora_fx.io.state_dict",
    ("lora_fx.io", "save_lora_state"): "lora_fx.io.native",
    ("lora_fx.io", "load_lora_state"): "lora_fx.io.native",
    ("lora_fx.io", "lora_state_dict"): "lora_fx.io.state_dict",
    ("lora_fx.passes.export", "capture"): "lora_fx.passes.capture",
    ("lora_fx.passes.export", "FRONTENDS"): "lora_fx.passes.capture",
    ("lora_fx.passes.export", "follow_mode_"): "lora_fx.passes.follow_mode",
    ("lora_fx.passes.export", "train_only"): "lora_fx.passes.follow_mode",
    ("lora_fx.passes.export", "add_if_training_"): "lora_fx.passes.follow_mode",
}


@pytest.mark.parametrize("old", sorted(OLD_PATHS))
def test_old_import_paths_resolve_to_the_same_objects(old):
    new, names = OLD_PATHS[old]
    old_mod, new_mod = importlib.import_module(old), importlib.import_module(new)
    for name in names:
        assert getattr(old_mod, name) is getattr(new_mod, name), (old, name)
    for name in getattr(old_mod, "__all__", ()):
        home = importlib.import_module(MOVED_ELSEWHERE.get((old, name), new))
        assert getattr(old_mod, name) is getattr(home, name), (old, name)
    for (mod, name), home in MOVED_ELSEWHERE.items():
        if mod == old:
            assert getattr(old_mod, name) is getattr(importlib.import_module(home), name), (old, name)


def test_old_paths_are_attributes_of_the_package():
    for name in ("adapter", "adapters", "control", "init", "training", "remat", "peft_io", "loralib_io",
                 "folded_export", "io"):
        assert getattr(lora_fx, name) is importlib.import_module(f"lora_fx.{name}")


def test_every_subpackage_is_installed():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(here, "pyproject.toml"), "rb") as f:
        packages = set(tomllib.load(f)["tool"]["setuptools"]["packages"])
    top = os.path.join(here, "lora_fx")
    found = {".".join(["lora_fx"] + [p for p in os.path.relpath(root, top).split(os.sep) if p != "."])
             for root, _, files in os.walk(top) if "__init__.py" in files}
    assert found | {"lora_fx.passes"} == packages
