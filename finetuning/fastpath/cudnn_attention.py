"""Override 6 (`cudnn_off`): PyTorch's cuDNN attention kernel off while training, the other SDPA kernels on.

cuDNN's attention builds a plan for each batch shape on the CPU, about 18 ms a call on Hopper; the other SDPA
kernels give the same answer. Switched back to what it was when the run ends.

Target: torch >= 2.5 (`torch.backends.cuda.enable_cudnn_sdp`, `cudnn_sdp_enabled`).
"""
from __future__ import annotations

from typing import Optional

import torch

from fastpath.guards import has
from fastpath.patches import Patches


def cudnn_attention_off(patches: Optional[Patches] = None) -> bool:
    backends = torch.backends.cuda
    if not has(backends, ["enable_cudnn_sdp", "cudnn_sdp_enabled"], "cuDNN attention off"):
        return False
    before = backends.cudnn_sdp_enabled()
    backends.enable_cudnn_sdp(False)
    (patches if patches is not None else Patches()).on_restore(lambda: backends.enable_cudnn_sdp(before))
    return True
