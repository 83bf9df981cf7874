"""One image's dense CRF (pydensecrf2), in a module light enough for a worker process.

A CRF process pool (:class:`camseg.cam.crf.CRFPool`) starts its processes with ``spawn``:
each imports the module of the function it runs. This one imports numpy and pydensecrf
only (the caller has checked that it is installed), so a worker starts in a fraction of a
second instead of the seconds that importing torch and the CAM package take.
"""

from __future__ import annotations

import numpy as np


def dense_crf(
    stack: np.ndarray,
    pixels: np.ndarray,
    iterations: int,
    sxy_px: tuple[float, float],
    compat: tuple[float, float],
    srgb: float,
) -> np.ndarray:
    """Foreground posteriors (k,H,W) float32 of one image.

    Args:
        stack: (1+k,H,W) float32 softmax, background first.
        pixels: (H,W,C) intensities on 0..255 (uint8 or float32).
        iterations: mean-field iterations.
        sxy_px: Gaussian and bilateral kernel widths, in pixels.
        compat: Gaussian and bilateral weights.
        srgb: bilateral intensity width (0..255 scale).
    """
    import pydensecrf.densecrf as dcrf
    import pydensecrf.utils as crf_utils

    labels, height, width = stack.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(crf_utils.unary_from_softmax(stack, clip=1e-5)))
    crf.addPairwiseGaussian(sxy=sxy_px[0], compat=compat[0])
    bilateral = crf_utils.create_pairwise_bilateral(
        sdims=(sxy_px[1], sxy_px[1]),
        schan=(srgb,) * pixels.shape[-1],
        img=np.ascontiguousarray(pixels, dtype=np.float32),
        chdim=2,
    )
    crf.addPairwiseEnergy(np.ascontiguousarray(bilateral, dtype=np.float32), compat=compat[1])
    refined = np.asarray(crf.inference(iterations), dtype=np.float32)
    return refined.reshape(labels, height, width)[1:]
