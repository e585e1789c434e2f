"""Which targets the wgmma kernels are for, and how a kernel written here is marked."""

from __future__ import annotations

import tvm

ARCH = "sm_90a"  # wgmma is an sm_90a instruction
KERNEL_ATTR = "hetero.wgmma"  # marks the kernels that need TVM's tirx lowering


def with_wgmma(target: tvm.target.Target) -> tvm.target.Target:
    """``target`` with its arch-specific features: an sm_90 GPU compiled as sm_90a, whose code runs on
    sm_90 only (as it is: each GPU is compiled for itself) and may use wgmma."""
    if target.kind.name != "cuda" or str(target.attrs.get("arch", "")) != "sm_90":
        return target
    return tvm.target.Target({**dict(target.export()), "arch": ARCH}, target.host)


def supports(target: tvm.target.Target) -> bool:
    """Whether ``target`` runs wgmma."""
    return target.kind.name == "cuda" and str(target.attrs.get("arch", "")) == ARCH
