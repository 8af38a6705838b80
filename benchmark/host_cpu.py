"""Which CPU a record was measured on: its model and the instructions its bf16 matmuls run on.

Why records carry it: sessions of this project have run on different hosts (one with AMX, one
an AMD EPYC with AVX512-BF16 and no AMX). oneDNN picks its kernels by instruction set, so the
same stage key can round differently there (a kl tokenizer in bf16 autocast: its loss differed
in the 4th digit from the first logged step on) and run at a different speed. ``host`` (the
hostname, often just "vm") does not tell such machines apart; this does.

A bottom module: standard library only.
"""
from __future__ import annotations

import platform
from functools import lru_cache


def parse_cpuinfo(text: str) -> dict[str, str]:
    """Model, family/model numbers and the bf16 matmul instruction set from /proc/cpuinfo's text
    (its first processor block; every core of one host reports the same)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    flags = set(fields.get("flags", "").split())
    isa = "amx_bf16" if "amx_bf16" in flags else "avx512_bf16" if "avx512_bf16" in flags else "none"
    return {"model": fields.get("model name", "unknown"),
            "family_model": f"{fields.get('cpu family', '?')}/{fields.get('model', '?')}",
            "bf16_matmul_isa": isa}


@lru_cache(maxsize=1)
def cpu_facts() -> dict[str, str]:
    """This host's ``parse_cpuinfo``; without /proc/cpuinfo (macOS, say) the platform's name."""
    try:
        with open("/proc/cpuinfo") as f:
            return parse_cpuinfo(f.read())
    except OSError:
        return {"model": platform.processor() or platform.machine(), "family_model": "?/?",
                "bf16_matmul_isa": "unknown"}


def bf16_label() -> str:
    """How a report names the bf16 matmul path of this CPU."""
    return {"amx_bf16": "AMX", "avx512_bf16": "AVX512-BF16"}.get(cpu_facts()["bf16_matmul_isa"],
                                                                 "no bf16 matrix instructions")


def describe() -> str:
    """This CPU in one phrase for reports (perf, gpu_check): model, family/model and bf16 path."""
    facts = cpu_facts()
    return f"{facts['model']} (family/model {facts['family_model']}, bf16: {bf16_label()})"
