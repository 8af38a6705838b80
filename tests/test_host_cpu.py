"""Records and perf reports name the CPU they ran on (hosts differ in bf16 kernels)."""
from benchmark import host_cpu

# /proc/cpuinfo in its own format: an Intel host with AMX (the kind the README's perf peaks were
# measured on; its model name here is an example) and the AMD EPYC host of the 2026-12-04
# session (its real fields). Flags cut to the ones that matter plus a few neighbours.
AMX_HOST = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
model name\t: Intel(R) Xeon(R) Platinum 8488C
flags\t\t: fpu vme avx512f avx512_bf16 amx_bf16 amx_tile amx_int8

processor\t: 1
model name\t: some other name
"""
EPYC_HOST = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 25
model\t\t: 17
model name\t: AMD EPYC
flags\t\t: fpu vme avx512f avx512_bf16 avx512vl
"""


def test_cpuinfo_names_the_bf16_matmul_path():
    assert host_cpu.parse_cpuinfo(AMX_HOST) == {
        "model": "Intel(R) Xeon(R) Platinum 8488C", "family_model": "6/143", "bf16_matmul_isa": "amx_bf16"}
    assert host_cpu.parse_cpuinfo(EPYC_HOST) == {
        "model": "AMD EPYC", "family_model": "25/17", "bf16_matmul_isa": "avx512_bf16"}
    assert host_cpu.parse_cpuinfo("model name\t: old\nflags\t\t: sse2 avx2\n")["bf16_matmul_isa"] == "none"


def test_this_host_and_its_stage_records(tiny_overrides):
    facts = host_cpu.cpu_facts()
    assert set(facts) == {"model", "family_model", "bf16_matmul_isa"}
    assert facts["bf16_matmul_isa"] in ("amx_bf16", "avx512_bf16", "none", "unknown")
    # the one phrase reports (perf, gpu_check) name the host by
    assert host_cpu.describe().startswith(facts["model"]) and host_cpu.bf16_label() in host_cpu.describe()
    from benchmark import grid
    from benchmark.launch import run_node
    _, _, order, _, _ = grid.prepare([*tiny_overrides, "prior=gaussian", "loss=kl"])
    ref = next(n for n in order if n.stage == "reference")
    assert run_node(ref)["cpu"] == facts
