"""Checkpoints of pytrees of DTensors, tensors and plain values, on ``torch.distributed.checkpoint``.

* :func:`save` writes a tree atomically: the directory appears, with its
  completion marker, only once every rank has written its shards.
* :func:`load` reads it into the shardings of ``like``: another mesh, another
  world size, or plain full tensors. It never runs code from the files.
* :func:`latest` finds the newest complete, undamaged checkpoint in a directory of steps.
* :func:`convert` rewrites a checkpoint of the older, pickled format (files you trust).

>>> import colofn, tempfile, torch
>>> from colofn import P
>>> root = tempfile.mkdtemp()
>>> def train():
...     with colofn.Mesh((2,), ("dp",)):
...         w = colofn.device_put(torch.arange(8.0).reshape(4, 2), P("dp"))
...         colofn.checkpoint.save(f"{root}/step_000010", {"w": w, "step": 10})
>>> _ = colofn.launch(train, world_size=2)
>>> def resume():
...     with colofn.Mesh((1, 4), ("dp", "tp")):
...         state = colofn.checkpoint.load(colofn.checkpoint.latest(root), like={"w": P(None, None), "step": 0})
...         return state["step"], state["w"].placements, state["w"].full_tensor()[3].tolist()
>>> colofn.launch(resume, world_size=4)[0]
(10, (Replicate(), Replicate()), [6.0, 7.0])
"""

from colofn.checkpoint._convert import convert
from colofn.checkpoint._latest import latest
from colofn.checkpoint._load import load
from colofn.checkpoint._manifest import MARKER, is_complete
from colofn.checkpoint._save import save

__all__ = ["MARKER", "convert", "is_complete", "latest", "load", "save"]
