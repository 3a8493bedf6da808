"""The hardware probe: CPU instruction-set classes from /proc/cpuinfo flags, native bf16, `auto` dtypes.

The flags are faked, so these tests say the same on an AVX2-only CI machine and on an AMX server.
"""
from pathlib import Path

import pytest
import torch
import yaml

from wanda_core import grid, hardware

ROOT = Path(__file__).resolve().parents[1]
# The flags lines of real CPUs, shortened to what matters here.
AVX2 = "fpu vme sse sse2 ssse3 fma sse4_1 sse4_2 avx f16c avx2 bmi2"
AVX512 = AVX2 + " avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni"
AVX512_BF16 = AVX512 + " avx512_bf16"
AMX = AVX512_BF16 + " amx_bf16 amx_tile amx_int8"


def cpuinfo(flags: str, key: str = "flags") -> str:
    return f"processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Some CPU\n{key}\t\t: {flags}\nbogomips\t: 4000\n\n"


@pytest.mark.parametrize("flags,isa,native", [
    (AVX2, "avx2", False), (AVX512, "avx512", False), (AVX512_BF16, "avx512_bf16", True), (AMX, "amx", True),
])
def test_instruction_set_classes(flags, isa, native):
    found = hardware.cpu_flags(cpuinfo(flags))
    assert "avx2" in found and hardware.cpu_isa(found) == isa
    assert hardware.bf16_native("cpu", found) is native
    assert hardware.auto_dtype("cpu", found) == ("bfloat16" if native else "float32")


def test_other_cpus_emulate_bf16(monkeypatch):
    monkeypatch.setattr(hardware.platform, "machine", lambda: "aarch64")
    arm = hardware.cpu_flags(cpuinfo("fp asimd evtstrm aes sha1 sha2 crc32 atomics bf16 sve", key="Features"))
    assert "sve" in arm and hardware.cpu_isa(arm) == "aarch64"
    assert not hardware.bf16_native("cpu", arm) and hardware.auto_dtype("cpu", arm) == "float32"
    assert hardware.cpu_flags("no flags line here") == set() and hardware.cpu_isa(set()) == "aarch64"


def test_engine_auto_compute_dtype_follows_the_flags(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: set(AVX2.split()))
    assert hardware.autocast_dtype("auto", cpu, torch.float32) is None  # emulated: the model's own dtype
    monkeypatch.setattr(hardware, "cpu_flags", lambda cpuinfo=None: set(AVX512_BF16.split()))
    assert hardware.autocast_dtype("auto", cpu, torch.float32) == torch.bfloat16


def test_describe_names_the_instruction_set_and_torchs_kernels():
    info = hardware.describe("cpu")
    assert info["isa"] == hardware.cpu_isa() and info["kernels"] == torch.backends.cpu.get_cpu_capability()


def demo_config() -> dict:
    """config/config.yaml with the schema's defaults filled, as the workflow sees it."""
    from snakemake.utils import validate

    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    validate(config, str(ROOT / "workflow" / "schemas" / "config.schema.yaml"))
    return config


def test_demo_config_runs_in_float32_on_a_cpu_without_bf16(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    config = demo_config()
    assert "auto" in {spec["dtype"] for spec in config["models"].values()}  # the demo leaves it to the machine
    for flags in (AVX2, AVX512):
        assert {m: grid.model_dtype(config, m, set(flags.split())) for m in config["models"]} == \
            {"smollm2-135m": "float32", "gemma3-270m": "float32"}
    # Where bf16 is native, Gemma runs in its own dtype; SmolLM2 stays float32, as the config says.
    assert {m: grid.model_dtype(config, m, set(AMX.split())) for m in config["models"]} == \
        {"smollm2-135m": "float32", "gemma3-270m": "bfloat16"}


def test_gpu_models_resolve_auto_in_their_job():
    config = demo_config()
    config["models"]["gemma3-270m"]["gpus"] = 1
    assert grid.model_dtype(config, "gemma3-270m", set(AVX2.split())) == "auto"
