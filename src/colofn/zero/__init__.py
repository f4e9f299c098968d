"""ZeRO (Rajbhandari et al., 2020) over a data axis of a mesh (or several), as specs on flat buffers.

Stage 1 shards the optimizer state over the data axis, stage 2 the gradients
too, stage 3 the parameters too (gathered one unit at a time, prefetched, and
freed after use); stage 0 is plain data parallelism. Optional CPU offload of
the optimizer, and mixed precision with fp32 master weights. Every stage takes
the same optimizer steps as a single device. ``export_state`` turns a state
into global pytrees that ``init`` resumes from on any mesh and stage.

>>> import torch, colofn
>>> from colofn import optim, zero
>>> def program():
...     mesh = colofn.Mesh((2,), ("dp",))
...     params = {"w": torch.ones(3)}
...     opt = optim.sgd(0.1)
...     state = zero.init(params, opt, mesh, stage=2)
...     loss_fn = lambda p, batch: ((batch @ p["w"]) ** 2).mean()
...     state, info = zero.train_step(loss_fn, opt, state, torch.eye(3)[:2])
...     return zero.params(state)["w"].tolist(), round(float(info.loss), 4)
>>> colofn.launch(program, world_size=2)[0]
([0.8999999761581421, 0.8999999761581421, 1.0], 1.0)
"""

from colofn.zero.accumulated import apply_gradients, stage_params
from colofn.zero.export import export_state
from colofn.zero.flat import FlatLayout
from colofn.zero.memory import MemoryReport, formula_bytes, paper_bytes
from colofn.zero.offload import devices
from colofn.zero.precision import DynamicLossScale, MixedPrecision
from colofn.zero.reference import reference_train
from colofn.zero.stages import StepInfo, make_train_step, train_step
from colofn.zero.state import ZeroPlan, ZeroState, init, params

__all__ = [
    "DynamicLossScale",
    "FlatLayout",
    "MemoryReport",
    "MixedPrecision",
    "StepInfo",
    "apply_gradients",
    "ZeroPlan",
    "ZeroState",
    "devices",
    "export_state",
    "formula_bytes",
    "init",
    "make_train_step",
    "paper_bytes",
    "params",
    "stage_params",
    "reference_train",
    "train_step",
]
