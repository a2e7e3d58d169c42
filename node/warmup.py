"""Compile the numba kernels before the first study, not during it.

numba compiles a kernel on its first call and, with ``cache=True``, writes the machine
code next to the module (``__pycache__``), where later processes load it. On a fresh
install the first study would pay for every compilation (about 25 s here). :func:`warm_up`
runs the whole pipeline, SEG and SR on two small synthetic exams that reach every kernel
(Dixon water/fat/in/opposed phase with a MESE; Dixon with a MEGRE magnitude and phase),
so that every kernel is compiled for the argument types real exams give it and cached. ``musclenode
warmup`` runs it at install time (``quickstart.sh`` does); the node runs it in each
worker process before it accepts its first association, which then only loads the cache.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def warm_up(cache_dir: str | Path | None = None) -> float:
    """Run the pipeline once on a small synthetic exam of every kind of series.

    Parameters
    ----------
    cache_dir : str or Path, optional
        The node's EPG table cache (``<node.data_dir>/cache``): the tables of the
        warm-up's protocol (17 echoes of 10 ms) are then built once, not on every start.

    Returns
    -------
    float
        The seconds it took (compilation on a fresh install, loading the cache after).
        A failure is logged, never raised: a node must start even if warming up fails.
    """
    t0 = time.perf_counter()
    try:
        from quant.enums import Region
        from quant.synthetic.exam import exam_datasets, megre_datasets
        from quant.synthetic.phantom import make_leg_phantom

        from .processing import build_outputs, cached_atoms

        atoms = cached_atoms(Path(cache_dir)) if cache_dir is not None else None
        phantom = make_leg_phantom(Region.THIGH, shape=(2, 80, 128), pixel_mm=3.0, snr=40.0, seed=7)
        dixon_mese = exam_datasets(phantom, uid_seed="musclenode-warmup")       # region FF by Rician ML, T2
        with_megre = exam_datasets(phantom, mese=False, uid_seed="musclenode-warmup-megre")
        with_megre += megre_datasets(phantom, with_megre[0], n_echoes=4)         # FF from the MEGRE PDFF
        for datasets in (dixon_mese, with_megre):
            build_outputs(datasets, {}, [], atoms=atoms)
    except Exception:  # noqa: BLE001 - warming up is an optimisation, never a reason to stop
        log.exception("warm-up failed; the first study will compile the kernels it needs")
    seconds = time.perf_counter() - t0
    log.info("numba kernels ready in %.1f s", seconds)
    return seconds
