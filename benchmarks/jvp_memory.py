"""Peak memory and time of dF/dt for SwiftVideo's CCD: block-wise JVP (papers/003, Alg. 2) against whole-model JVPs.

    python benchmarks/jvp_memory.py --size cpu --layers 4 --threads 2 --out runs/bench/jvp_cpu.json
    python benchmarks/jvp_memory.py --device cuda --size full --dtype bfloat16 --out runs/bench/jvp_gpu.json

The network is diffusers' ``WanTransformer3DModel`` with Wan2.1-T2V-1.3B's widths (benchmarks/real_teacher.py's
:data:`WAN_1_3B`; random weights, nothing downloaded) and ``--layers`` blocks, behind fewstep's
``Denoiser(WanBackbone(·), FlowMatching(shift=3), "flow")``. Sizes: ``cpu`` latents (B, 16, 3, 16, 32) = 384
tokens, 64 text tokens; ``full`` 480×832×81 frames (32760 tokens), 512 text tokens; ``tiny`` a narrow Wan.
Each method computes ``(F, dF/dt)`` of one CCD draw — the tangent ``(dx/dt, dt_model/dσ)`` at random ``x_t``:

* ``blockwise``    fewstep's Alg. 2 (``Denoiser.jvp(method="blockwise")``, no autograd graph)
* ``func_nograd``  ``torch.func.jvp`` over the whole model under ``torch.no_grad`` (``method="autograd"``, as CCD
                   calls it on the EMA)
* ``func_graph``   the same with autograd recording (a live student's weights that require grad, θ⁻ = θ with
                   the stop-gradient applied afterwards)
* ``double_backward``  ``torch.autograd.functional.jvp`` (the paper's stated tool: the double-backward trick
                   through the whole model's graph)
* ``finite_difference``  three forwards (``method="finite_difference"``)

All under the math SDPA kernel. ``peak_bytes`` is the allocation high-water mark of the call above what was
allocated before it (:func:`fewstep.bench.peak_memory`: CUDA ``max_memory_allocated``; on a CPU the
profiler's allocator events); ``seconds`` the median of ``--repeats`` calls. ``ratio`` is each method's peak
over ``double_backward``'s and over ``func_graph``'s. Every method's tangent is checked against ``blockwise``'s.

Reading (2 CPU cores, fp32, ``--size cpu``): block-wise stays at one block's activations whatever the depth
(71 MiB at 2 and at 4 layers) while the graph-recording JVPs grow by ~200 MiB a layer (4 layers:
``double_backward`` 777 MiB, ``func_graph`` 918 MiB; block-wise 0.09× and 0.08× of them). ``func_nograd``
equals block-wise: forward-mode AD without autograd frees each op's activations as it goes, so Alg. 2's
saving is against JVPs that record a graph (the paper's ``torch.autograd.functional.jvp``). The finite
difference is cheapest but, in float32, Wan's sinusoidal time embedding leaves ~10% error in its tangent.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from fewstep.bench import peak_memory
from fewstep.diffusion.schedules import FlowMatching
from fewstep.models.backbones import Conditioning, WanBackbone
from fewstep.models.denoiser import Denoiser

sys.path.insert(0, str(Path(__file__).parent))
from real_teacher import TINY_WAN, WAN_1_3B  # noqa: E402

SIZES = {  # transformer config, latent (T, H, W), text tokens
    "cpu": (WAN_1_3B, (3, 16, 32), 64),
    "full": (WAN_1_3B, (21, 60, 104), 512),
    "tiny": (TINY_WAN, (3, 4, 4), 8),
}
METHODS = ("blockwise", "func_nograd", "func_graph", "double_backward", "finite_difference")


def build(size: str, layers: int | None, device: torch.device, dtype: torch.dtype):
    from diffusers import WanTransformer3DModel

    config, (T, H, W), L = SIZES[size]
    config = {**config, **({"num_layers": layers} if layers else {})}
    torch.manual_seed(0)
    model = WanTransformer3DModel(**config).to(device)
    if dtype != torch.float32:
        model.to(dtype)
    denoiser = Denoiser(WanBackbone(model), FlowMatching(shift=3.0), "flow").eval()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, config["in_channels"], T, H, W, generator=g).to(device, dtype)
    cond = Conditioning(torch.randn(1, L, config["text_dim"], generator=g).to(device, dtype))
    v = torch.randn(x.shape, generator=g).to(device, dtype)  # dx/dt
    sigma = torch.tensor([0.6], device=device, dtype=dtype)
    t = denoiser.schedule.unshift(sigma)
    _, dsigma = torch.func.jvp(denoiser.schedule.sigma, (t,), (torch.ones_like(t),))
    return denoiser, config, (x, t, cond, v, 1.0 / dsigma)


def method_call(name: str, denoiser, inputs):
    x, t, cond, v, tt = inputs

    def f(x_, t_):
        return denoiser.predict(x_, t_, cond).flow

    if name == "blockwise":
        return lambda: denoiser.jvp(x, t, cond, v, tt, output="flow", method="blockwise")
    if name == "finite_difference":
        return lambda: denoiser.jvp(x, t, cond, v, tt, output="flow", method="finite_difference", fd_step=1e-3)
    if name == "func_nograd":
        def call():
            with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
                return torch.func.jvp(f, (x, t), (v, tt))
        return call
    if name == "func_graph":
        def call():
            with torch.enable_grad(), sdpa_kernel(SDPBackend.MATH):
                value, tangent = torch.func.jvp(f, (x, t), (v, tt))
                return value.detach(), tangent.detach()  # sg after the fact: the graph was built all the same
        return call
    if name == "double_backward":
        def call():
            with sdpa_kernel(SDPBackend.MATH):
                value, tangent = torch.autograd.functional.jvp(f, (x, t), (v, tt))
                return value.detach(), tangent.detach()
        return call
    raise ValueError(name)


def run(args) -> dict:
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    denoiser, config, inputs = build(args.size, args.layers, device, dtype)
    trainable = {"func_graph", "double_backward"}  # methods that need weights requiring grad to build a graph
    results, reference = {}, None
    for name in args.methods:
        denoiser.requires_grad_(name in trainable)
        call = method_call(name, denoiser, inputs)
        out = call()  # warm-up (and the value checked below)
        peak = peak_memory(call, device)
        times = []
        for _ in range(args.repeats):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            call()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        if reference is None:
            reference = out[1]
        error = float((out[1].float() - reference.float()).norm() / reference.float().norm())
        results[name] = {"peak_bytes": int(peak), "seconds": statistics.median(times), "tangent_rel_error": error}
        print(f"{name:18s} peak {peak / 2**20:10.2f} MiB   {statistics.median(times):7.3f} s   "
              f"tangent vs {args.methods[0]}: {error:.1e}", flush=True)
    for name, res in results.items():
        for base in ("double_backward", "func_graph"):
            if base in results:
                res[f"ratio_to_{base}"] = res["peak_bytes"] / results[base]["peak_bytes"]
    weights = sum(p.numel() * p.element_size() for p in denoiser.parameters())
    tokens = inputs[0].shape[2] * (inputs[0].shape[3] // 2) * (inputs[0].shape[4] // 2)
    return {"size": args.size, "layers": config["num_layers"], "tokens": tokens, "dtype": args.dtype,
            "device": str(device), "threads": args.threads, "weight_bytes": weights, "results": results}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=list(SIZES), default="cpu")
    parser.add_argument("--layers", type=int, default=None, help="transformer blocks (default: the size's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    report = run(args)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
