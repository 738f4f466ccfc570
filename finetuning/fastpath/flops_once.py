"""Override 13 (`flops_once`): the causal LM's `floating_point_ops` takes the parameter count once.

The Trainer counts FLOPs every step as transformers' `floating_point_ops` (6 x tokens x parameters), and
`num_parameters()` visits every parameter (a 4-bit one through bitsandbytes' `__torch_function__`). A model's
parameter count does not change while it trains.

Target: transformers 4.57 `floating_point_ops`, `num_parameters`, `estimate_tokens`.
"""
from __future__ import annotations

from typing import Optional

from fastpath.guards import has, version_ok
from fastpath.patches import Patches


def count_parameters_once(causal_lm, patches: Optional[Patches] = None) -> bool:
    what = "FLOPs count's parameter count taken once"
    if not (version_ok("transformers", what)
            and has(causal_lm, ["floating_point_ops", "num_parameters", "estimate_tokens"], what)):
        return False
    counts: dict = {}

    def floating_point_ops(self, input_dict, exclude_embeddings: bool = True) -> int:
        if exclude_embeddings not in counts:
            counts[exclude_embeddings] = self.num_parameters(exclude_embeddings=exclude_embeddings)
        return 6 * self.estimate_tokens(input_dict) * counts[exclude_embeddings]

    (patches if patches is not None else Patches()).set(causal_lm, "floating_point_ops",
                                                        floating_point_ops.__get__(causal_lm))
    return True
