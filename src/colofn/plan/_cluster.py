"""Clusters: devices, memory, peak FLOP/s, and two link classes (inside a node, between nodes).

Bandwidths are per device and per direction, in bytes/s: what one device can
send while it receives as much. Preset figures are the vendors' published peak
numbers (dense bf16 FLOP/s, no sparsity); ``cpu-local`` is a nominal laptop,
not a measurement.

Three fields describe a host where ranks are processes sharing processors (a
CPU host), each with a default that leaves the presets' predictions as they
were: ``cores`` (processors that run ranks, per node; default one per device),
``per_call_s`` (processor time one collective call costs its rank: the
software around the message, not the wait) and ``per_op_s`` (processor time
per torch operation the step calls from Python, which on a CPU host sets the
time of a small model more than its FLOPs). ``benchmarks/bench_plan_rank.py``
measures all three.

>>> cluster("a100-80g", devices=512).nodes
64
>>> Cluster.from_json('{"name": "mine", "devices": 4, "devices_per_node": 4, "memory": 24e9, '
...                   '"peak_flops": 1.5e14, "intra_bw": 3.2e10, "inter_bw": 1.25e9}').inter_latency
1e-05
"""

from __future__ import annotations

import dataclasses
import json
import types

from colofn.errors import ConfigError

__all__ = ["CLUSTERS", "Cluster", "cluster"]


@dataclasses.dataclass(frozen=True)
class Cluster:
    """What the planner knows of the hardware.

    Attributes:
        name: how tables name it.
        devices: devices in the job.
        devices_per_node: devices sharing the fast intra-node links.
        memory: bytes of memory per device.
        peak_flops: peak FLOP/s of one device at the training dtype.
        intra_bw, inter_bw: bytes/s per device and direction, inside a node and between nodes.
        intra_latency, inter_latency: seconds per collective call (one message): a wait, not processor time.
        source: where the figures come from.
        cores: processors that run ranks, per node (``None``: one per device). With fewer
            cores than ranks, a rank that waits (a pipeline bubble, a peer) hands its core
            to another, and the step takes at least the node's busy time over its cores.
        per_call_s: processor time of one collective call on its rank (send, receive,
            bucket or unit: every message), on top of the latency.
        per_op_s: processor time per torch operation the step calls from Python
            (:func:`colofn.plan.step_ops` counts them), on top of the FLOP time.
    """

    name: str
    devices: int
    devices_per_node: int
    memory: float
    peak_flops: float
    intra_bw: float
    inter_bw: float
    intra_latency: float = 5e-6
    inter_latency: float = 1e-5
    source: str = ""
    cores: int | None = None
    per_call_s: float = 0.0
    per_op_s: float = 0.0

    def __post_init__(self) -> None:
        bad = [f"{f}={getattr(self, f)!r} must be > 0" for f in
               ("devices", "devices_per_node", "memory", "peak_flops", "intra_bw", "inter_bw")
               if not getattr(self, f) > 0]
        if self.cores is not None and not (isinstance(self.cores, int) and self.cores > 0):
            bad.append(f"cores={self.cores!r} must be a positive int (or null: one per device)")
        bad += [f"{f}={getattr(self, f)!r} must be >= 0" for f in ("per_call_s", "per_op_s")
                if not getattr(self, f) >= 0]
        if not bad and self.devices > self.devices_per_node and self.devices % self.devices_per_node:
            bad.append(f"devices={self.devices} is not a multiple of devices_per_node={self.devices_per_node}")
        if bad:
            raise ConfigError(f"cluster {self.name!r}: " + "; ".join(bad))

    @property
    def nodes(self) -> int:
        return max(1, self.devices // self.devices_per_node)

    @property
    def ranks_per_core(self) -> float:
        """Ranks of a node over the cores that run them (1 when every rank has a core of its own)."""
        ranks = min(self.devices, self.devices_per_node)
        return max(1.0, ranks / (self.cores or ranks))

    @classmethod
    def from_json(cls, text: str) -> Cluster:
        """A cluster from a JSON object with the field names above (the ``--cluster FILE`` format)."""
        data = json.loads(text)
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - fields)
        if unknown:
            raise ConfigError(f"cluster file: unknown fields {unknown}; the fields are {sorted(fields)}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ConfigError(f"cluster file: {e}") from None


CLUSTERS: types.MappingProxyType[str, Cluster] = types.MappingProxyType({
    # A nominal multi-core CPU machine: ranks are processes of one host. Not measured.
    "cpu-local": Cluster("cpu-local", 8, 8, 16e9, 1e11, 5e9, 5e9, 2e-5, 2e-5,
                         source="nominal figures for one CPU host (not measured)"),
    # NVIDIA A100 datasheet: 312 TFLOPS bf16 dense, 80 GB HBM2e, NVLink 600 GB/s (both
    # directions: 300 GB/s each way); DGX A100: one 200 Gb/s HDR InfiniBand NIC per GPU (25 GB/s).
    "a100-80g": Cluster("a100-80g", 8, 8, 80e9, 312e12, 300e9, 25e9,
                        source="NVIDIA A100 datasheet; DGX A100 user guide (8x HDR 200 Gb/s)"),
    # NVIDIA H100 SXM datasheet: 989 TFLOPS bf16 dense, 80 GB HBM3, NVLink 900 GB/s (450 each
    # way); DGX H100: one 400 Gb/s NDR InfiniBand NIC per GPU (50 GB/s).
    "h100-sxm": Cluster("h100-sxm", 8, 8, 80e9, 989e12, 450e9, 50e9,
                        source="NVIDIA H100 datasheet; DGX H100 user guide (8x NDR 400 Gb/s)"),
})


def cluster(name: str, devices: int | None = None) -> Cluster:
    """The preset ``name``, resized to ``devices`` (same node size and links)."""
    if name not in CLUSTERS:
        raise ConfigError(f"unknown cluster {name!r}; the presets are {', '.join(CLUSTERS)} (or give a JSON file)")
    c = CLUSTERS[name]
    return c if devices is None else dataclasses.replace(c, devices=devices)
