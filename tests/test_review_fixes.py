"""Regression tests for faults found by the adversarial and new-user reviews."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lora_fx
from lora_fx.errors import (AdapterMismatchError, ConfigError, LoraFxWarning, TargetError, TraceError,
                            UnsupportedSiteError)
from lora_fx.io import load_lora_state, save_lora_state


def _randomize(gm):
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_A.normal_()
            s.lora_B.normal_()
    return gm


def _reference(model, gm, *args):
    params = dict(model.named_parameters())
    for s in lora_fx.sites(gm):
        name = next(a for a in s.aliases if a in params)
        params[name] = params[name] + s.scaling * (s.lora_B @ s.lora_A).reshape(s.shape)
    return torch.func.functional_call(model, params, args)


class DropPath(nn.Module):
    def __init__(self, p):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0:
            return x
        return x * (torch.rand(x.shape[0], 1) > self.p).to(x.dtype) / (1 - self.p)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.dp = DropPath(0.5)

    def forward(self, x):
        return x + self.dp(F.dropout(self.fc(x), 0.3, self.training))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(x)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_self_training_follows_mode_whatever_mode_at_transform(mode):
    model = getattr(Net(), mode)()
    gm = lora_fx.transform(model, rank=2)
    assert isinstance(gm.blocks[0].dp, DropPath)  # branching module kept as a called leaf
    x = torch.randn(5, 6)
    gm.eval(), model.eval()
    assert torch.equal(gm(x), model(x))
    gm.train(), model.train()
    torch.manual_seed(1)
    a = gm(x)
    torch.manual_seed(1)
    assert torch.equal(a, model(x))
    assert {s.param for s in lora_fx.sites(gm)} == {"blocks.0.fc.weight", "blocks.1.fc.weight", "head.weight"}


def test_root_branching_on_training_is_refused_with_advice():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) * (2 if self.training else 1)

    model = Root()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TraceError, match="self.training"):
        lora_fx.transform(model, rank=2, frontend="fx")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_adapters_follow_model_mode_at_transform():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    gm = lora_fx.transform(model, rank=2, dropout=0.5)
    assert not any(m.training for m in gm.modules())
    _randomize(gm)
    x = torch.randn(8, 4)
    assert torch.equal(gm(x), gm(x))


@pytest.mark.parametrize("lowering", ["auto", "merge"])
def test_forward_hooks_see_the_adapted_output(lowering):
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
    model[0].register_forward_hook(lambda m, i, o: o * 2)
    model.register_forward_hook(lambda m, i, o: o + 1)
    gm = lora_fx.transform(model, rank=2, lowering=lowering)
    x = torch.randn(3, 4)
    assert torch.equal(gm(x), model(x))
    _randomize(gm)
    torch.testing.assert_close(gm(x), _reference(model, gm, x))


def test_fold_refuses_to_untie_a_module_shared_by_blocks():
    class Blk(nn.Module):
        def __init__(self, shared):
            super().__init__()
            self.shared = shared

        def forward(self, x):
            return self.shared(x)

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            sh = nn.Linear(4, 4)
            self.blocks = nn.ModuleList([Blk(sh), Blk(sh)])

        def forward(self, x):
            return self.blocks[1](self.blocks[0](x))

    gm = _randomize(lora_fx.transform(M(), rank=2, targets=["blocks.0.shared.weight"]))
    with pytest.raises(UnsupportedSiteError, match="blocks.1.shared.weight"):
        lora_fx.fold(gm)
    both = _randomize(lora_fx.transform(M(), rank=2))
    x = torch.randn(2, 4)
    torch.testing.assert_close(lora_fx.fold(both)(x), both(x))


def test_bad_values_are_typed_errors():
    model = nn.Linear(3, 3)
    with pytest.raises(ConfigError, match="alpha"):
        lora_fx.transform(model, rank=2, alpha=math.inf)
    for name in ("", "a.b", 3):
        with pytest.raises(ConfigError, match="adapter name"):
            lora_fx.transform(model, rank=2, adapter_name=name)
    with pytest.raises(TargetError, match="targets is empty"):
        lora_fx.transform(model, rank=2, targets=[])


def test_user_parameter_named_like_lora_is_not_an_adapter():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.flora_w = nn.Parameter(torch.randn(3, 3))
            self.fc = nn.Linear(3, 3)

        def forward(self, x):
            return self.fc(x) @ self.flora_w

    gm = lora_fx.transform(M(), rank=2, targets=["fc.weight"])
    lora_fx.mark_only_lora_as_trainable(gm)
    assert not gm.flora_w.requires_grad
    assert "flora_w" not in lora_fx.lora_state_dict(gm)


def test_adapter_file_never_overwrites_base_weights_nor_loads_nan(tmp_path):
    from safetensors.torch import save_file

    model = nn.Sequential(nn.Linear(3, 3))
    gm = lora_fx.transform(model, rank=2)
    good = save_lora_state(_randomize(gm), tmp_path / "good.safetensors")
    sd = dict(lora_fx.lora_state_dict(gm))
    save_file({**{k: v.clone() for k, v in sd.items()}, "0.weight": torch.zeros(3, 3)}, tmp_path / "base.safetensors")
    nan = {k: torch.full_like(v, float("nan")) for k, v in sd.items()}
    save_file(nan, tmp_path / "nan.safetensors")
    fresh = lora_fx.transform(model, rank=2)
    w = fresh.get_parameter("0.weight").clone()
    for bad, msg in (("base.safetensors", "base weight"), ("nan.safetensors", "inf/nan")):
        with pytest.raises(AdapterMismatchError, match=msg):
            load_lora_state(fresh, tmp_path / bad)
    assert torch.equal(fresh.get_parameter("0.weight"), w)
    load_lora_state(fresh, good)


def test_root_optional_argument_traced_as_tensor_warns():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 3)

        def forward(self, x, mask=None):
            y = self.fc(x)
            return y * mask if mask is not None else y

    with pytest.warns(LoraFxWarning, match="concrete_args"):
        lora_fx.transform(M(), rank=2, frontend="fx")
    gm = lora_fx.transform(M(), rank=2, frontend="fx", concrete_args={"mask": None})
    assert gm(torch.randn(2, 3)).shape == (2, 3)


def test_peft_files_from_export_captured_model(tmp_path):
    peft = pytest.importorskip("peft")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.fc(x)))

    model, x = M().eval(), torch.randn(3, 8)
    gm = _randomize(lora_fx.transform(model, rank=2, frontend="export", example_inputs=(x,)))
    lora_fx.save_adapter(gm, tmp_path)
    pm = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path)).eval()
    torch.testing.assert_close(pm(x), gm(x))
    back = lora_fx.load_adapter(model, tmp_path, frontend="export", example_inputs=(x,))
    torch.testing.assert_close(back(x), gm(x))


# ------------------------------------------------------------------------------------------------
# adapter-input recomputation and trace reuse (adversarial review of the remat / reuse branch)

def _adapter_grads(model, gm, x):
    """(output, adapter grads) of ``gm`` and of the functional reference, on clones of ``x``."""
    params = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    out = gm(x.clone())
    ref = _reference(model, gm, x.clone())
    return (out, torch.autograd.grad(out.square().sum(), params),
            ref, torch.autograd.grad(ref.square().sum(), params))


def _assert_matches(model, gm, x):
    out, g, ref, gr = _adapter_grads(model, gm, x)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for a, b in zip(g, gr):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


class _InplaceAfterProducer(nn.Module):
    """``h = gelu(u); h.relu_(); fc(h)``: the graph feeds the gelu node to fc, whose value was then
    changed in place; recomputing gelu(u) in backward would miss the relu_."""

    def __init__(self, mode):
        super().__init__()
        self.mode = mode
        self.ln, self.fc = nn.LayerNorm(4), nn.Linear(4, 3)

    def forward(self, u):
        if self.mode == "gelu_relu_":
            h = F.gelu(u)
            h.relu_()
        else:  # "ln_add_"
            h = self.ln(u)
            h.add_(2.0)
        return self.fc(h)


@pytest.mark.parametrize("mode", ["gelu_relu_", "ln_add_"])
def test_remat_producer_output_modified_in_place_before_site(mode):
    torch.manual_seed(0)
    model = _InplaceAfterProducer(mode)
    gm = _randomize(lora_fx.transform(model, rank=2))
    _assert_matches(model, gm, torch.randn(5, 4, requires_grad=True))


class _MutatedInput(nn.Module):
    """The producer's input (which needs no grad, so nothing guards it) is modified in place."""

    def __init__(self, before_site):
        super().__init__()
        self.before_site = before_site
        self.fc = nn.Linear(4, 3)

    def forward(self, u):
        h = F.gelu(u)
        if self.before_site:
            u.mul_(3.0)
            return self.fc(h)
        y = self.fc(h)
        u.add_(1.0)
        return y


@pytest.mark.parametrize("before_site", [True, False])
def test_remat_producer_input_modified_in_place(before_site):
    # before: remat recomputed gelu(3u) -> wrong lora_A grad; after: backward raised "modified by an
    # inplace operation" although the plain form (keeping x) is fine
    torch.manual_seed(0)
    model = _MutatedInput(before_site)
    gm = _randomize(lora_fx.transform(model, rank=2))
    _assert_matches(model, gm, torch.randn(5, 4))


class _LnFc(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln, self.act, self.fc, self.out = nn.LayerNorm(4), nn.GELU(), nn.Linear(4, 6), nn.Linear(6, 3)

    def forward(self, u):
        return self.out(self.act(self.fc(self.ln(u))))


@pytest.mark.parametrize("change", ["hook", "eps", "approximate", "swap"])
def test_remat_leaf_producer_changed_after_transform(change):
    """A leaf producer changed after transform (a forward hook, eps, GELU mode, another module):
    the recomputed input must be what the leaf returned at run time, not what it was at transform."""
    torch.manual_seed(0)
    model = _LnFc()
    gm = _randomize(lora_fx.transform(model, rank=2))
    for m in (model, gm):
        if change == "hook":
            m.ln.register_forward_hook(lambda mod, args, out: out * 3)
        elif change == "eps":
            m.ln.eps = 10.0
        elif change == "approximate":
            m.act.approximate = "tanh"
        else:
            m.ln = nn.Identity()
    _assert_matches(model, gm, torch.randn(5, 4, requires_grad=True))


def test_delete_adapter_leaves_no_dead_remat_nodes():
    gm = lora_fx.transform(_LnFc(), rank=2)
    lora_fx.delete_adapter(gm, "default")
    assert [n.op for n in gm.graph.nodes if n.op == "get_attr"] == []


def test_block_in_eval_mode_stays_in_eval_mode():
    """transform kept only the root's mode: a block (and its dropout) put in eval() in a model in
    training mode came back in training mode, so its dropout ran."""

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.drop = nn.Linear(4, 4), nn.Dropout(0.5)

        def forward(self, x):
            return self.drop(self.fc(x))

    class Stack(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block(), Block()])
            self.head = nn.Linear(4, 2)
            self.head_drop = nn.Dropout(0.5)

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return self.head_drop(self.head(x))

    model = Stack()
    model.blocks[1].eval()
    model.head_drop.eval()
    gm = lora_fx.transform(model, rank=2)
    assert {n: m.training for n, m in gm.named_modules() if "lora" not in n} == {
        n: m.training for n, m in model.named_modules()}


def test_remat_under_torch_func_transforms():
    """torch.func.grad / vmap (per-sample gradients) / jacrev raised "autograd.Function ... must
    override the setup_context staticmethod" with recomputation on (the default)."""
    from torch.func import functional_call, grad, jacrev, vmap

    torch.manual_seed(0)
    model = _LnFc()
    x = torch.randn(4, 2, 4)
    res = []
    for recompute in (True, False):
        gm = _randomize(lora_fx.transform(model, rank=2, recompute_inputs=recompute))
        torch.manual_seed(1)
        gm = _randomize(gm)
        params = {k: v.detach() for k, v in gm.named_parameters() if v.requires_grad}

        def loss(p, xi):
            return functional_call(gm, p, (xi,)).square().sum()

        res.append((grad(loss)(params, x), vmap(grad(loss), in_dims=(None, 0))(params, x),
                    jacrev(lambda xi: gm(xi).sum())(x)))
    torch.testing.assert_close(res[0], res[1])


def test_remat_under_forward_mode_ad():
    """forward-mode AD (dual tensors) raised "You must implement the jvp function" with
    recomputation on, where the plain form works."""
    import torch.autograd.forward_ad as fwAD

    torch.manual_seed(0)
    model = _LnFc()
    x, t = torch.randn(2, 4), torch.randn(2, 4)
    res = []
    for recompute in (True, False):
        gm = lora_fx.transform(model, rank=2, recompute_inputs=recompute)
        torch.manual_seed(1)
        gm = _randomize(gm)
        with fwAD.dual_level():
            out = gm(fwAD.make_dual(x.clone().requires_grad_(), t))
            res.append(tuple(fwAD.unpack_dual(out))[:2])
    torch.testing.assert_close(res[0], res[1])
