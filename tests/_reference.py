"""The one functional reference of the suite: an adapted model must compute what the *original*
model computes with every adapted weight replaced,

    torch.func.functional_call(model, {name: W + s·ΔW})      ΔW = (B @ A).reshape(W.shape)

built here from the factors that :func:`lora_fx.sites` reports (CASES.md case 10), never from
lora_fx's own merge, fold or delta code.  It covers

* fused weights (``site.blocks``): rows of enabled block ``i`` are ``B_i @ A_i`` with
  ``A_i = A[i·r:(i+1)·r]`` and ``B_i`` the block's rows of ``B``; disabled rows are zero;
* tied weights: one tensor per parameter object, given for every targeted alias (``tie_all``: for
  every name of the object, for models that read a tied weight under a name the graph never uses);
* several adapters on one weight, each with its scaling, or with explicit mixing weights
  ``W + Σ w_name · s_name · ΔW_name`` (``s = alpha / rank``, ``alpha / sqrt(rank)`` for rsLoRA);
* DoRA (Liu et al., 2024, eq. 5): ``W' = lerp(W, m · V / ‖V‖_row, g)``, ``V = W + s·ΔW``, gate
  ``g = scaling / s`` (the documented formula of :func:`lora_fx.ops.dora_merge`, re-derived here);
* precision: ``W + s·ΔW`` is computed in ``promote(W, A, float32)`` and rounded once to ``W``'s
  dtype, or, with ``dtype=``, the whole reference runs in that dtype (a float64 reference of the
  same low-precision values).

Everything is differentiable in the factors (the sites' ``lora_A`` / ``lora_B``, or the leaf
copies of :func:`leaf_factors`), so gradients are compared too.
"""

from __future__ import annotations

import copy
import math
from typing import Mapping

import torch
from torch import nn

import lora_fx

from _tolerance import assert_close

__all__ = ["randomize_", "set_factors_", "lora_weight", "delta", "factor_grads", "leaf_factors", "base_scaling",
           "reference_overrides", "reference_call", "reference_model", "check_matches_reference"]


# ------------------------------------------------------------------------------------------ factors


def set_factors_(site, *, seed: int, scale: float = 0.2) -> None:
    """Non-zero, deterministic ``lora_A`` and ``lora_B`` on one site (B starts at zero after transform)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (site.lora_A, site.lora_B):
            p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))


def randomize_(gm: nn.Module, *, seed: int = 1, scale: float = 0.5, adapter: str | None = None,
               magnitude: float = 0.0) -> nn.Module:
    """Non-zero random ``lora_A`` / ``lora_B`` on every site (of ``adapter`` only, if given), drawn
    from one generator seeded with ``seed``, so a missing or doubled delta shows; ``magnitude > 0``
    also scales DoRA magnitudes by ``1 + magnitude · U[0, 1)``.  Returns ``gm``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for s in lora_fx.sites(gm):
            if adapter is not None and s.adapter != adapter:
                continue
            for p in (s.lora_A, s.lora_B):
                p.copy_((torch.randn(p.shape, generator=g) * scale).to(p.dtype))
            m = getattr(s.module, "lora_magnitude", None)
            if magnitude and m is not None:
                m.mul_((1 + magnitude * torch.rand(m.shape, generator=g)).to(m.dtype))
    return gm


def _key(site) -> tuple[str, str]:
    return site.param, site.adapter


def leaf_factors(gm: nn.Module, *, dtype: torch.dtype | None = None) -> dict:
    """``{(param, adapter): (A, B)}``: detached leaf copies (``requires_grad=True``, in ``dtype`` if
    given) of every site's factors, to pass as ``factors=`` and read the reference's gradients."""
    out = {}
    for s in lora_fx.sites(gm):
        out[_key(s)] = tuple(p.detach().clone().to(dtype or p.dtype).requires_grad_(True)
                             for p in (s.lora_A, s.lora_B))
    return out


# ------------------------------------------------------------------------------------------ ΔW


def _delta_rows(a: torch.Tensor, b: torch.Tensor, shape, blocks=(), transposed: bool = False) -> torch.Tensor:
    """``(B @ A).reshape(shape)``; fused ``blocks`` ``((name, rows, enabled), ...)``: enabled block
    ``i`` gets ``B_i @ A_i``, disabled rows exact zeros.  Expert adapters (3-D factors
    ``A (E, r, in)``, ``B (E, out, r)``): ``B[e] @ A[e]`` per expert, transposed to the storage of a
    ``transposed`` stack ``(E, in, out)``."""
    if a.dim() == 3:
        d = b @ a
        return d.transpose(-2, -1) if transposed else d
    if not blocks:
        return (b @ a).reshape(shape)
    n_on = sum(bool(on) for _, _, on in blocks)
    r = a.shape[0] // n_on
    rows, ia, ib = [], 0, 0
    for _, n, on in blocks:
        if on:
            rows.append(b[ib:ib + n] @ a[ia:ia + r])
            ia, ib = ia + r, ib + n
        else:
            rows.append(a.new_zeros(n, a.shape[1]))
    return torch.cat(rows).reshape(shape)


def lora_weight(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, blocks=(), *,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """``W + scaling · ΔW``: computed in ``promote(W, A, float32)`` and rounded once to ``W``'s
    dtype, or computed and returned in ``dtype``.  Differentiable in ``w``, ``a`` and ``b``."""
    compute = dtype or torch.promote_types(torch.promote_types(w.dtype, a.dtype), torch.float32)
    out = w.to(compute) + scaling * _delta_rows(a.to(compute), b.to(compute), w.shape, blocks)
    return out if dtype is not None else out.to(w.dtype)


def delta(site, *, dtype: torch.dtype = torch.float32, scaling: float | None = None) -> torch.Tensor:
    """``s · ΔW`` of ``site`` in ``dtype`` (detached), from the documented layout."""
    s = site.scaling if scaling is None else scaling
    return s * _delta_rows(site.lora_A.detach().to(dtype), site.lora_B.detach().to(dtype), site.shape, site.blocks,
                           _transposed(site))


def _transposed(site) -> bool:
    return bool(getattr(site.module, "transposed", False))


def factor_grads(site, grad_w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(dL/dA, dL/dB)`` from ``dL/dW'`` by the chain rule through ``W' = W + s·ΔW`` (float32)."""
    g = grad_w.detach().float().reshape(site.shape[0], -1)
    a, b = site.lora_A.detach().float(), site.lora_B.detach().float()
    blocks = site.blocks or (("all", site.shape[0], True),)
    n_on = sum(bool(on) for _, _, on in blocks)
    r = a.shape[0] // n_on
    da, db, start, ia, ib = [], [], 0, 0, 0
    for _, n, on in blocks:
        if on:
            gi, ai, bi = g[start:start + n], a[ia:ia + r], b[ib:ib + n]
            da.append(site.scaling * bi.t() @ gi)
            db.append(site.scaling * gi @ ai.t())
            ia, ib = ia + r, ib + n
        start += n
    return torch.cat(da), torch.cat(db)


def base_scaling(site) -> float:
    """``alpha / rank`` (``alpha / sqrt(rank)`` for rsLoRA) from the site's reported values."""
    rslora = bool(getattr(site.module, "use_rslora", False))
    return site.alpha / (math.sqrt(site.rank) if rslora else site.rank)


# ------------------------------------------------------------------------------------------ reference


def reference_overrides(model: nn.Module, gm: nn.Module, *, factors: Mapping | None = None,
                        weights: Mapping[str, float] | None = None, base: Mapping[str, torch.Tensor] | None = None,
                        dtype: torch.dtype | None = None, tie_all: bool = False) -> dict[str, torch.Tensor]:
    """``{name: W'}`` for ``functional_call(model, ...)``: every targeted alias of every adapted
    parameter of ``model`` (the original) gets ``W + Σ s·ΔW`` over the sites of ``gm`` that adapt it.

    Args:
        factors: ``{(param, adapter): (A, B)}`` to use instead of the sites' parameters
            (:func:`leaf_factors`).
        weights: ``{adapter: w}``: use ``w · alpha/rank`` as each adapter's scaling (adapters not
            named add nothing) instead of the scaling the site reports.
        base: ``{name: W}``: base values to start from instead of ``model``'s (PiSSA residuals).
        dtype: compute and return in this dtype (else round once to ``W``'s dtype).
        tie_all: give the tensor to every name of the parameter object, not only the targeted
            aliases (a model that reads a tied weight under a name the graph never uses).
    """
    params = dict(model.named_parameters(remove_duplicate=False))
    by_obj: dict[int, list[str]] = {}
    for name, p in params.items():
        by_obj.setdefault(id(p), []).append(name)
    names_of: dict[str, list] = {}  # alias -> the sites adapting it
    for s in lora_fx.sites(gm):
        if weights is not None and s.adapter not in weights:
            continue
        obj = id(params[s.param])
        for alias in (by_obj[obj] if tie_all else s.aliases):
            names_of.setdefault(alias, []).append(s)
    out, memo = {}, {}
    for alias, site_list in names_of.items():
        key = tuple(_key(s) for s in site_list)
        if key not in memo:
            memo[key] = _merged(params, site_list, factors, weights, base or {}, dtype)
        out[alias] = memo[key]
    return out


def _merged(params, site_list, factors, weights, base, dtype):
    first = site_list[0]
    w = base.get(first.param, params[first.param])
    compute = dtype or torch.promote_types(torch.promote_types(w.dtype, first.lora_A.dtype), torch.float32)
    value = w.to(compute)
    scalings = [weights[s.adapter] * base_scaling(s) if weights is not None else s.scaling for s in site_list]
    active = [s for s, c in zip(site_list, scalings) if c != 0]
    if len(active) > 1 and any(getattr(s.module, "use_dora", False) for s in active):
        raise NotImplementedError("reference: an active DoRA adapter combined with another one on one weight")
    for s, scaling in zip(site_list, scalings):
        a, b = factors[_key(s)] if factors is not None and _key(s) in factors else (s.lora_A, s.lora_B)
        a, b = a.to(compute), b.to(compute)
        s_base = base_scaling(s)
        d = _delta_rows(a, b, w.shape, s.blocks, _transposed(s))
        if getattr(s.module, "use_dora", False):  # eq. 5 of DoRA with the adapter's gate
            v = value + s_base * d
            norm = v.flatten(1).norm(dim=1).reshape((-1,) + (1,) * (w.ndim - 1))
            m = s.module.lora_magnitude.to(compute).reshape(norm.shape)
            value = value + (scaling / s_base) * (m * v / norm - value)
        else:
            value = value + scaling * d
    return value if dtype is not None else value.to(w.dtype)


def _cast(args, dtype):
    return tuple(x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x for x in args)


def reference_call(model: nn.Module, gm: nn.Module, args=(), kwargs=None, *, extra: Mapping | None = None,
                   dtype: torch.dtype | None = None, **overrides):
    """``functional_call(model, reference_overrides(model, gm, ...) | extra, args, kwargs)``.

    ``dtype``: the reference runs in that dtype on a copy of ``model`` (floating inputs cast too):
    the same values, computed in higher (or other) precision.  ``extra``: further ``{name: tensor}``
    (e.g. buffers that training moved).  Other keywords go to :func:`reference_overrides`.
    """
    if not isinstance(args, tuple):
        args = tuple(args) if isinstance(args, list) else (args,)
    if dtype is not None:
        tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
        if any(t.dtype != dtype for t in tensors):  # .to() works in place: on a copy
            model = copy.deepcopy(model).to(dtype)
        args = _cast(args, dtype)
        kwargs = dict(zip(kwargs, _cast(tuple(kwargs.values()), dtype))) if kwargs else kwargs
    over = reference_overrides(model, gm, dtype=dtype, **overrides)
    over.update(extra or {})
    before = {n: id(t) for n, t in (*model.named_parameters(remove_duplicate=False),
                                    *model.named_buffers(remove_duplicate=False))}
    out = torch.func.functional_call(model, _one_name_per_attribute(model, over), args, kwargs or {},
                                     tie_weights=False, strict=False)
    after = {n: id(t) for n, t in (*model.named_parameters(remove_duplicate=False),
                                   *model.named_buffers(remove_duplicate=False))}
    assert after == before, "reference: functional_call did not restore the model's tensors"
    return out


def _one_name_per_attribute(model: nn.Module, over: dict) -> dict:
    """Keep one name per (owning module, attribute): a module registered under two paths (``self.b
    = self.a``) is one attribute, and ``torch.func.functional_call`` given both names restores the
    second from the first's override, leaving the override in the model (torch 2.13).  Different
    modules sharing one tensor (a tied head) keep both names."""
    seen, out = set(), {}
    for name, t in over.items():
        path, _, attr = name.rpartition(".")
        key = (id(model.get_submodule(path)), attr)
        if key not in seen:
            seen.add(key)
            out[name] = t
    return out


def reference_model(model: nn.Module, gm: nn.Module, **overrides) -> nn.Module:
    """A deep copy of ``model`` whose adapted weights hold ``W + s·ΔW`` (computed as in
    :func:`reference_overrides`): for code paths ``functional_call`` cannot reach (fused kernels
    that check parameters, ``torch.export``)."""
    ref = copy.deepcopy(model)
    values = {k: v.detach() for k, v in reference_overrides(model, gm, **overrides).items()}
    with torch.no_grad():
        for name, v in values.items():
            ref.get_parameter(name).copy_(v)
    return ref


def check_matches_reference(model: nn.Module, gm: nn.Module, inputs, *, dtype=torch.float32, grad_input: bool = True,
                            seed: int = 7, ulps: float | None = None, **overrides) -> torch.Tensor:
    """Outputs and gradients of every ``lora_A``, ``lora_B`` and the floating inputs of ``gm`` equal
    those of the functional reference, within :func:`_tolerance.assert_close` of a computation in
    ``dtype``.  Returns ``gm``'s output."""

    def prep():
        return [x.detach().clone().requires_grad_(grad_input and x.is_floating_point()) for x in inputs]

    xg, xr = prep(), prep()
    out = gm(*xg)
    ref = reference_call(model, gm, tuple(xr), **overrides)
    assert out.dtype == ref.dtype and out.shape == ref.shape, (out.dtype, ref.dtype, out.shape, ref.shape)
    assert_close(out, ref, dtype=dtype, ulps=ulps)
    gy = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    factors = [p for s in lora_fx.sites(gm) for p in (s.lora_A, s.lora_B)]
    g1 = torch.autograd.grad(out, factors + [x for x in xg if x.requires_grad], gy, allow_unused=True)
    g2 = torch.autograd.grad(ref, factors + [x for x in xr if x.requires_grad], gy, allow_unused=True)
    for a, b in zip(g1, g2):
        assert (a is None) == (b is None)
        if a is not None:
            assert_close(a, b, dtype=dtype, ulps=ulps)
    return out
