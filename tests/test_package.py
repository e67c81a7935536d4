import ast
import importlib
import os
import tomllib

import networkx as nx
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


def _modules(here: str) -> dict[str, str]:
    """``{dotted module name: file}`` of the installed package (``passes/`` is ``lora_fx.passes``)."""
    out = {}
    for folder, pkg in (("lora_fx", "lora_fx"), ("passes", "lora_fx.passes")):
        top = os.path.join(here, folder)
        for root, _, files in os.walk(top):
            for f in files:
                if f.endswith(".py"):
                    parts = os.path.relpath(os.path.join(root, f), top)[:-3].split(os.sep)
                    parts = [p for p in parts if p != "__init__"]
                    out[".".join([pkg] + parts)] = os.path.join(root, f)
    return out


def _top_level_imports(name: str, path: str, modules: dict) -> set[str]:
    """lora_fx modules ``name`` imports when it is imported (``if TYPE_CHECKING:`` blocks excluded),
    with the packages importing them initialises, but not ``name``'s own ancestors (initialised
    first by Python)."""
    is_pkg = path.endswith("__init__.py")
    found = set()
    for node in ast.parse(open(path).read()).body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            parts = name.split(".") if is_pkg else name.split(".")[:-1]
            base = node.module or ""
            if node.level:
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        for t in targets:
            chain = t.split(".")
            for i in range(1, len(chain) + 1):
                m = ".".join(chain[:i])
                if m in modules and m != name and not name.startswith(m + "."):
                    found.add(m)
    return found


def test_no_import_cycle():
    """The import graph is a DAG (the package facade, imported first by Python, aside)."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = _modules(here)
    graph = nx.DiGraph()
    for name, path in modules.items():
        graph.add_edges_from((name, t) for t in _top_level_imports(name, path, modules))
    assert list(nx.simple_cycles(graph)) == []


def test_passes_import_modules_not_the_facade_nor_inside_functions():
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, path in _modules(here).items():
        tree = ast.parse(open(path).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import) and name.startswith("lora_fx.passes"):
                assert all(a.name != "lora_fx" for a in node.names), (path, node.lineno)
        top = {id(n) for n in tree.body} | {id(n) for b in tree.body if isinstance(b, ast.If) for n in b.body}
        for node in ast.walk(tree):  # no function-level import of a lora_fx module
            if isinstance(node, ast.ImportFrom) and id(node) not in top:
                assert not (node.level or (node.module or "").startswith("lora_fx")), (path, node.lineno)
            if isinstance(node, ast.Import) and id(node) not in top:
                assert not any(a.name.startswith("lora_fx") for a in node.names), (path, node.lineno)


def test_passes_lists_its_passes():
    import lora_fx.passes as passes

    for name in passes.__all__:
        assert f":mod:`.{name}`" in passes.__doc__
        assert importlib.import_module(f"lora_fx.passes.{name}") is getattr(passes, name)
