"""lora_fx.nn layers versus the real loralib package and versus a functional reference
``functional_call(plain_module, {W: W + s·ΔW})`` built from the factors (CASES.md 1 and 10)."""

import datetime

import loralib
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import lora_fx
from _isolated import run_isolated
import lora_fx.nn as lnn
from lora_fx.errors import AdapterMismatchError, ConfigError
from _reference import lora_weight
from _tolerance import assert_close


def _randomize(model, std=0.5):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.normal_(0, std)
    return model


def _run(model, inputs, out_grad):
    model.zero_grad(set_to_none=True)
    xs = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = model(*xs)
    out = out[0] if isinstance(out, tuple) else out
    (out * out_grad).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads, [x.grad for x in xs]


def _assert_same(a, b, names=None):
    out_a, g_a, x_a = a
    out_b, g_b, x_b = b
    assert_close(out_a, out_b)
    for n in names if names is not None else g_a:
        assert_close(g_a[n], g_b[n], msg=n)
    for ga, gb in zip(x_a, x_b):
        if ga is not None:
            assert_close(ga, gb)


def _load_from_loralib(ours, ref):
    sd = {k.replace("conv.", "") if k.startswith("conv.") else k: v for k, v in ref.state_dict().items()}
    ours.load_state_dict(sd, strict=True)
    return ours


LAYERS = [
    ("linear", lambda L: L.Linear(7, 5, r=3, lora_alpha=6), (torch.randn(4, 7),)),
    ("linear_fifo", lambda L: L.Linear(7, 5, r=3, lora_alpha=6, fan_in_fan_out=True), (torch.randn(2, 3, 7),)),
    ("embedding", lambda L: L.Embedding(11, 6, r=3, lora_alpha=4, padding_idx=2),
     (torch.tensor([[0, 2, 5], [10, 2, 1]]),)),
    ("embedding_square", lambda L: L.Embedding(6, 6, r=2, lora_alpha=2), (torch.tensor([0, 3, 5, 3]),)),
    ("conv2d", lambda L: L.Conv2d(3, 4, 3, r=2, lora_alpha=4, stride=2, padding=1), (torch.randn(2, 3, 7, 6),)),
    ("conv2d_groups", lambda L: L.Conv2d(4, 6, 3, r=2, lora_alpha=3, groups=2), (torch.randn(1, 4, 5, 5),)),
    ("conv1d_k1", lambda L: L.Conv1d(3, 5, 1, r=2, lora_alpha=4), (torch.randn(2, 3, 6),)),
    ("conv3d_k1", lambda L: L.Conv3d(3, 5, 1, r=2, lora_alpha=4), (torch.randn(1, 3, 2, 3, 4),)),
    ("merged", lambda L: L.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True]),
     (torch.randn(3, 6),)),
    ("merged_fifo", lambda L: L.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[False, True, True],
                                             fan_in_fan_out=True), (torch.randn(3, 6),)),
]


@pytest.mark.parametrize("name,make,inputs", LAYERS, ids=[c[0] for c in LAYERS])
def test_layer_matches_loralib(name, make, inputs):
    torch.manual_seed(0)
    ref = _randomize(make(loralib))
    ours = _load_from_loralib(make(lnn), ref)
    assert isinstance(ours, (nn.Linear, nn.Embedding, nn.modules.conv._ConvNd))
    assert (ours.r, ours.lora_alpha, ours.scaling) == (ref.r, ref.lora_alpha, ref.scaling)
    assert ours.lora_A.shape == ref.lora_A.shape and ours.lora_B.shape == ref.lora_B.shape
    out = ours(*inputs)
    g = torch.randn_like(out)
    r_ref, r_ours = _run(ref, inputs, g), _run(ours, inputs, g)
    names = ["lora_A", "lora_B"] + (["bias"] if "bias" in r_ours[1] else [])
    ref_names = {"bias": "conv.bias"} if name.startswith("conv") else {}
    r_ref = (r_ref[0], {n: r_ref[1][ref_names.get(n, n)] for n in names}, r_ref[2])
    if getattr(ours, "padding_idx", None) is not None:
        # Deliberate difference: loralib lets positions holding padding_idx feed lora_B's gradient; the
        # exact LoRA reference (F.embedding(idx, W + ΔW, padding_idx)) gives them none, and so do we.
        names = [n for n in names if n != "lora_B"]
        w = ours.weight.detach()
        a, b = ours.lora_A.detach().clone().requires_grad_(), ours.lora_B.detach().clone().requires_grad_()
        merged = w + ours.scaling * (b @ a).T
        (F.embedding(inputs[0], merged, ours.padding_idx) * g).sum().backward()
        assert_close(r_ours[1]["lora_B"], b.grad)
    _assert_same(r_ref, r_ours, names)
    # eval: loralib merges into weight.data; ours computes the same function without touching W
    ref.eval(), ours.eval()
    with torch.no_grad():
        assert_close(ref(*inputs), ours(*inputs))


def test_same_seed_same_init_as_loralib():
    for make in (lambda L: L.Linear(7, 5, r=3, lora_alpha=6), lambda L: L.Embedding(11, 6, r=3),
                 lambda L: L.MergedLinear(6, 9, r=2, enable_lora=[True, False, True])):
        torch.manual_seed(3)
        ref = make(loralib)
        torch.manual_seed(3)
        ours = make(lnn)
        for k, v in ref.state_dict().items():
            assert torch.equal(v, ours.state_dict()[k]), k


def _plain_copy(layer, cls, **kw):
    plain = cls(**kw)
    plain.load_state_dict({k: v for k, v in layer.state_dict().items() if "lora_" not in k})
    return plain


@pytest.mark.parametrize("nd", [1, 2, 3])
def test_conv_any_kernel_matches_functional_reference(nd):
    cls = {1: lnn.Conv1d, 2: lnn.Conv2d, 3: lnn.Conv3d}[nd]
    base = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[nd]
    layer = _randomize(cls(3, 4, 3, r=2, lora_alpha=5, padding=1))
    assert layer.lora_A.shape == (6, 3 * 3 ** (nd - 1)) and layer.lora_B.shape == (12, 6)
    x = torch.randn(2, 3, *([5] * nd), requires_grad=True)
    plain = _plain_copy(layer, base, in_channels=3, out_channels=4, kernel_size=3, padding=1)
    A, B = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    ref = functional_call(plain, {"weight": lora_weight(plain.weight, A, B, 2.5)}, (x,))
    g = torch.randn_like(ref)
    gx_ref, gA, gB = torch.autograd.grad((ref * g).sum(), (x, A, B))
    out = layer(x)
    gx, gA2, gB2 = torch.autograd.grad((out * g).sum(), (x, layer.lora_A, layer.lora_B))
    assert_close(out, ref)
    for a, b in ((gx, gx_ref), (gA2, gA), (gB2, gB)):
        assert_close(a, b)
    # lora_factors: the same ΔW in lora_fx's (rank r·k·k) layout
    a, b = layer.lora_factors()["weight"]
    assert a.shape == (2 * 3 * 3, layer.weight[0].numel()) and b.shape == (4, 18)
    assert_close(b @ a, (layer.lora_B @ layer.lora_A).reshape(4, -1))


def test_mode_switches_identical_and_weights_untouched():
    """CASES.md 1: non-square and square embeddings and a Linear: train / eval / train give identical
    outputs (bit for bit) and no weight changes in place."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.e1 = lnn.Embedding(100, 32, r=4, lora_alpha=8)
            self.e2 = lnn.Embedding(32, 32, r=4, lora_alpha=8)
            self.fc = lnn.Linear(64, 32, r=4, lora_alpha=8)

        def forward(self, i, j):
            return self.fc(torch.cat([self.e1(i), self.e2(j)], -1))

    net = _randomize(Net())
    i, j = torch.randint(0, 100, (3, 5)), torch.randint(0, 32, (3, 5))
    weights = {n: (p.detach().clone(), p._version) for n, p in net.named_parameters()}
    outs = []
    for mode in (True, False, True, False):
        net.train(mode)
        outs.append(net(i, j).detach())
        assert net.fc.merged is False
    assert all(torch.equal(outs[0], o) for o in outs[1:])
    for n, p in net.named_parameters():
        assert torch.equal(p, weights[n][0]) and p._version == weights[n][1], n
    # loralib on the same values agrees to 1e-5 in both modes (it merges in place on eval)
    ref = Net.__new__(Net)
    nn.Module.__init__(ref)
    ref.e1, ref.e2 = loralib.Embedding(100, 32, r=4, lora_alpha=8), loralib.Embedding(32, 32, r=4, lora_alpha=8)
    ref.fc = loralib.Linear(64, 32, r=4, lora_alpha=8)
    ref.load_state_dict(net.state_dict())
    for mode in (True, False, True):
        ref.train(mode)
        assert_close(ref(i, j), outs[0])


def test_backward_after_mode_switch_is_exact():
    """loralib's eval() edits weight.data that a pending graph saved; here backward after a mode
    switch still gives the gradients of the forward that ran."""
    layer = _randomize(lnn.Linear(6, 4, r=2, lora_alpha=4, fan_in_fan_out=True))
    x = torch.randn(3, 6)
    out = layer(x)
    layer.eval()
    out.sum().backward()
    A, B = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    ref = F.linear(x, layer.weight.t() + 2 * B @ A, layer.bias)
    gA, gB = torch.autograd.grad(ref.sum(), (A, B))
    assert_close(layer.lora_A.grad, gA)
    assert_close(layer.lora_B.grad, gB)
    assert_close(lnn.merged_weight(layer), layer.weight + 2 * (B @ A).t())


def test_bf16_linear_with_fp32_factors_matches_reference():
    layer = _randomize(lnn.Linear(16, 8, r=4, lora_alpha=8, dtype=torch.bfloat16))
    with torch.no_grad():
        layer.lora_A.data = layer.lora_A.float()
        layer.lora_B.data = layer.lora_B.float()
    x = torch.randn(5, 16, dtype=torch.bfloat16)
    out = layer(x)
    assert out.dtype == torch.bfloat16
    ref = F.linear(x.float(), layer.weight.float() + 2 * layer.lora_B @ layer.lora_A, layer.bias.float())
    assert_close(out, ref, dtype=torch.bfloat16)


@pytest.mark.parametrize("enable", [["q", "k", "v", "o"], ["q", "v"], ["k", "o"]])
@pytest.mark.parametrize("separate", [False, True])
def test_multihead_attention_matches_reference(enable, separate):
    kw = dict(kdim=5, vdim=7) if separate else {}
    E, r, alpha = 8, 2, 6
    mha = _randomize(lnn.MultiheadAttention(E, 2, enable_lora=enable, r=r, lora_alpha=alpha, batch_first=True, **kw))
    assert isinstance(mha, nn.MultiheadAttention)
    plain = nn.MultiheadAttention(E, 2, batch_first=True, **kw)
    plain.load_state_dict({k: v for k, v in mha.state_dict().items() if "lora_" not in k})
    q = torch.randn(2, 3, E, requires_grad=True)
    k = torch.randn(2, 4, kw.get("kdim", E))
    v = torch.randn(2, 4, kw.get("vdim", E))
    s = alpha / r
    factors = {n: p.detach().clone().requires_grad_() for n, p in mha.named_parameters() if "lora_" in n}
    over = {}
    qkv = [c for c in "qkv" if c in enable]
    if qkv and not separate:
        name = "".join(qkv)
        assert factors[f"{name}_lora_B"].shape == (3 * E, r)
        mask = torch.tensor([c in enable for c in "qkv"], dtype=torch.float).repeat_interleave(E)[:, None]
        over["in_proj_weight"] = lora_weight(plain.in_proj_weight, factors[f"{name}_lora_A"],
                                             mask * factors[f"{name}_lora_B"], s)
    for c in qkv if separate else ():
        w = getattr(plain, f"{c}_proj_weight")
        over[f"{c}_proj_weight"] = lora_weight(w, factors[f"{c}_lora_A"], factors[f"{c}_lora_B"], s)
    if "o" in enable:
        over["out_proj.weight"] = lora_weight(plain.out_proj.weight, factors["o_lora_A"], factors["o_lora_B"], s)
    ref = functional_call(plain, over, (q, k, v))[0]
    g = torch.randn_like(ref)
    names = sorted(factors)
    ref_grads = torch.autograd.grad((ref * g).sum(), [q] + [factors[n] for n in names])
    out = mha(q, k, v)[0]
    params = dict(mha.named_parameters())
    grads = torch.autograd.grad((out * g).sum(), [q] + [params[n] for n in names])
    assert_close(out, ref)
    for a, b, n in zip(grads, ref_grads, ["query"] + names):
        assert_close(a, b, msg=n)
    assert not any(mha.get_parameter(n).requires_grad for n in over)  # adapted base weights frozen


def test_loratorch_checkpoint_layouts_load():
    """LoRA-Torch (Baijiong-Lin/LoRA-Torch, loratorch/layers.py), stated in plain torch: every
    adapted parameter ``p`` gets ``<name>_lora_A (r, p.shape[1])`` and ``<name>_lora_B
    (p.shape[0], r)`` with ``p_eff = p + (lora_alpha / r) · (B @ A).view(p.shape)``; name ``w`` for
    ``weight`` (Linear, Embedding), conv layers use loralib's ``(r·k, in·k)`` / ``(out/g·k, r·k)``."""
    torch.manual_seed(1)
    r, alpha = 2, 3
    s = alpha / r
    lin, emb, conv = nn.Linear(5, 4), nn.Embedding(9, 6), nn.Conv2d(3, 2, 3)
    ckpt = {
        "lin.weight": lin.weight, "lin.bias": lin.bias, "lin.w_lora_A": torch.randn(r, 5), "lin.w_lora_B": torch.randn(4, r),
        "emb.weight": emb.weight, "emb.w_lora_A": torch.randn(r, 6), "emb.w_lora_B": torch.randn(9, r),
        "conv.weight": conv.weight, "conv.bias": conv.bias,
        "conv.w_lora_A": torch.randn(r * 3, 3 * 3), "conv.w_lora_B": torch.randn(2 * 3, r * 3),
    }
    ours = nn.Module()
    ours.lin = lnn.Linear(5, 4, r=r, lora_alpha=alpha)
    ours.emb = lnn.Embedding(9, 6, r=r, lora_alpha=alpha)
    ours.conv = lnn.Conv2d(3, 2, 3, r=r, lora_alpha=alpha)
    ours.load_state_dict(ckpt, strict=True)
    x, i, img = torch.randn(3, 5), torch.tensor([1, 8, 0]), torch.randn(1, 3, 5, 5)
    dw = lambda m: s * (ckpt[f"{m}.w_lora_B"] @ ckpt[f"{m}.w_lora_A"])
    assert_close(ours.lin(x), F.linear(x, lin.weight + dw("lin"), lin.bias))
    assert_close(ours.emb(i), F.embedding(i, emb.weight + dw("emb")))
    assert_close(ours.conv(img), F.conv2d(img, conv.weight + dw("conv").view(conv.weight.shape),
                                         conv.bias))
    # MultiheadAttention: fused in_proj adapter named by the enabled letters, out_proj adapter "o"
    E = 8
    mha = lnn.MultiheadAttention(E, 2, enable_lora=["q", "v", "o"], r=r, lora_alpha=alpha)
    sd = {k: v for k, v in nn.MultiheadAttention(E, 2).state_dict().items()}
    qv_B = torch.randn(3 * E, r)
    qv_B[E:2 * E] = 0  # k block: not enabled
    sd.update({"qv_lora_A": torch.randn(r, E), "qv_lora_B": qv_B, "o_lora_A": torch.randn(r, E),
               "o_lora_B": torch.randn(E, r)})
    mha.load_state_dict(sd, strict=True)
    bad = dict(sd, qv_lora_B=torch.randn(3 * E, r))
    with pytest.raises(AdapterMismatchError, match="qv_lora_B"):
        mha.load_state_dict(bad)
    assert_close(mha.qv_lora_B, qv_B)


def test_loralib_conv_checkpoint_keys_and_conv_attribute():
    ref = _randomize(loralib.Conv2d(3, 4, 3, r=2, lora_alpha=2))
    ours = lnn.Conv2d(3, 4, 3, r=2, lora_alpha=2)
    ours.load_state_dict(ref.state_dict(), strict=True)  # conv.weight / conv.bias keys accepted
    assert ours.conv is ours and isinstance(ours, nn.Conv2d)
    x = torch.randn(1, 3, 6, 6)
    assert_close(ours(x), ref(x))
    assert set(ours.state_dict()) == {"weight", "bias", "lora_A", "lora_B"}  # a plain Conv2d's keys + LoRA


def test_config_errors_name_the_culprit():
    with pytest.raises(ConfigError, match="kernel_size"):
        lnn.Conv2d(3, 4, (3, 1), r=2)
    with pytest.raises(ConfigError, match="enable_lora"):
        lnn.MergedLinear(4, 9, r=2, enable_lora=[True, False])
    with pytest.raises(ConfigError, match="r must be"):
        lnn.Linear(4, 4, r=-1)
    with pytest.raises(ConfigError, match="'x'"):
        lnn.MultiheadAttention(8, 2, enable_lora=["q", "x"], r=2)
    with pytest.raises(ConfigError, match="no LoRA adapter"):
        lnn.merged_weight(lnn.Linear(4, 4, r=0))


def test_r0_layers_are_plain():
    for layer, x in ((lnn.Linear(4, 3), torch.randn(2, 4)), (lnn.Embedding(5, 3), torch.tensor([1, 4])),
                     (lnn.Conv1d(2, 3, 3), torch.randn(1, 2, 5)), (lnn.MergedLinear(4, 6, r=2), torch.randn(2, 4))):
        assert not [n for n, _ in layer.named_parameters() if "lora_" in n]
        assert layer.weight.requires_grad
        base = next(c for c in type(layer).__mro__ if c.__module__.startswith("torch.nn"))
        assert_close(layer(x), base.forward(layer, x))


def test_register_model_param_after_backward_is_noop():
    net = _randomize(lnn.Linear(4, 3, r=2))
    before = [(n, id(p)) for n, p in net.named_parameters()]
    net(torch.randn(2, 4)).sum().backward()
    assert lnn.register_model_param_after_backward(net) is net
    assert lora_fx.register_model_param_after_backward(net) is net
    assert [(n, id(p)) for n, p in net.named_parameters()] == before


@pytest.mark.parametrize("lowering", ["factored", "merge"])
def test_transform_over_lora_fx_nn_layers(lowering):
    """The pass leaves hand-built LoRA layers alone by default; named in targets, both updates apply."""
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = lnn.Linear(6, 5, r=2, lora_alpha=4)
            self.b = lnn.Linear(5, 4)  # r=0: a plain Linear for the pass
            self.c = nn.Linear(4, 3)

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    net = _randomize(Net())
    gm = lora_fx.transform(net, rank=2)
    assert {s.param for s in lora_fx.sites(gm)} == {"b.weight", "c.weight"}
    gm = lora_fx.transform(net, rank=3, alpha=3, targets=["a.weight"], lowering=lowering)
    site = lora_fx.sites(gm)[0]
    with torch.no_grad():
        site.lora_A.normal_(), site.lora_B.normal_()
    assert site.lowering == lowering
    x = torch.randn(2, 6)
    own = net.a.weight + 2 * net.a.lora_B @ net.a.lora_A
    ref = net.c(net.b(F.linear(x, own + site.lora_B @ site.lora_A, net.a.bias)))
    assert_close(gm(x), ref)


def _mixed_net():
    net = nn.Sequential()
    net.add_module("emb", lnn.Embedding(10, 8, r=2, lora_alpha=4))
    net.add_module("attn", lnn.MultiheadAttention(8, 2, enable_lora=["q", "v"], r=2, lora_alpha=4, batch_first=True))
    net.add_module("qkv", lnn.MergedLinear(8, 12, r=2, enable_lora=[True, False, True]))
    return net


def _mixed_forward(net, idx):
    h = net.emb(idx)
    h = net.attn(h, h, h, need_weights=False)[0]
    return net.qkv(h)


def test_ddp_pickle_and_dtype_moves():
    import io
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    net = _randomize(_mixed_net())
    lnn.mark_only_lora_as_trainable(net)
    idx = torch.randint(0, 10, (2, 5))
    ref = _mixed_forward(net, idx)
    buf = io.BytesIO()
    torch.save(net, buf)
    buf.seek(0)
    clone = torch.load(buf, weights_only=False)
    assert_close(_mixed_forward(clone, idx), ref, ulps=0)
    wide = clone.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in wide.parameters())
    assert _mixed_forward(wide, idx).dtype == torch.float64

    class Wrap(nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, idx):
            return _mixed_forward(self.m, idx)

    def body():  # in a child process with a deadline: a process group can hang in C++ (tests/_isolated.py)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1,
                                timeout=datetime.timedelta(seconds=60))
        model = DDP(Wrap(net), find_unused_parameters=False)
        frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(3):
            opt.zero_grad()
            model(idx).pow(2).mean().backward()
            opt.step()
        return (all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if n in frozen),
                all(p.grad is not None for p in net.parameters() if p.requires_grad))

    frozen_unchanged, trained = run_isolated(body)
    assert frozen_unchanged and trained
