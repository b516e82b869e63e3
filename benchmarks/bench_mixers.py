"""Token mixers on a ring: head-parallel / halo ("heads") against the generic all-gather ("gather").

Run (about 10 minutes on 2 idle cores; benchmarks take the exclusive lock):
    flock -x /tmp/hra-cpu.lock python benchmarks/bench_mixers.py --ring 2 --lengths 2048,4096,8192

One mixer layer of each family (sizes: Qwen3-Next / Bamba / LFM2 scaled down for a CPU), forward +
backward of a (1, N, hidden) input, fp32, ``--ring`` ranks x 1 thread each, against the unpatched
layer on the whole sequence in one process with 1 thread. Per rank: median wall time and CPU time
of ``--repeats`` steps after one warm-up step (slowest rank), and the peak of live torch
allocations during one step (largest rank; ``_common.torch_peak_bytes``, so the input and the
parameters, allocated before, are not counted).
"""

import _common  # first: pins glibc's mmap threshold before torch allocates

import argparse
import time

import torch

FAMILIES = {  # family -> (transformers model type, config class, mixer class, config values)
    "gated delta-net (Qwen3-Next)": ("qwen3_next", "Qwen3NextConfig", "Qwen3NextGatedDeltaNet", dict(
        hidden_size=1024, linear_num_key_heads=8, linear_num_value_heads=16, linear_key_head_dim=64,
        linear_value_head_dim=64, linear_conv_kernel_dim=4, layer_types=["linear_attention"], num_hidden_layers=1)),
    "Mamba2 (Bamba)": ("bamba", "BambaConfig", "BambaMixer", dict(
        hidden_size=512, mamba_n_heads=16, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=64, mamba_d_conv=4,
        mamba_expand=2, mamba_chunk_size=128, num_hidden_layers=1, attn_layer_indices=[])),
    "short conv (LFM2)": ("lfm2", "Lfm2Config", "Lfm2ShortConv", dict(
        hidden_size=1024, conv_L_cache=3, layer_types=["conv"], num_hidden_layers=1)),
}


def make_layer(family: str):
    import importlib

    import transformers

    model_type, cfg_name, cls_name, values = FAMILIES[family]
    config = getattr(transformers, cfg_name)(**values)
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    torch.manual_seed(0)
    layer = getattr(module, cls_name)(config, 0).train()
    if hasattr(layer, "init_bamba_weights"):
        layer.init_bamba_weights()
    return layer


def step(layer, x, **kwargs):
    out = layer(hidden_states=x, **kwargs)
    out.square().mean().backward()


def measure(fn, repeats: int):
    fn()  # warm-up (first backward imports modules, allocates workspaces)
    walls, cpus = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - w)
        cpus.append(time.process_time() - c)
    return _common.median(walls), _common.median(cpus), _common.torch_peak_bytes(fn)


def run_ring(rank, world, family, n, strategy, repeats):
    import torch.distributed as dist

    from hf_ring_attention import mixers
    from hf_ring_attention.integration import RingForward
    from hf_ring_attention.sharding import zigzag_shard

    holder = torch.nn.Module()
    holder.layer = make_layer(family)
    mixers.install_mixers(holder, None, strategy=strategy)
    g = torch.Generator().manual_seed(1)
    full = torch.randn(1, n, FAMILIES[family][3]["hidden_size"], generator=g)
    x = zigzag_shard(full, dim=1, rank=rank, ring_size=world).requires_grad_()
    ctx = RingForward("zigzag", (None,), n, n - 1)
    dist.barrier()
    return measure(lambda: step(holder.layer, x, ring_context=ctx), repeats)


def run_single(rank, world, family, n, repeats):
    layer = make_layer(family)
    x = torch.randn(1, n, FAMILIES[family][3]["hidden_size"], generator=torch.Generator().manual_seed(1)).requires_grad_()
    return measure(lambda: step(layer, x), repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ring", type=int, default=2)
    parser.add_argument("--lengths", default="2048,4096,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--families", default=",".join(FAMILIES), help="comma-separated keys of FAMILIES")
    args = parser.parse_args()
    print(f"load average before: {_common.load_average()}")
    rows = []
    for family in args.families.split(","):
        for n in [int(v) for v in args.lengths.split(",")]:
            wall1, cpu1, mem1 = _common.spawn(run_single, 1, family, n, args.repeats)[0]
            rows.append(dict(family=family, n=n, how="unpatched, 1 process", wall=f"{wall1:.3f}", cpu=f"{cpu1:.3f}",
                             mem=f"{mem1 / 2**20:.1f}", speed="1.00"))
            for strategy in ("heads", "gather"):
                res = _common.spawn(run_ring, args.ring, family, n, strategy, args.repeats)
                wall, cpu, mem = max(r[0] for r in res), max(r[1] for r in res), max(r[2] for r in res)
                rows.append(dict(family=family, n=n, how=f"ring {args.ring}, {strategy}", wall=f"{wall:.3f}",
                                 cpu=f"{cpu:.3f}", mem=f"{mem / 2**20:.1f}", speed=f"{wall1 / wall:.2f}"))
            print(_common.markdown_table(rows[-3:], COLUMNS), flush=True)
    print(f"\nload average after: {_common.load_average()}\n")
    print(_common.markdown_table(rows, COLUMNS))


COLUMNS = [("family", "family"), ("n", "N"), ("how", "run"), ("wall", "wall s / step"), ("cpu", "CPU s / step"),
           ("mem", "peak MiB / rank"), ("speed", "speed-up (wall)")]

if __name__ == "__main__":
    main()
