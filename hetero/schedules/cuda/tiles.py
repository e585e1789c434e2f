"""The GEMM rules' tiles: the candidates, largest first, and the pick for a kernel's extents."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

from ..base.analysis import estimate, static

# Streaming multiprocessors the tile heuristics try to fill (H100 SXM: 132).
DEFAULT_NUM_SMS = 132

# What a GEMM rule tells, given one, of each tile it picks: (rule name, tile, normalized extents)
Trace = Callable[[str, object, list], None]


@dataclass(frozen=True)
class SimtConfig:
    """Tile of the CUDA-core GEMM: ``bm`` (I) x ``bn`` (J) outputs per block, ``bk`` per stage."""

    ty: int = 16  # threads along I
    tx: int = 16  # threads along J
    vi: int = 2  # virtual threads along I (a thread's rows are vi blocks of mi, bm/vi apart)
    vj: int = 2
    mi: int = 4  # rows per virtual thread
    mj: int = 4
    bk: int = 16
    vec: int = 4  # vector width of the global -> shared loads

    @property
    def bm(self) -> int:
        return self.ty * self.vi * self.mi

    @property
    def bn(self) -> int:
        return self.tx * self.vj * self.mj

    @property
    def threads(self) -> int:
        return self.tx * self.ty


@dataclass(frozen=True)
class TensorCoreConfig:
    """Tile of the tensor-core GEMM: a block is wi x wj warps, each ti x tj 16x16 fragments."""

    wi: int = 2  # warps along I
    wj: int = 4  # warps along J
    ti: int = 4  # 16x16 fragments per warp along I
    tj: int = 2
    tk: int = 2  # fragment K steps per shared-memory stage (16 wide in fp16, 8 in tf32)

    @property
    def bm(self) -> int:
        return 16 * self.wi * self.ti

    @property
    def bn(self) -> int:
        return 16 * self.wj * self.tj

    @property
    def threads(self) -> int:
        return 32 * self.wi * self.wj


# candidates, largest tile first
SIMT_CONFIGS = (
    SimtConfig(ty=16, tx=16, vi=2, vj=2),  # 128 x 128, 256 threads, 8x8 per thread
    SimtConfig(ty=16, tx=16, vi=2, vj=1),  # 128 x 64
    SimtConfig(ty=16, tx=16, vi=1, vj=1),  # 64 x 64
    SimtConfig(ty=16, tx=8, vi=1, vj=1),  # 64 x 32, 128 threads
    SimtConfig(ty=8, tx=8, vi=1, vj=1),  # 32 x 32, 64 threads
)
TENSORCORE_CONFIGS = (
    TensorCoreConfig(wi=2, wj=4, ti=4, tj=2),  # 128 x 128, 8 warps of 64 x 32
    TensorCoreConfig(wi=4, wj=2, ti=4, tj=2),  # 256 x 64, 8 warps of 64 x 32 (long K only)
    TensorCoreConfig(wi=4, wj=2, ti=2, tj=3),  # 128 x 96, 8 warps of 32 x 48
    TensorCoreConfig(wi=4, wj=2, ti=2, tj=2),  # 128 x 64, 8 warps of 32 x 32
    TensorCoreConfig(wi=2, wj=2, ti=2, tj=3),  # 64 x 96, 4 warps
    TensorCoreConfig(wi=2, wj=2, ti=2, tj=2),  # 64 x 64, 4 warps
    TensorCoreConfig(wi=4, wj=1, ti=2, tj=5),  # 128 x 80, 4 warps of 32 x 80 (inception)
    TensorCoreConfig(wi=4, wj=1, ti=2, tj=3),  # 128 x 48, 4 warps of 32 x 48 (inception)
    TensorCoreConfig(wi=4, wj=1, ti=2, tj=2),  # 128 x 32, 4 warps of 32 x 32 (densenet)
)
TALL_TILE_ROWS = 256
TALL_TILE_MIN_K = 512  # tiles of TALL_TILE_ROWS only over K loops this long (benchmarks/HISTORY.md, "Tiles of 256 rows")
# Not offered, because TVM 0.27 fails to lower them: tk=1 (the k1 software pipeline loses its
# fragments); with wmma (float16 before sm_80), one warp or one fragment along J or I (the staged
# epilogue mixes float16/float32 access_ptr).  GEMMs whose N no tile divides go to the CUDA-core
# schedule.


def _pick(configs, extents, num_sms: int, blocks_per_sm: int):
    """The largest tile that overshoots neither M nor N and still makes ``num_sms * blocks_per_sm``
    blocks at the planning batch (over all S matrices of a batched GEMM); failing that, the tile
    that makes the most blocks (and, of those, pads the least)."""
    s_expr, m_expr, n_expr, _ = extents
    matrices, m, n = estimate(s_expr), estimate(m_expr), estimate(n_expr)
    fitting = [c for c in configs if c.bn <= max(n, min(c.bn for c in configs))
               and c.bm <= max(m, min(c.bm for c in configs))]
    best, best_key = None, None
    for cfg in fitting:
        rows, cols = math.ceil(m / cfg.bm), math.ceil(n / cfg.bn)
        if matrices * rows * cols >= num_sms * blocks_per_sm:
            return cfg
        key = (-rows * cols, rows * cfg.bm * cols * cfg.bn)
        if best_key is None or key < best_key:
            best, best_key = cfg, key
    return best


def pick_simt_config(extents, num_sms: int = DEFAULT_NUM_SMS) -> SimtConfig:
    """Tile for the GEMM with normalized extents ``(S, M, N, K)`` (M may be symbolic)."""
    cfg = _pick(SIMT_CONFIGS, extents, num_sms, blocks_per_sm=2)
    k = estimate(extents[3])
    if k <= 8:
        cfg = SimtConfig(**{**cfg.__dict__, "bk": 8})
    return cfg


def pick_tensorcore_config(extents, num_sms: int = DEFAULT_NUM_SMS, k_steps: int = 2,
                           single_warp_columns: bool = True) -> TensorCoreConfig | None:
    """Tile for the tensor-core GEMM with normalized extents ``(S, M, N, K)`` and ``k_steps``
    fragment K steps per stage, of the tiles with one warp along J only if
    ``single_warp_columns`` (not for wmma); None when no such tile's N divides the GEMM's N (see
    TENSORCORE_CONFIGS).  A tile of TALL_TILE_ROWS only pays where K is at least TALL_TILE_MIN_K:
    over shorter K loops its fill and its epilogue outweigh it."""
    n, k = static(extents[2]), estimate(extents[3])
    configs = tuple(replace(c, tk=k_steps) for c in TENSORCORE_CONFIGS
                    if n is not None and n % c.bn == 0 and (c.wj > 1 or single_warp_columns)
                    and (c.bm < TALL_TILE_ROWS or k >= TALL_TILE_MIN_K))
    return _pick(configs, extents, num_sms, blocks_per_sm=2) if configs else None
