"""Reference models written as pure functions over parameter pytrees.

>>> from colofn.models import gpt
>>> gpt.count_params(gpt.config("tiny"))
34112
"""

from colofn.models import gpt

__all__ = ["gpt"]
