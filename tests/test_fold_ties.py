"""fold keeps weight ties: every name of a folded parameter object that no unadapted consumer reads
points at the folded tensor, so the folded state dict loads ``strict=True`` into the original class."""

import copy

import torch
import torch.nn.functional as F
from torch import nn

import lora_fx


class Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(9, 6)
        self.fc = nn.Linear(6, 6)
        self.head_w = self.fc.weight  # second name of fc.weight, read by F.linear (fx reads it as fc.weight)
        self.head = nn.Linear(6, 9, bias=False)
        self.head.weight = self.emb.weight  # read by its own module call

    def forward(self, idx):
        h = torch.tanh(self.fc(self.emb(idx)))
        return self.head(F.linear(h, self.head_w))


def _adapted(model, **kw):
    gm = lora_fx.transform(model, rank=2, **kw)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            s.lora_B.normal_()
    return gm


def _ref(model, gm, idx):
    merged = {}
    for s in lora_fx.sites(gm):
        w = model.get_parameter(s.param)
        merged.update({a: w + s.scaling * (s.lora_B @ s.lora_A).reshape(w.shape) for a in s.aliases})
    return torch.func.functional_call(model, merged, (idx,), tie_weights=False, strict=False)


def test_all_aliases_targeted_stay_tied():
    model = Tied()
    gm = _adapted(model)
    idx = torch.randint(0, 9, (2, 4))
    folded = lora_fx.fold(gm)
    assert folded.fc.weight is folded.head_w and folded.emb.weight is folded.head.weight
    assert folded.meta["lora_fx"]["untied"] == []
    plain = copy.deepcopy(model).requires_grad_(False)
    plain.load_state_dict(folded.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(plain(idx), folded(idx))
        torch.testing.assert_close(folded(idx), gm(idx), rtol=1e-5, atol=1e-5)


def test_alias_read_by_unadapted_consumer_is_untied():
    model = Tied()
    gm = _adapted(model, targets=["emb.weight"])  # head.weight (same object) is not targeted
    idx = torch.randint(0, 9, (2, 4))
    with torch.no_grad():
        torch.testing.assert_close(gm(idx), _ref(model, gm, idx), rtol=1e-5, atol=1e-5)
        folded = lora_fx.fold(gm)
        assert folded.meta["lora_fx"]["untied"] == ["emb.weight"]
        assert folded.emb.weight is not folded.head.weight
        assert torch.equal(folded.head.weight, model.head.weight)
        torch.testing.assert_close(folded(idx), gm(idx), rtol=1e-5, atol=1e-5)
