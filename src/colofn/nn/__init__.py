"""Existing ``nn.Module``s (Hugging Face models included) as pure functions, sharded by plans.

* :func:`functionalize`: ``module -> (apply, params)``, safe to call from every
  simulated rank at once; :func:`write_params` writes a pytree back.
* :class:`ModulePlan`: a plan for a module as data: ordered ``(path regex, spec)``
  rules plus the forward-side changes tensor and sequence parallelism need,
  applied to colofn's private copy of the module, never to its source.
* :mod:`colofn.nn.hf`: plans for Hugging Face LLaMA and GPT-2, and for stacks
  of ``nn.TransformerEncoderLayer``.
* :func:`parallelize`: a module and a plan on a mesh -> the per-device and
  global loss, the parameter specs, and the way back.

``docs/existing_models.md`` is the guide.
"""

from colofn.nn._functionalize import from_state_dict, functionalize, to_state_dict, write_params
from colofn.nn._guard import ModuleSharingError
from colofn.nn._plan import ModulePlan, Parallelized, Rewrite, parallelize, take_chunk

__all__ = [
    "ModulePlan",
    "ModuleSharingError",
    "Parallelized",
    "Rewrite",
    "from_state_dict",
    "functionalize",
    "parallelize",
    "take_chunk",
    "to_state_dict",
    "write_params",
]
