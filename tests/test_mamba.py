"""Causal conv1d, RMSNorm / fused add-norm, and the Mamba mixer and Block against their references."""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from seqssm.layers.mamba import Block, Mamba
from seqssm.layers.norm import RMSNorm, add_norm
from seqssm.ops.causal_conv import (
    causal_conv1d,
    causal_conv1d_ref,
    causal_conv1d_torch,
    causal_conv1d_update,
    causal_conv1d_update_ref,
)
from seqssm.ops.selective_scan import selective_scan_ref


# Tiny tensors: one thread avoids OpenMP synchronisation costs (large on a busy machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


# ----------------------------------------------------------------------------------------------
# causal conv1d


@pytest.mark.parametrize("W", [2, 3, 4, 5])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_causal_conv_ref_equals_conv1d(W, activation, use_bias):
    g = torch.Generator().manual_seed(W)
    x = torch.randn(2, 6, 23, generator=g)
    w = torch.randn(6, W, generator=g)
    b = torch.randn(6, generator=g) if use_bias else None
    # mamba-ssm's slow path: nn.Conv1d padded on both sides, first L outputs kept
    conv = nn.Conv1d(6, 6, W, groups=6, padding=W - 1, bias=use_bias)
    with torch.no_grad():
        conv.weight.copy_(w[:, None])
        if use_bias:
            conv.bias.copy_(b)
    direct = conv(x)[..., :23]
    if activation:
        direct = F.silu(direct)
    ref = causal_conv1d_ref(x, w, b, activation=activation)
    assert torch.allclose(ref, direct, atol=1e-6)
    assert torch.allclose(causal_conv1d_torch(x, w, b, activation=activation), direct, atol=1e-6)
    assert torch.allclose(causal_conv1d(x, w, b, activation=activation), direct, atol=1e-6)


@pytest.mark.parametrize("L", [1, 2, 9])
def test_causal_conv_initial_and_final_states(L):
    g = torch.Generator().manual_seed(L)
    W = 4
    prev = torch.randn(2, 5, 7, generator=g)
    x = torch.randn(2, 5, L, generator=g)
    w, b = torch.randn(5, W, generator=g), torch.randn(5, generator=g)
    whole = causal_conv1d_ref(torch.cat([prev, x], -1), w, b, activation="silu")[..., -L:]
    for fn in (causal_conv1d_ref, causal_conv1d_torch):
        out, final = fn(x, w, b, initial_states=prev[..., -(W - 1):], return_final_states=True, activation="silu")
        assert torch.allclose(out, whole, atol=1e-6)
        assert torch.equal(final, torch.cat([prev, x], -1)[..., -(W - 1):])
    # no initial state: the final state is zero-padded on the left when the input is short
    _, final = causal_conv1d_torch(x, w, b, return_final_states=True)
    assert torch.equal(final, F.pad(x, (W - 1, 0))[..., -(W - 1):])


@pytest.mark.parametrize("state_len", [3, 4, 6])
def test_causal_conv_update_equals_forward(state_len):
    g = torch.Generator().manual_seed(state_len)
    W, L = 4, 11
    x = torch.randn(2, 5, L, generator=g)
    w, b = torch.randn(5, W, generator=g), torch.randn(5, generator=g)
    full = causal_conv1d_ref(x, w, b, activation="silu")
    state = torch.zeros(2, 5, state_len)
    steps = [causal_conv1d_update(x[..., t], state, w, b, "silu") for t in range(L)]
    assert torch.allclose(torch.stack(steps, -1), full, atol=1e-6)
    assert torch.equal(state, F.pad(x, (state_len, 0))[..., -state_len:])
    # a few positions at once, from a state
    state2 = torch.zeros(2, 5, state_len)
    a = causal_conv1d_update_ref(x[..., :4], state2, w, b, "silu")
    c = causal_conv1d_update_ref(x[..., 4:], state2, w, b, "silu")
    assert torch.allclose(torch.cat([a, c], -1), full, atol=1e-6)


def test_causal_conv_dispatch_on_cpu():
    x, w = torch.randn(1, 4, 8), torch.randn(4, 4)
    with pytest.raises(ValueError, match="CUDA device"):
        causal_conv1d(x, w, backend="cuda")
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d(x, w, activation="relu")
    with pytest.raises(ValueError, match="initial_states"):
        causal_conv1d(x, w, initial_states=torch.zeros(1, 4, 2))


# ----------------------------------------------------------------------------------------------
# RMSNorm and the residual add + norm


def test_rms_norm():
    norm = RMSNorm(8, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2, 8))
    x = torch.randn(3, 4, 8)
    want = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight
    assert torch.allclose(norm(x), want, atol=1e-6)
    assert list(norm.state_dict()) == ["weight"]
    xb = x.bfloat16()
    assert norm(xb).dtype == torch.bfloat16  # computed in float32, returned in the input's dtype
    assert torch.equal(norm(xb), (xb.float() / torch.sqrt(xb.float().pow(2).mean(-1, keepdim=True) + 1e-5)
                                  * norm.weight).bfloat16())


@pytest.mark.parametrize("norm_cls", [RMSNorm, nn.LayerNorm])
@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_add_norm_fused_and_unfused_agree_in_float32(norm_cls, residual_in_fp32):
    norm = norm_cls(8)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x, r = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    for residual in (None, r):
        outs = [add_norm(x, residual, norm, residual_in_fp32=residual_in_fp32, prenorm=True, fused=f)
                for f in (True, False)]
        (o1, r1), (o2, r2) = outs
        assert torch.allclose(o1, o2, atol=1e-6) and torch.allclose(r1, r2, atol=1e-7)
        assert torch.allclose(r1, x if residual is None else x + r)
        assert torch.allclose(o1, norm(x if residual is None else x + r), atol=1e-6)
    assert torch.equal(add_norm(x, r, norm, prenorm=False), add_norm(x, r, norm, prenorm=True)[0])


def test_add_norm_fused_semantics_in_bf16():
    """The fused kernel: sum in float32, norm in float32, output in x's dtype; residual dtype rules."""
    norm = RMSNorm(8)
    x = torch.randn(2, 5, 8).bfloat16()
    r = torch.randn(2, 5, 8).bfloat16()
    out, res = add_norm(x, r, norm, prenorm=True, fused=True)
    s = x.float() + r.float()
    assert out.dtype == torch.bfloat16 and res.dtype == torch.bfloat16
    assert torch.equal(out, (s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight).bfloat16())
    assert torch.equal(res, s.bfloat16())
    # first block: residual_in_fp32 keeps the residual in float32, else in x's dtype
    assert add_norm(x, None, norm, residual_in_fp32=True, prenorm=True)[1].dtype == torch.float32
    assert add_norm(x, None, norm, residual_in_fp32=False, prenorm=True)[1].dtype == torch.bfloat16
    # a float32 residual stays float32 (its dtype wins once it exists)
    assert add_norm(x, r.float(), norm, prenorm=True)[1].dtype == torch.float32
    # unfused: the norm sees the residual cast to the weight dtype
    out_u, res_u = add_norm(x, r, norm, residual_in_fp32=True, prenorm=True, fused=False)
    assert res_u.dtype == torch.float32 and torch.equal(res_u, (x + r).float())
    assert torch.equal(out_u, norm((x + r).float()))


# ----------------------------------------------------------------------------------------------
# Mamba


def randomized(module, seed=0, scale=0.05):
    """Perturb every parameter so that no test passes thanks to a special initial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g))
    return module.eval()


def test_mamba_parameter_names_and_shapes_are_mamba_ssm_s():
    m = Mamba(40, d_state=16, d_conv=4, expand=2)
    dt_rank = math.ceil(40 / 16)
    want = [
        ("A_log", (80, 16)), ("D", (80,)), ("in_proj.weight", (160, 40)), ("conv1d.weight", (80, 1, 4)),
        ("conv1d.bias", (80,)), ("x_proj.weight", (dt_rank + 32, 80)), ("dt_proj.weight", (80, dt_rank)),
        ("dt_proj.bias", (80,)), ("out_proj.weight", (40, 80)),
    ]
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == want
    biased = Mamba(40, bias=True, conv_bias=False, dt_rank=7)
    assert "in_proj.bias" in biased.state_dict() and "out_proj.bias" in biased.state_dict()
    assert "conv1d.bias" not in biased.state_dict() and biased.dt_proj.weight.shape == (80, 7)


def test_mamba_initialization():
    torch.manual_seed(0)
    m = Mamba(64, d_state=8, dt_min=0.001, dt_max=0.1, dt_init_floor=1e-4, dt_scale=1.0)
    dt = F.softplus(m.dt_proj.bias)
    assert dt.min() >= 0.001 * 0.999 and dt.max() <= 0.1 * 1.001
    assert torch.allclose(-torch.exp(m.A_log), -torch.arange(1, 9.0).repeat(128, 1))
    assert torch.equal(m.D, torch.ones(128))
    bound = m.dt_rank ** -0.5
    assert m.dt_proj.weight.abs().max() <= bound
    assert m.A_log.dtype == m.D.dtype == torch.float32
    assert getattr(m.dt_proj.bias, "_no_reinit", False)
    floored = Mamba(8, d_state=2, dt_min=1e-6, dt_max=2e-6, dt_init_floor=1e-3)
    assert torch.allclose(F.softplus(floored.dt_proj.bias), torch.full((16,), 1e-3), rtol=1e-4)


def mamba_reference_forward(m: Mamba, hidden):
    """mamba-ssm's Mamba.forward slow path (no causal-conv1d, no fused kernel), written out."""
    batch, L, _ = hidden.shape
    xz = (m.in_proj.weight @ hidden.reshape(-1, m.d_model).t()).reshape(-1, batch, L).transpose(0, 1)
    if m.in_proj.bias is not None:
        xz = xz + m.in_proj.bias[:, None]
    A = -torch.exp(m.A_log.float())
    x, z = xz.chunk(2, dim=1)
    x = F.silu(m.conv1d(x)[..., :L])
    x_dbl = m.x_proj(x.transpose(1, 2).reshape(batch * L, -1))
    dt, B, C = torch.split(x_dbl, [m.dt_rank, m.d_state, m.d_state], dim=-1)
    dt = (m.dt_proj.weight @ dt.t()).reshape(-1, batch, L).transpose(0, 1)
    B = B.reshape(batch, L, -1).transpose(1, 2)
    C = C.reshape(batch, L, -1).transpose(1, 2)
    y = selective_scan_ref(x, dt, A, B, C, m.D.float(), z=z, delta_bias=m.dt_proj.bias.float(), delta_softplus=True)
    return m.out_proj(y.transpose(1, 2))


def test_mamba_forward_equals_reference_forward_and_gradients():
    torch.manual_seed(1)
    m = randomized(Mamba(32, d_state=8, bias=True), seed=1)
    x = torch.randn(2, 70, 32)
    assert rel(m(x), mamba_reference_forward(m, x)) <= 1e-5
    # gradients through the chunked scan equal those through the reference loop
    grads = []
    for fn in (m, lambda h: mamba_reference_forward(m, h)):
        m.zero_grad()
        xi = x.clone().requires_grad_(True)
        (fn(xi) * torch.linspace(-1, 1, 32)).sum().backward()
        grads.append([xi.grad.clone()] + [p.grad.clone() for p in m.parameters()])
    for a, b in zip(*grads):
        assert rel(a, b) <= 1e-4


def test_mamba_step_equals_forward():
    torch.manual_seed(2)
    m = randomized(Mamba(24, d_state=6, d_conv=4), seed=2)
    x = torch.randn(3, 40, 24)
    with torch.no_grad():
        full = m(x)
        conv_state, ssm_state = m.allocate_state(3)
        outs = []
        for t in range(40):
            o, cs, ss = m.step(x[:, t : t + 1], conv_state, ssm_state)
            assert cs is conv_state and ss is ssm_state  # updated in place
            outs.append(o)
        assert rel(torch.cat(outs, 1), full) <= 1e-5
        # [B, D] input works as well, and the state after the sequence equals forward's
        _, state = m(x, return_state=True)
        assert rel(ssm_state, state[1]) <= 1e-5 and torch.allclose(conv_state, state[0], atol=1e-6)
        o2 = m.step(x[:, 0], *m.allocate_state(3))[0]
        assert o2.shape == (3, 24) and torch.allclose(o2, full[:, 0], atol=1e-6)


@pytest.mark.parametrize("cut", [1, 2, 3, 17, 63])
def test_mamba_windows_with_carried_state_equal_the_whole(cut):
    torch.manual_seed(3)
    m = randomized(Mamba(16, d_state=4, d_conv=4), seed=3)
    x = torch.randn(2, 65, 16)
    with torch.no_grad():
        whole, last = m(x, return_state=True)
        y1, s1 = m(x[:, :cut], return_state=True)
        y2, s2 = m(x[:, cut:], state=s1, return_state=True)
        # three windows: the state after the second must not depend on where the cuts were
        y3, s3 = m(x[:, cut:cut + 1], state=s1, return_state=True)
        y4, s4 = m(x[:, cut + 1:], state=s3, return_state=True)
    assert rel(torch.cat([y1, y2], 1), whole) <= 1e-5
    assert rel(torch.cat([y1, y3, y4], 1), whole) <= 1e-5
    assert rel(s2[1], last[1]) <= 1e-5 and rel(s4[1], last[1]) <= 1e-5
    assert torch.allclose(s2[0], last[0], atol=1e-6) and torch.allclose(s4[0], last[0], atol=1e-6)
    assert s1[0].shape == (2, 32, 4) and s1[1].shape == (2, 32, 4)


def test_mamba_rejects_bad_input():
    m = Mamba(16, d_state=4)
    with pytest.raises(ValueError, match="expected"):
        m(torch.randn(2, 10, 8))
    with pytest.raises(ValueError, match="length 0"):
        m(torch.randn(2, 0, 16))
    with pytest.raises(ValueError, match="one position"):
        m.step(torch.randn(2, 3, 16), *m.allocate_state(2))


# ----------------------------------------------------------------------------------------------
# Block


@pytest.mark.parametrize("fused", [True, False])
def test_block_forward_and_step(fused):
    torch.manual_seed(4)
    dim = 16
    blocks = [randomized(Block(dim, Mamba(dim, d_state=4), RMSNorm(dim), fused_add_norm=fused, residual_in_fp32=True),
                         seed=10 + i) for i in range(2)]
    assert list(blocks[0].state_dict())[0] == "norm.weight"  # mamba-ssm v2 Block: norm, then mixer
    x = torch.randn(2, 30, dim)
    with torch.no_grad():
        h, r = x, None
        for b in blocks:
            h, r = b(h, r)
        # by hand: r1 = x, h1 = mixer1(norm1(x)); r2 = h1 + r1, h2 = mixer2(norm2(r2))
        r1 = x
        h1 = blocks[0].mixer(blocks[0].norm(r1))
        r2 = h1 + r1
        h2 = blocks[1].mixer(blocks[1].norm(r2))
        assert torch.allclose(h, h2, atol=1e-6) and torch.allclose(r, r2, atol=1e-6)
        assert r.dtype == torch.float32
        # step by step through both blocks
        states = [b.mixer.allocate_state(2) for b in blocks]
        outs = []
        for t in range(30):
            hs, rs = x[:, t], None
            for b, st in zip(blocks, states):
                hs, rs = b.step(hs, rs, *st)
            outs.append(hs)
        assert rel(torch.stack(outs, 1), h) <= 1e-5
        # with state in and out
        h1a, r1a, s1a = blocks[0](x[:, :12], None, return_state=True)
        h1b, r1b, _ = blocks[0](x[:, 12:], None, state=s1a, return_state=True)
        ha, _ = blocks[0](x, None)
        assert rel(torch.cat([h1a, h1b], 1), ha) <= 1e-5
