"""Torch allocation accounting of a training step by part (for bench_memory.py), and the tiled-MLP prototype.

``Accounting(model)`` marks, with profiler annotations, where the decoder ends in the forward and
where the gradient of its final norm's output exists in the backward, and (as a saved-tensors
hook) records the storages saved while a decoder layer runs (transformers' checkpoint keeps
each layer's inputs: the stash). ``attribute(events, acc, grads)`` walks the profiler's memory
events and sorts every allocation, when it is made, into one part (see bench_memory.py's docstring).
"""

import math

import torch

# The ring's autograd Function: its forward (also the checkpoint's recompute) and its backward node.
RING_OPS = ("_RingAttention", "autograd::engine::evaluate_function: _RingAttention")
PARTS = ("attention", "lm_head_loss", "stash", "rest")
PART_NAMES = {"attention": "attention", "lm_head_loss": "LM head + loss", "stash": "checkpoint stash",
              "rest": "rest"}


def tile_mlp(model, tiles: int) -> None:
    """Prototype: each decoder layer's MLP over ``tiles`` sequence tiles, each under a (nested) checkpoint."""
    from torch.utils.checkpoint import checkpoint

    for layer in model.model.layers:
        mlp_forward = layer.mlp.forward

        def forward(x, _f=mlp_forward):  # x: (B, S, H); the MLP acts on each token alone
            size = math.ceil(x.shape[1] / tiles)
            return torch.cat([checkpoint(_f, t, use_reentrant=False) for t in x.split(size, dim=1)], dim=1)
        layer.mlp.forward = forward


class Accounting:
    """Marks and saved-tensor bookkeeping for one profiled forward + backward (see the module docstring)."""

    def __init__(self, model):
        self.depth, self.stash, self.outside, hooks = 0, {}, {}, []
        for layer in model.model.layers:
            hooks.append(layer.register_forward_pre_hook(lambda *a: self._enter(1)))
            hooks.append(layer.register_forward_hook(lambda *a: self._enter(-1)))
        hooks.append(model.model.norm.register_forward_hook(self._norm_done))
        self.hooks = hooks

    def _enter(self, d):
        self.depth += d

    def _norm_done(self, module, args, out):
        mark("decoder_end")
        if out.requires_grad:
            out.register_hook(lambda g: mark("head_grad"))

    def pack(self, t):
        s = t.untyped_storage()
        (self.stash if self.depth else self.outside)[s.data_ptr()] = s.nbytes()
        return t

    def close(self):
        for h in self.hooks:
            h.remove()


def mark(name):
    with torch.profiler.record_function("hra_mark:" + name):
        pass


def attribute(events, acc: Accounting, grads: set, grad_sizes: set) -> dict:
    """Live torch bytes by part at the peak of everything but parameter gradients, in each phase of the step
    (forward / backward x decoder / LM head + loss); ``peak_phase`` holds the highest; ``total``: the overall peak."""
    marks = {e["name"][9:]: e["ts"] for e in events if e.get("name", "").startswith("hra_mark:")}
    attn = [(e["ts"], e["ts"] + e.get("dur", 0)) for e in events
            if e.get("ph") == "X" and e.get("name", "").startswith(RING_OPS)]
    mem = sorted((e for e in events if e.get("name") == "[memory]" and e["args"].get("Device Type") == 0),
                 key=lambda e: e["ts"])
    final = {}  # addr -> index of the allocation live at the end
    for i, e in enumerate(mem):
        a = e["args"]
        if a["Bytes"] > 0:
            final[a["Addr"]] = i
        else:
            final.pop(a["Addr"], None)
    grad_ids = {i for addr, i in final.items() if addr in grads}
    fwd_end, dec_end = marks["fwd_end"], marks.get("decoder_end", marks["fwd_end"])
    bwd_start, head_grad = marks["bwd_start"], marks.get("head_grad", marks["bwd_start"])

    def part(i, addr, ts, size):
        if i in grad_ids or (ts >= bwd_start and size in grad_sizes):  # a .grad, or a gradient on its way there
            return "grads"
        if ts < fwd_end and addr in acc.stash:
            return "stash"
        if any(a <= ts <= b for a, b in attn):
            return "attention"
        if (ts < fwd_end and addr in acc.outside) or dec_end <= ts < fwd_end or bwd_start <= ts < head_grad:
            return "lm_head_loss"
        return "rest"

    def phase(ts):
        if ts < fwd_end:
            return "forward: decoder" if ts < dec_end else "forward: LM head + loss"
        return "backward: LM head + loss" if ts < head_grad else "backward: decoder"

    live, by = {}, dict.fromkeys(PARTS + ("grads",), 0)
    best, snaps = {}, {}  # per phase: the peak of everything but parameter gradients, by part
    top = dict(total=-1)
    for i, e in enumerate(mem):
        a = e["args"]
        if a["Bytes"] > 0:
            p = part(i, a["Addr"], e["ts"], a["Bytes"])
            live[a["Addr"]] = (a["Bytes"], p)
            by[p] += a["Bytes"]
        elif a["Addr"] in live:
            b, p = live.pop(a["Addr"])
            by[p] -= b
        nongrad, ph = sum(by[k] for k in PARTS), phase(e["ts"])
        if nongrad > best.get(ph, -1):
            best[ph], snaps[ph] = nongrad, dict(by)
        if nongrad + by["grads"] > top["total"]:
            top = dict(by, total=nongrad + by["grads"], phase=ph)
    peak_phase = max(best, key=best.get)
    return dict(phases=snaps, peak_phase=peak_phase, total=top)
