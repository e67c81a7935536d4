"""lora_fx.nn.layout: every map between loralib layouts and lora_fx's pair keeps ΔW exactly."""

import torch
from hypothesis import given, settings, strategies as st

from lora_fx.nn import layout
from _tolerance import assert_close


@settings(max_examples=30, deadline=None, derandomize=True)
@given(nd=st.integers(1, 3), k=st.integers(1, 3), g=st.integers(1, 3), r=st.integers(1, 3),
       cin=st.integers(1, 2), cout=st.integers(1, 2))
def test_conv_layouts_round_trip(nd, k, g, r, cin, cout):
    if k % g:
        return
    cin, cout = cin * g, cout * g
    shape = (cout, cin // g) + (k,) * nd
    gen = torch.Generator().manual_seed(nd * 100 + k * 10 + g)
    A = torch.randn(r * k, cin * k ** (nd - 1), generator=gen, dtype=torch.float64)
    B = torch.randn(cout // g * k, r * k, generator=gen, dtype=torch.float64)
    dw = (B @ A).reshape(shape)  # loralib / LoRA-Torch: (B @ A).view(W.shape)
    a, b = layout.conv_to_ours(A, B, shape, k, g)
    assert a.shape == (r * k * k // g, dw[0].numel()) and b.shape == (cout, r * k * k // g)
    assert_close((b @ a).reshape(shape), dw)
    A2, B2, r2 = layout.conv_from_ours(a, b, shape, k, g)
    assert A2.shape == (r2 * k, A.shape[1]) and B2.shape == (B.shape[0], r2 * k)
    assert_close((B2 @ A2).reshape(shape), dw)


@settings(max_examples=20, deadline=None, derandomize=True)
@given(flags=st.lists(st.booleans(), min_size=1, max_size=4).filter(any), r=st.integers(1, 3), d=st.integers(1, 3))
def test_merged_layouts_match_loralib_grouped_conv(flags, r, d):
    n_on = sum(flags)
    gen = torch.Generator().manual_seed(len(flags) * 10 + r)
    A = torch.randn(r * n_on, 5, generator=gen, dtype=torch.float64)
    B = torch.randn(d * n_on, r, generator=gen, dtype=torch.float64)
    # loralib MergedLinear.merge_AB: grouped conv1d, then zero rows for disabled blocks
    grouped = torch.nn.functional.conv1d(A.unsqueeze(0), B.unsqueeze(-1), groups=n_on).squeeze(0)
    ref = torch.zeros(d * len(flags), 5, dtype=torch.float64)
    ref[torch.tensor(flags).repeat_interleave(d)] = grouped
    ours = layout.merged_B(B, flags, r) @ A
    assert_close(ours, ref)
    A2, B2 = layout.merged_from_ours(A, layout.merged_B(B, flags, r), flags)
    back = torch.nn.functional.conv1d(A2.unsqueeze(0), B2.unsqueeze(-1), groups=n_on).squeeze(0)
    assert_close(back, grouped)
