"""The benchmarks' KEY=VALUE options: parsed and validated here, shared by bench/train_step.py,
bench/optim_step.py and bench/attention.py, so a bad key stops a device run at once, naming its flag."""
from __future__ import annotations

import ast


def key_values(spec: str, flag: str) -> list[tuple[str, str]]:
    """KEY=VALUE,... -> [(key, value)] stripped; a malformed item stops the run, naming the flag."""
    out = []
    for item in filter(None, spec.split(",")):
        key, eq, value = (x.strip() for x in item.partition("="))
        if not eq or not key or not value:
            raise SystemExit(f"{flag}: expected KEY=VALUE, got {item!r}")
        out.append((key, value))
    return out


def literal_values(spec: str, flag: str) -> dict:
    """KEY=VALUE,... -> {key: value}, each value a Python literal where it parses, else the string."""
    out = {}
    for key, value in key_values(spec, flag):
        try:
            out[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            out[key] = value
    return out


def parse_opt(spec: str) -> dict:
    """--opt KEY=VALUE,... into FastMuonAdamW keyword arguments; ns_chunk has its own flag,
    max_grad_norm is the benchmark's."""
    out = literal_values(spec, "--opt")
    for key in ("ns_chunk", "max_grad_norm"):
        if key in out:
            raise SystemExit(f"--opt: {key} is not set here (ns_chunk: --ns-chunk)")
    return out


def flex_options(spec: str, flag: str = "--flex-local") -> dict | None:
    """FlexAttention kernel_options, KEY=VALUE,...; "" or `auto`: None (the project's choice for
    the device, `flex.flex_kernel_options`); `default`: {} (torch's own tiles)."""
    spec = spec.strip()
    if spec in ("", "auto"):
        return None
    return literal_values("" if spec == "default" else spec, flag)


def set_inductor_options(spec: str) -> None:
    """KEY=VALUE,... into torch._inductor.config (values parsed as Python literals); an unknown key
    fails here, not silently."""
    import torch._inductor.config as inductor_config
    for key, value in key_values(spec, "--inductor"):
        obj, *path = [inductor_config] + key.split(".")
        for name in path[:-1]:
            obj = getattr(obj, name, None)
        if obj is None or not hasattr(obj, path[-1]):
            raise SystemExit(f"--inductor: torch._inductor.config has no {key!r}")
        setattr(obj, path[-1], ast.literal_eval(value))


# the experts' streaming Muon kernels' launch shapes
EXPERT_KERNEL_KEYS = ("cols", "mwarps", "mstages", "mregs", "ucols", "utiles", "uwarps", "ustages", "cprogs")


def set_expert_kernels(given: dict, flag: str = "--expert-kernels") -> None:
    """The experts' streaming Muon kernels' launch shapes from {cols, mwarps, mstages, mregs} (the
    momentum kernel's columns per tile, warps, pipeline stages and register cap, `expert_muon.CONFIGS`)
    and {ucols, utiles, uwarps, ustages} (the update's columns per tile, tiles per program, warps and
    pipeline stages,
    `ns_update.UPDATE_CONFIG`) and {cprogs} (`gram_chain`'s programs, each taking its share of the
    matrices), ints; keys not given keep the modules' defaults (not what an earlier call set)."""
    from vpmoe.train import expert_muon, ns_update
    bad = [k for k, v in given.items() if k not in EXPERT_KERNEL_KEYS or not isinstance(v, int) or v < 1]
    if bad:
        raise SystemExit(f"{flag}: expected {'/'.join(EXPERT_KERNEL_KEYS)}=N (N >= 1), got {bad}")
    bn, warps, stages, regs = expert_muon.DEFAULT_CONFIGS["momentum"]
    expert_muon.CONFIGS["momentum"] = (given.get("cols", bn), given.get("mwarps", warps), given.get("mstages", stages),
                                       given.get("mregs", regs))
    expert_muon.CONFIGS["chain"] = (given.get("cprogs", expert_muon.DEFAULT_CONFIGS["chain"][0]),)
    bn, tiles, warps, stages = ns_update.DEFAULT_UPDATE_CONFIG
    ns_update.UPDATE_CONFIG = (given.get("ucols", bn), given.get("utiles", tiles), given.get("uwarps", warps),
                               given.get("ustages", stages))
