"""The accelerators the planner knows, and custom ones given by numbers.

Every figure is per GPU and dense (no 2:4 sparsity). Link bandwidths are *per direction*, the figure the
alpha-beta model of :mod:`pretrain.plan.timing` divides bytes by (vendors quote NVLink both ways summed).
``network_gbs`` is one NIC per GPU (the 8-NIC reference systems: DGX H100/H200/B200, DGX A100, MI300X OAM
platforms). ``achieved`` is the fraction of the bf16 peak a well-tuned dense transformer step reaches, from
published runs (see each entry); ``pretrain plan --efficiency`` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from pretrain.configlib import ConfigError

GB = 1e9


@dataclass(frozen=True)
class Device:
    name: str
    memory_gb: float  # usable HBM, 1e9 bytes
    bf16_tflops: float  # dense peak
    fp8_tflops: float | None  # dense peak; None = no fp8 tensor cores
    nvlink_gbs: float  # intra-node GPU-to-GPU bandwidth per direction, GB/s
    network_gbs: float  # inter-node bandwidth per GPU per direction, GB/s
    achieved: float = 0.40  # fraction of bf16_tflops a transformer step reaches
    nvlink_latency_us: float = 5.0  # alpha of one intra-node hop (NCCL ring step, NVLink)
    network_latency_us: float = 15.0  # alpha of one inter-node hop (InfiniBand/RoCE)

    @property
    def memory_bytes(self) -> float:
        return self.memory_gb * GB


DEVICES: dict[str, Device] = {d.name: d for d in (
    # NVIDIA H100 Tensor Core GPU datasheet (2023): SXM5 80 GB HBM3, BF16 989 / FP8 1,979 TFLOPS dense,
    # NVLink 900 GB/s (both ways); DGX H100: 8x ConnectX-7 400 Gb/s = 50 GB/s per GPU.
    # achieved 0.40: Llama 3 405B on H100s reports 38-43 % bf16 MFU (Dubey et al. 2024, table 4).
    Device("h100-sxm", 80, 989, 1979, 450, 50, achieved=0.40),
    # same datasheet, PCIe: 80 GB HBM2e, BF16 756 / FP8 1,513 TFLOPS, NVLink bridge 600 GB/s (both ways).
    Device("h100-pcie", 80, 756, 1513, 300, 50, achieved=0.40),
    # NVIDIA H200 datasheet (2024): 141 GB HBM3e, same tensor cores and NVLink as the H100 SXM.
    Device("h200", 141, 989, 1979, 450, 50, achieved=0.40),
    # NVIDIA DGX B200 datasheet (2024): 1,440 GB over 8 GPUs = 180 GB each; 72 PFLOPS FP8 training / 8 = 9
    # sparse = 4.5 dense FP8, 2.25 dense BF16 PFLOPS per GPU; NVLink 5 1.8 TB/s (both ways); 8x 400 Gb/s NICs.
    Device("b200", 180, 2250, 4500, 900, 50, achieved=0.40),
    # NVIDIA A100 datasheet (2021): 40/80 GB, BF16 312 TFLOPS dense, no FP8, NVLink 3 600 GB/s (both ways);
    # DGX A100: 8x HDR 200 Gb/s = 25 GB/s per GPU. achieved 0.52: Megatron-LM GPT 175B-1T at 138-163 TFLOPS
    # per A100 (Narayanan et al. 2021, table 1).
    Device("a100-40gb", 40, 312, None, 300, 25, achieved=0.52),
    Device("a100-80gb", 80, 312, None, 300, 25, achieved=0.52),
    # AMD Instinct MI300X datasheet (2023): 192 GB HBM3, BF16 1,307.4 / FP8 2,614.9 TFLOPS dense, 7 Infinity
    # Fabric links of 64 GB/s each per direction (448 GB/s); one 400 Gb/s NIC per GPU.
    Device("mi300x", 192, 1307.4, 2614.9, 448, 50, achieved=0.30),
)}
# MI300X achieved 0.30: an assumption (no published large-scale pretraining MFU to anchor it); set
# `pretrain plan --efficiency` from your own measurement.

CUSTOM_KEYS = {"memory": "memory_gb", "bf16": "bf16_tflops", "fp8": "fp8_tflops", "nvlink": "nvlink_gbs",
               "network": "network_gbs", "achieved": "achieved"}


def device(spec: str) -> Device:
    """A table entry by name (case-insensitive), or ``custom:memory=80,bf16=400,nvlink=300,network=25``
    (memory in GB, bf16/fp8 in dense TFLOPS, links in GB/s per direction; ``achieved`` optional)."""
    name = spec.strip().lower()
    if name in DEVICES:
        return DEVICES[name]
    if not name.startswith("custom:"):
        raise ConfigError(f"--gpu {spec}: unknown device; pick one of {', '.join(DEVICES)} or give "
                          f"custom:memory=GB,bf16=TFLOPS,nvlink=GB/s,network=GB/s")
    values: dict[str, float] = {}
    for item in name[len("custom:"):].split(","):
        key, _, value = item.partition("=")
        if key not in CUSTOM_KEYS:
            raise ConfigError(f"--gpu {spec}: unknown field {key!r}; fields: {', '.join(CUSTOM_KEYS)}")
        try:
            values[CUSTOM_KEYS[key]] = float(value)
        except ValueError:
            raise ConfigError(f"--gpu {spec}: {key}={value!r} is not a number") from None
    missing = [k for k, v in CUSTOM_KEYS.items() if v not in values and k not in ("fp8", "achieved")]
    if missing:
        raise ConfigError(f"--gpu {spec}: custom devices need {', '.join(missing)} too")
    if min(values.values()) <= 0:
        raise ConfigError(f"--gpu {spec}: every number must be > 0")
    return replace(Device("custom", 0, 0, None, 0, 0), **values)
