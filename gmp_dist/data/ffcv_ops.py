"""A fused FFCV operation for CPU training: random horizontal flip + normalise to float32 in one pass.

FFCV's ``RandomHorizontalFlip`` copies every image into a new uint8 batch and ``NormalizeImage``
then reads it again to write floats: two passes and an extra 10 MB buffer per batch slot. On a
CPU-bound loader (bench/loader.py, 2 cores) each of them cost ~15% of the throughput; reading
the decoded pixels once, mirrored or not, and writing the normalised floats directly removes one
pass.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable, Optional, Sequence, Tuple

import numpy as np
from ffcv.pipeline.allocation_query import AllocationQuery
from ffcv.pipeline.compiler import Compiler
from ffcv.pipeline.operation import Operation
from ffcv.pipeline.state import State


class FlipNormalize(Operation):
    """uint8 HWC images -> float32 HWC ``(x - mean) / std``, each mirrored with ``flip_prob``.

    ``mean`` and ``std`` are per channel on the 0..255 scale. Jitted, parallel over the batch.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], flip_prob: float = 0.5) -> None:
        super().__init__()
        mean_255, std_255 = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
        # x * scale + shift == (x - mean) / std; per channel, as float32 like the output.
        self.scale = (1.0 / std_255).astype(np.float32)
        self.shift = (-mean_255 / std_255).astype(np.float32)
        self.flip_prob = float(flip_prob)

    def generate_code(self) -> Callable:
        my_range = Compiler.get_iterator()
        scale, shift, flip_prob = self.scale, self.shift, self.flip_prob

        def flip_normalize(images, dst):
            should_flip = np.random.rand(images.shape[0]) < flip_prob
            height, width = images.shape[1], images.shape[2]
            # Per-row vectors of the channel pattern, so the inner loop is contiguous and vectorises.
            row_scale = np.empty(width * 3, dtype=np.float32)
            row_shift = np.empty(width * 3, dtype=np.float32)
            for k in range(width * 3):
                row_scale[k] = scale[k % 3]
                row_shift[k] = shift[k % 3]
            for i in my_range(images.shape[0]):
                flat_in = images[i].reshape(height, width * 3)
                flat_out = dst[i].reshape(height, width * 3)
                for y in range(height):
                    src, out = flat_in[y], flat_out[y]
                    for k in range(width * 3):
                        out[k] = src[k] * row_scale[k] + row_shift[k]
                    if should_flip[i]:  # mirror the finished row in place: pixels swap, channels keep order
                        for x in range(width // 2):
                            a, b = 3 * x, 3 * (width - 1 - x)
                            for c in range(3):
                                out[a + c], out[b + c] = out[b + c], out[a + c]
            return dst

        flip_normalize.is_parallel = True
        return flip_normalize

    def declare_state_and_memory(self, previous_state: State) -> Tuple[State, Optional[AllocationQuery]]:
        float32 = np.dtype(np.float32)
        return (replace(previous_state, jit_mode=True, dtype=float32),
                AllocationQuery(previous_state.shape, float32))
