"""Exact forwards of specific token mixers on a sharded sequence (the model's own math, reorganised).

Each function takes the mixer module, this rank's tokens (B, S_local, H) and the ``SeqLayout``
and returns what the module's forward would return for these tokens had it run on the whole
sequence. Token-wise parts (projections, gates, norms) stay on the local tokens; only the part
that mixes tokens moves:

- gated delta-net (Qwen3-Next, Qwen3.5): head-parallel. One all-to-all gives each rank the whole
  sequence, in order, for a subset of key heads (with their value heads); the depthwise
  convolution and the delta-rule recurrence run there; one all-to-all brings the output back.
- Mamba2 (Bamba, GraniteMoeHybrid): head-parallel the same way (convolution + chunked scan);
  the B/C groups a rank's heads use travel with them.
- short convolution (LFM2): a convolution of width K needs only the K-1 tokens before each run
  of consecutive tokens a rank holds: those few tokens are fetched, nothing else moves.

The recurrence kernels are the family module's own functions (``torch_chunk_gated_delta_rule``,
``mamba2_chunk_scan``, ``causal_conv1d_fn``), so hub kernels replace them where installed.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.nn.functional as F

from .seqcomm import SeqLayout, fetch_tokens, take, to_heads, to_tokens


def _family(module: torch.nn.Module):
    return sys.modules[type(module).__module__]


def split_units(units: int, size: int) -> list[range]:
    """Contiguous, as even as possible: rank r gets units [r * units // size, (r + 1) * units // size)."""
    return [range(r * units // size, (r + 1) * units // size) for r in range(size)]


def _span(start: int, stop: int, width: int) -> list[int]:
    return list(range(start * width, stop * width))


@dataclass(frozen=True)
class HeadPlan:
    sends: list[list[int]]  # per rank: the projected features it receives
    conv: list[list[int]]  # per rank: its convolution channels (rows of the conv weight)
    heads: list[range]  # per rank: its (value) heads
    widths: list[int]  # per rank: features of its output (heads x head dim)


# ------------------------------------------------------------------------------ gated delta-net
@lru_cache(maxsize=32)
def gdn_plan(hk: int, hv: int, dk: int, dv: int, size: int) -> HeadPlan:
    """Key heads split over ranks, each with its value heads; features of cat(q, k, v, b, a)."""
    g = hv // hk
    key_dim, value_dim = hk * dk, hv * dv
    conv_dim = 2 * key_dim + value_dim
    sends, conv, heads, widths = [], [], [], []
    for units in split_units(hk, size):
        u0, u1 = units.start, units.stop
        v0, v1 = u0 * g, u1 * g
        ch = _span(u0, u1, dk) + [key_dim + c for c in _span(u0, u1, dk)] + \
            [2 * key_dim + c for c in _span(v0, v1, dv)]
        conv.append(ch)
        sends.append(ch + [conv_dim + h for h in range(v0, v1)] + [conv_dim + hv + h for h in range(v0, v1)])
        heads.append(range(v0, v1))
        widths.append((v1 - v0) * dv)
    return HeadPlan(sends, conv, heads, widths)


def _gdn_project(m, h: torch.Tensor):
    """Token-wise projections: qkv (B, S, conv_dim), z (B, S, Hv, dv), b and a (B, S, Hv)."""
    if hasattr(m, "in_proj_qkvz"):  # Qwen3-Next: interleaved per key head
        q, k, v, z, b, a = m.fix_query_key_value_ordering(m.in_proj_qkvz(h), m.in_proj_ba(h))
        qkv = torch.cat([t.reshape(t.shape[0], t.shape[1], -1) for t in (q, k, v)], dim=-1)
        return qkv, z, b, a
    z = m.in_proj_z(h)  # Qwen3.5: separate projections
    return m.in_proj_qkv(h), z.reshape(z.shape[0], z.shape[1], -1, m.head_v_dim), m.in_proj_b(h), m.in_proj_a(h)


def gated_delta_net_forward(m, hidden_states: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """``Qwen3NextGatedDeltaNet`` / ``Qwen3_5GatedDeltaNet`` forward, head-parallel (two all-to-alls).

    hidden_states: (B, S_local, hidden). Returns (B, S_local, hidden).
    """
    fam = _family(m)
    bsz, s, _ = hidden_states.shape
    plan = gdn_plan(m.num_k_heads, m.num_v_heads, m.head_k_dim, m.head_v_dim, lay.size)
    qkv, z, b, a = _gdn_project(m, hidden_states)
    dev = qkv.device
    x = torch.cat([qkv, b.to(qkv.dtype), a.to(qkv.dtype)], dim=-1)  # (B, S, conv_dim + 2 Hv)
    full = to_heads(x, lay, [torch.tensor(c, device=dev) for c in plan.sends])  # (B, N, F_r)
    conv = plan.conv[lay.rank]
    heads = plan.heads[lay.rank]
    nv, nk = len(heads), len(heads) * m.num_k_heads // m.num_v_heads
    qkv_r, b_r, a_r = full.split([len(conv), nv, nv], dim=-1)
    ch = torch.tensor(conv, device=dev)
    weight = m.conv1d.weight.squeeze(1).index_select(0, ch)
    bias = None if m.conv1d.bias is None else m.conv1d.bias.index_select(0, ch)
    qkv_r = fam.causal_conv1d_fn(qkv_r.transpose(1, 2), weight, bias, activation=m.activation).transpose(1, 2)
    n = qkv_r.shape[1]
    q, k, v = qkv_r.split([nk * m.head_k_dim, nk * m.head_k_dim, nv * m.head_v_dim], dim=-1)
    q, k = q.reshape(bsz, n, nk, m.head_k_dim), k.reshape(bsz, n, nk, m.head_k_dim)
    v = v.reshape(bsz, n, nv, m.head_v_dim)
    hsel = slice(heads.start, heads.stop)
    beta = b_r.sigmoid()
    g = -m.A_log[hsel].float().exp() * F.softplus(a_r.float() + m.dt_bias[hsel])
    core, _ = fam.torch_chunk_gated_delta_rule(q, k, v, g=g, beta=beta, initial_state=None,
                                               output_final_state=False, use_qk_l2norm_in_kernel=True)
    core = to_tokens(core.reshape(bsz, n, nv * m.head_v_dim), lay, plan.widths)  # (B, S, Hv * dv)
    core = m.norm(core.reshape(-1, m.head_v_dim), z.reshape(-1, m.head_v_dim))
    return m.out_proj(core.reshape(bsz, s, -1))


# ------------------------------------------------------------------------------ Mamba2
@lru_cache(maxsize=32)
def mamba2_plan(heads: int, groups: int, head_dim: int, state: int, size: int) -> tuple[HeadPlan, list[int]]:
    """Heads split over ranks; features of the in-projection (gate | x B C | dt).

    Returns the plan and, per rank, how many B/C groups it receives: its own groups when its
    heads cover whole groups or sit inside one (then ``repeat_interleave`` maps heads to groups
    as in the model), else one copy per head.
    """
    inner = heads * head_dim
    conv_dim = inner + 2 * groups * state
    per_group = heads // groups
    sends, conv, hs, widths, n_groups = [], [], [], [], []
    for r in split_units(heads, size):
        h0, h1 = r.start, r.stop
        if (h0 % per_group == 0 and h1 % per_group == 0) or h0 // per_group == (h1 - 1) // per_group:
            gs = list(range(h0 // per_group, (h1 - 1) // per_group + 1))
        else:
            gs = [h // per_group for h in range(h0, h1)]
        ch = _span(h0, h1, head_dim) + [inner + c for gr in gs for c in range(gr * state, (gr + 1) * state)] + \
            [inner + groups * state + c for gr in gs for c in range(gr * state, (gr + 1) * state)]
        conv.append(ch)
        sends.append([inner + c for c in ch] + [inner + conv_dim + h for h in range(h0, h1)])  # skip the gate
        hs.append(r)
        widths.append((h1 - h0) * head_dim)
        n_groups.append(len(gs))
    return HeadPlan(sends, conv, hs, widths), n_groups


def mamba2_forward(m, hidden_states: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """``BambaMixer`` / ``GraniteMoeHybridMambaLayer`` forward (no cache), head-parallel (two all-to-alls).

    hidden_states: (B, S_local, hidden). Returns (B, S_local, hidden).
    """
    fam = _family(m)
    bsz, s, _ = hidden_states.shape
    dtype = hidden_states.dtype
    plan, n_groups = mamba2_plan(m.num_heads, m.n_groups, m.head_dim, m.ssm_state_size, lay.size)
    proj = m.in_proj(hidden_states)  # (B, S, inner | conv_dim | heads)
    gate = proj[..., :m.intermediate_size]
    dev = proj.device
    full = to_heads(proj, lay, [torch.tensor(c, device=dev) for c in plan.sends])  # (B, N, F_r)
    conv, heads, groups = plan.conv[lay.rank], plan.heads[lay.rank], n_groups[lay.rank]
    xbc, dt = full.split([len(conv), len(heads)], dim=-1)
    ch = torch.tensor(conv, device=dev)
    weight = m.conv1d.weight.squeeze(1).index_select(0, ch)
    bias = None if m.conv1d.bias is None else m.conv1d.bias.index_select(0, ch)
    xbc = fam.causal_conv1d_fn(xbc.transpose(1, 2), weight, bias, activation=m.activation).transpose(1, 2)
    n, nh = xbc.shape[1], len(heads)
    x, b, c = xbc.split([nh * m.head_dim, groups * m.ssm_state_size, groups * m.ssm_state_size], dim=-1)
    hsel = slice(heads.start, heads.stop)
    y = fam.mamba2_chunk_scan(
        x.reshape(bsz, n, nh, m.head_dim), dt, -torch.exp(m.A_log[hsel].float()),
        b.reshape(bsz, n, groups, m.ssm_state_size), c.reshape(bsz, n, groups, m.ssm_state_size),
        chunk_size=m.chunk_size, D=m.D[hsel], z=None, return_final_states=False, dt_bias=m.dt_bias[hsel],
        dt_softplus=True, initial_states=None, dt_limit=m.time_step_limit)
    y = to_tokens(y.reshape(bsz, n, nh * m.head_dim), lay, plan.widths)  # (B, S, inner)
    return m.out_proj(m.norm(y, gate).to(dtype))


# ------------------------------------------------------------------------------ short convolution
def _runs_halo(lay: SeqLayout, width: int):
    """Per rank and row, the ``width`` global indices before each run of consecutive tokens.

    Returns wants (size, B, W) (-1: before the sequence start or padding) and, for this rank,
    ext (B, L) rows of cat(x, halo, zero row) forming [halo_1, run_1, halo_2, run_2, ...] and
    keep (B, S): where each local token sits in that extended row.
    """
    idx = lay.index.cpu()  # (size, B, S)
    size, b, s = idx.shape
    start = torch.ones_like(idx, dtype=torch.bool)
    start[..., 1:] = idx[..., 1:] != idx[..., :-1] + 1
    back = torch.arange(width, 0, -1)
    wants = [[(idx[r, row][start[r, row]][:, None] - back).clamp(min=-1).reshape(-1) for row in range(b)]
             for r in range(size)]
    w = max(t.numel() for rr in wants for t in rr)
    want = torch.full((size, b, w), -1, dtype=torch.long)
    for r in range(size):
        for row in range(b):
            want[r, row, :wants[r][row].numel()] = wants[r][row]
    zero = b * s + b * w
    exts, keeps = [], []
    for row in range(b):
        firsts = torch.nonzero(start[lay.rank, row]).flatten().tolist() + [s]
        ext, keep = [], []
        for i, (a, e) in enumerate(zip(firsts, firsts[1:])):
            halo = want[lay.rank, row, i * width:(i + 1) * width]
            ext += [b * s + row * w + i * width + j if int(halo[j]) >= 0 else zero for j in range(width)]
            keep += range(len(ext), len(ext) + e - a)
            ext += range(row * s + a, row * s + e)
        exts.append(ext)
        keeps.append(keep)
    longest = max(len(e) for e in exts)
    ext = torch.tensor([e + [zero] * (longest - len(e)) for e in exts])
    return want, ext, torch.tensor(keeps)


def halo_conv(x: torch.Tensor, lay: SeqLayout, conv, width: int) -> torch.Tensor:
    """A causal convolution of kernel ``width + 1`` over the whole sequence, for this rank's tokens.

    Args:
        x: (B, S_local, F) this rank's tokens (the convolution's input).
        conv: callable (B, F, L) -> (B, F, L), causal with zero left padding (``causal_conv1d_fn``).
        width: K - 1, the tokens before each token the convolution reads.

    Returns:
        (B, S_local, F): ``conv`` of the whole sequence at this rank's tokens.
    """
    want, ext, keep = _runs_halo(lay, width)
    dev = x.device
    halo = fetch_tokens(x, lay, want.to(dev))  # (B, W, F)
    bsz, s, f = x.shape
    table = torch.cat([x.reshape(bsz * s, f), halo.reshape(-1, f), x.new_zeros(1, f)])
    rows = table.index_select(0, ext.to(dev).reshape(-1)).view(bsz, ext.shape[1], f)  # (B, L, F)
    out = conv(rows.transpose(1, 2)).transpose(1, 2)  # (B, L, F)
    return take(out, keep.to(dev))


def short_conv_forward(m, hidden_states: torch.Tensor, lay: SeqLayout) -> torch.Tensor:
    """``Lfm2ShortConv`` forward (no cache): the gated short convolution with fetched halos.

    hidden_states: (B, S_local, hidden). Returns (B, S_local, hidden).
    """
    fam = _family(m)
    bcx = m.in_proj(hidden_states)  # (B, S, 3 hidden)
    b, c, x = bcx.chunk(3, dim=-1)
    weight = m.conv.weight.squeeze(1)
    y = halo_conv(b * x, lay, lambda t: fam.causal_conv1d_fn(t, weight, m.conv.bias), m.conv_kernel_size - 1)
    return m.out_proj((c * y).contiguous())
