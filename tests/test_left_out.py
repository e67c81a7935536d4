"""Nothing skipped silently by the default targets.

* a weight whose module reads ``self.weight.dtype`` / ``.device`` / ``.shape`` in forward (transformers'
  Gemma-style ``*ScaledWordEmbedding``) is adapted: metadata reads are not consumers;
* weights behind parametrizations (``torch.nn.utils.parametrize``: weight_norm, spectral_norm,
  orthogonal; the deprecated hook-based weight_norm / spectral_norm) are refused with a
  ``LoraFxError`` naming the parameter and the fix, by any name (stored or computed), never a
  ``KeyError`` from the op table, and reported as left out by the defaults;
* every weight-like parameter (floating point, at least 2-D) the default targets leave out is
  reported with the reason: one ``LoraFxWarning`` per transform, ``lora_fx.left_out(gm)``, a line in
  ``summary``;
* transformers ``PreTrainedModel`` roots: input embeddings, output head and MoE routers are not
  default targets (named in ``targets`` they are adapted); any other model keeps every site.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
import torch.nn.utils.parametrize as parametrize
from torch import nn
from torch.nn.utils import parametrizations

import lora_fx
from _reference import check_matches_reference, randomize_
from _tolerance import assert_close


def _transform(model, **kw):
    """``lora_fx.transform`` and the LoraFxWarnings about left-out weights it emitted."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gm = lora_fx.transform(model, **kw)
    return gm, [str(w.message) for w in caught if issubclass(w.category, lora_fx.LoraFxWarning)
                and "leaves out" in str(w.message)]


class ScaledEmbedding(nn.Embedding):
    """Gemma-style: the forward reads the weight's dtype (and here its device and shape)."""

    def __init__(self, n, d):
        super().__init__(n, d)
        self.register_buffer("scale", torch.tensor(d ** 0.5), persistent=False)

    def forward(self, ids):
        w = self.weight
        return super().forward(ids) * self.scale.to(device=w.device, dtype=w.dtype)


class EmbedNet(nn.Module):
    def __init__(self, emb: nn.Module):
        super().__init__()
        self.emb = emb
        self.fc = nn.Linear(6, 3)

    def forward(self, ids):
        return self.fc(torch.tanh(self.emb(ids)))


IDS = torch.tensor([[1, 4, 0], [7, 2, 9]])


def _gemma_embedding():
    tf = pytest.importorskip("transformers")
    from transformers.models.gemma3.modeling_gemma3 import Gemma3TextScaledWordEmbedding
    del tf
    return Gemma3TextScaledWordEmbedding(10, 6, padding_idx=0, embed_scale=6 ** 0.5)


@pytest.mark.parametrize("make", [lambda: ScaledEmbedding(10, 6), _gemma_embedding], ids=["own", "gemma3"])
@pytest.mark.parametrize("frontend", ["fx", "export", "regions"])
def test_module_reading_weight_metadata_is_adapted(make, frontend):
    torch.manual_seed(0)
    model = EmbedNet(make())
    inputs = {} if frontend == "regions" else {"example_inputs": (IDS,)}
    gm, warned = _transform(model, rank=2, frontend=frontend, **inputs)
    assert {s.param for s in lora_fx.sites(gm)} == {"emb.weight", "fc.weight"}
    assert not warned and lora_fx.left_out(gm) == []
    randomize_(gm, seed=3)
    check_matches_reference(model, gm, (IDS,), grad_input=False)


# ------------------------------------------------------------------------------ parametrizations


class Orth(nn.Module):
    def forward(self, w):
        return w + 0.1 * torch.tanh(w)


def _parametrized(kind: str) -> nn.Module:
    torch.manual_seed(0)
    lin = nn.Linear(5, 4)
    if kind == "weight_norm":
        lin = parametrizations.weight_norm(lin)
    elif kind == "spectral_norm":
        lin = parametrizations.spectral_norm(lin)
    elif kind == "custom":
        parametrize.register_parametrization(lin, "weight", Orth())
    elif kind == "old_weight_norm":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            lin = torch.nn.utils.weight_norm(lin)
    elif kind == "old_spectral_norm":
        lin = torch.nn.utils.spectral_norm(lin)
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), lin).eval()


STORED = {"weight_norm": ["2.parametrizations.weight.original0", "2.parametrizations.weight.original1"],
          "spectral_norm": ["2.parametrizations.weight.original"],
          "custom": ["2.parametrizations.weight.original"],
          "old_weight_norm": ["2.weight_g", "2.weight_v"],
          "old_spectral_norm": ["2.weight_orig"]}


@pytest.mark.parametrize("frontend", ["fx", "export", "regions"])
@pytest.mark.parametrize("kind", list(STORED))
def test_parametrized_weights_are_reported_and_refused_by_name(kind, frontend):
    x = torch.randn(2, 3)
    model = _parametrized(kind)
    inputs = {} if frontend == "regions" else {"example_inputs": (x,)}
    if frontend == "export" and kind == "old_spectral_norm":  # its hook branches on self.training in Python
        with pytest.raises(lora_fx.TraceError, match="self.training"):
            lora_fx.transform(model, rank=2, frontend=frontend, **inputs)
        return
    gm, warned = _transform(model, rank=2, frontend=frontend, **inputs)
    assert [s.param for s in lora_fx.sites(gm)] == ["0.weight"]
    assert len(warned) == 1 and "2.weight" in warned[0] and "remove" in warned[0]
    weight_like = [n for n in STORED[kind] if model.get_parameter(n).ndim >= 2]
    assert {e.param for e in lora_fx.left_out(gm)} == set(weight_like)
    for e in lora_fx.left_out(gm):
        assert "2.weight" in e.reason and not e.by_user
    text = str(lora_fx.summary(gm, show=False))
    assert all(n in text for n in weight_like)
    with torch.no_grad():
        assert_close(gm(x), model(x))
    for name in STORED[kind] + ["2.weight", "2.*"]:  # the stored tensors and the computed one
        with pytest.raises(lora_fx.LoraFxError) as ei:
            lora_fx.transform(model, rank=2, targets=[name], frontend=frontend, **inputs)
        assert not isinstance(ei.value, KeyError)
        assert "2.weight" in str(ei.value) and "remove" in str(ei.value), str(ei.value)


# ------------------------------------------------------------------------------ the left-out report


class Mixed(nn.Module):
    """One weight of each kind the default targets leave out, next to two default sites."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6)
        self.table = nn.Parameter(torch.randn(6, 6))        # consumed by an op without a rule
        self.unused = nn.Parameter(torch.randn(3, 3))       # never read
        self.gain = nn.Parameter(torch.ones(6))             # 1-D: not weight-like
        self.codes = nn.Parameter(torch.ones(2, 2, dtype=torch.int64), requires_grad=False)  # integer
        self.register_buffer("proj", torch.randn(6, 6))     # a buffer shaped like a weight
        self.leaf = nn.Sequential(nn.Linear(6, 6))          # an opaque leaf without a rule
        self.head = nn.Linear(6, 2)

    def forward(self, x):
        h = self.fc(x) * self.gain
        h = h + torch.cumsum(self.table, 0)[0] + h @ self.proj
        return self.head(self.leaf(h))


def test_left_out_lists_every_weight_like_parameter_with_its_reason(capsys):
    model = Mixed()
    gm, warned = _transform(model, rank=2, leaf_modules=["leaf"])
    assert [s.param for s in lora_fx.sites(gm)] == ["fc.weight", "head.weight"]
    out = {e.param: e for e in lora_fx.left_out(gm)}
    assert set(out) == {"table", "unused", "leaf.0.weight"}  # not gain (1-D), codes (int), proj (buffer)
    assert "cumsum" in out["table"].reason and "target it by name" in out["table"].reason
    assert "not used by the forward" in out["unused"].reason and out["unused"].op == "unused"
    assert "opaque leaf module 'leaf'" in out["leaf.0.weight"].reason
    assert len(warned) == 1 and all(n in warned[0] for n in out)
    lora_fx.summary(gm)
    printed = capsys.readouterr().out
    assert "left out (3):" in printed and all(n in printed for n in out)
    # named, the weights a rule does not know are adapted (merged)
    gm2, _ = _transform(model, rank=2, targets=["table", "leaf.0.weight"], leaf_modules=["leaf"])
    assert {s.param for s in lora_fx.sites(gm2)} == {"table", "leaf.0.weight"}
    x = torch.randn(3, 4)
    randomize_(gm2, seed=1)
    check_matches_reference(model, gm2, (x,))


def test_user_choices_are_listed_but_not_warned():
    model = Mixed()
    gm, warned = _transform(model, rank=2, targets=["fc.weight"], leaf_modules=["leaf"])
    out = {e.param: e for e in lora_fx.left_out(gm)}
    assert out["head.weight"].by_user and "targets=['fc.weight']" in out["head.weight"].reason
    assert out["table"].by_user and not warned  # the user named what to adapt: listed, not warned
    gm, warned = _transform(model, rank=2, exclude=["head.*"], leaf_modules=["leaf"])
    out = {e.param: e for e in lora_fx.left_out(gm)}
    assert out["head.weight"].by_user and "exclude pattern 'head.*'" in out["head.weight"].reason
    assert "head.weight" not in warned[0]


def test_left_out_per_adapter_follows_add_delete_and_fold():
    model = Mixed()
    gm, _ = _transform(model, rank=2, leaf_modules=["leaf"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lora_fx.add_adapter(gm, "second", rank=1, targets=["table"])
    assert not any("leaves out" in str(w.message) for w in caught)  # the user's targets: no warning
    assert {e.param for e in lora_fx.left_out(gm, "second")} == {"fc.weight", "head.weight", "unused",
                                                                  "leaf.0.weight"}
    assert {e.param for e in lora_fx.left_out(gm, None)} == {"unused", "leaf.0.weight"}  # by no adapter
    with pytest.raises(lora_fx.UnknownAdapterError):
        lora_fx.left_out(gm, "third")
    lora_fx.delete_adapter(gm, "second")
    with pytest.raises(lora_fx.UnknownAdapterError):
        lora_fx.left_out(gm, "second")
    folded = lora_fx.fold(gm)
    with pytest.raises(lora_fx.NotAdaptedError):
        lora_fx.left_out(folded)


def test_every_weight_adapted_means_no_warning():
    gm, warned = _transform(nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2)), rank=2)
    assert not warned and lora_fx.left_out(gm) == [] and "left out" not in str(lora_fx.summary(gm, show=False))


# ------------------------------------------------------------------------------ transformers policy

V = 40


def _llama():
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    cfg = tf.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=V, max_position_embeddings=16, use_cache=False)
    return tf.LlamaForCausalLM(cfg)


def _mixtral():
    tf = pytest.importorskip("transformers")
    tf.utils.logging.set_verbosity_error()
    cfg = tf.MixtralConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                           num_key_value_heads=1, vocab_size=V, max_position_embeddings=16, use_cache=False,
                           num_local_experts=4, num_experts_per_tok=2)
    return tf.MixtralForCausalLM(cfg)


def test_transformers_embeddings_and_head_are_not_default_targets():
    torch.manual_seed(0)
    model = _llama()
    ids = torch.randint(0, V, (2, 5))
    gm, warned = _transform(model, rank=2, example_inputs=(ids,))
    params = {s.param for s in lora_fx.sites(gm)}
    assert "model.embed_tokens.weight" not in params and "lm_head.weight" not in params
    assert {p.rpartition(".")[0].rpartition(".")[2] for p in params} == {
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    out = {e.param: e for e in lora_fx.left_out(gm)}
    assert set(out) == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "get_input_embeddings()" in out["model.embed_tokens.weight"].reason
    assert "get_output_embeddings()" in out["lm_head.weight"].reason
    assert all("target it by name" in e.reason for e in out.values()) and len(warned) == 1
    # named, they are adapted (a second adapter on the same capture)
    lora_fx.add_adapter(gm, "named", rank=2, targets=["model.embed_tokens.weight", "lm_head.weight"])
    lora_fx.set_active_adapters(gm, "named")
    assert {s.param for s in lora_fx.sites(gm) if s.adapter == "named"} == {"model.embed_tokens.weight",
                                                                            "lm_head.weight"}
    assert {e.param for e in lora_fx.left_out(gm, "named")} >= {"model.layers.0.self_attn.q_proj.weight"}
    randomize_(gm, seed=2, adapter="named")
    with torch.no_grad():
        assert_close(gm(ids).logits, lora_fx.fold(gm)(ids).logits)
        assert not torch.allclose(gm(ids).logits, model(ids).logits)


def test_transformers_moe_router_is_not_a_default_target():
    """The router is found by structure (a 2-D weight with one row per expert next to the stacked
    expert weights); the policy is read from the model before capture."""
    from lora_fx.targets import target_policy

    torch.manual_seed(0)
    model = _mixtral()
    policy = target_policy(model)
    router = "model.layers.0.mlp.gate.weight"
    assert router in policy.not_default
    assert "router" in policy.not_default[router] and "4 experts" in policy.not_default[router]
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(policy.not_default)
    assert not any("experts" in n or "proj" in n for n in policy.not_default)  # the experts and projections stay
    assert target_policy(model.model.layers[0]).not_default == {}  # a plain module: every site is a default target


def test_other_models_keep_every_site():
    """A plain model with an embedding and a head: both stay default targets."""
    class LM(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(V, 8)
            self.lm_head = nn.Linear(8, V)

        def forward(self, ids):
            return self.lm_head(F.gelu(self.embed_tokens(ids)))

    gm, warned = _transform(LM(), rank=2)
    assert {s.param for s in lora_fx.sites(gm)} == {"embed_tokens.weight", "lm_head.weight"} and not warned


def test_transformers_policy_on_the_regions_front_end():
    """Without example inputs (the model keeps its class): the same policy, and the weights read
    only by a kept module's own Python (a mixture-of-experts block's stacked expert tensors) are
    reported with that reason, not as unused."""
    torch.manual_seed(0)
    model = _mixtral()
    gm, warned = _transform(model, rank=2)
    assert lora_fx.state.frontend_of(gm) == "regions"
    params = {s.param for s in lora_fx.sites(gm)}
    router = "model.layers.0.mlp.gate.weight"
    assert not params & {"model.embed_tokens.weight", "lm_head.weight", router}
    out = {e.param: e for e in lora_fx.left_out(gm)}
    assert {"model.embed_tokens.weight", "lm_head.weight", router} <= set(out) and len(warned) == 1
    assert "router" in out[router].reason and "target it by name" in out[router].reason
    experts = [e for n, e in out.items() if ".experts." in n]
    assert experts and all("kept as its own Python by the regions front-end" in e.reason for e in experts)
    assert all(n in warned[0] for n in out)
    ids = torch.randint(0, V, (2, 5))
    randomize_(gm, seed=3)
    with torch.no_grad():
        assert_close(gm(ids).logits, lora_fx.fold(gm)(ids).logits)


def test_weights_trained_in_full_are_listed_as_the_users_choice():
    """``trainable=`` takes a weight off the default targets: listed with that reason, not warned."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    gm, warned = _transform(model, rank=2, trainable=["2"])
    assert {s.param for s in lora_fx.sites(gm)} == {"0.weight"} and not warned
    (entry,) = lora_fx.left_out(gm)
    assert entry.param == "2.weight" and entry.by_user and "trained in full" in entry.reason
