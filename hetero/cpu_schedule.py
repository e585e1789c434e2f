"""Tuning-free CPU schedules for the Relax CPU pipeline of TVM 0.27.

TVM 0.27's ``relax.backend.cpu_generic`` pipeline legalizes every operator to
TIR and applies no schedule at all, so every kernel runs as a single-threaded
scalar loop nest.  :func:`cpu_pipeline` is that same pipeline with one extra
pass, :class:`ScheduleForCPU`, inserted after legalization and fusion, which
schedules every PrimFunc with the first rule of :data:`DEFAULT_RULES` that
applies:

* :func:`conv2d_rule` -- NCHW conv2d (groups 1, any kernel/stride/padding):
  weights packed to output-channel slabs once, when the engine loads (the
  packing block is split out of the kernel and lifted into
  ``main_transform_params``), output channels vectorised, a register tile of
  output columns x channel vectors, bias/residual/relu epilogue applied per
  tile;
* :func:`dense_rule` -- matmul with (K, N) weights: reduction split across
  cores (rfactor), so batch 1 is parallel and weight rows stream;
* :func:`window_rule` -- depthwise / grouped conv2d and pooling: output
  columns vectorised, window unrolled, padded input produced per (n, c) task
  (column-deinterleaved for stride > 1 so vector loads stay contiguous);
* :func:`generic_rule` -- anything else: inline elementwise blocks, fuse and
  parallelise outer spatial loops, vectorise the innermost spatial loop
  (reduction loops moved outside it);
* :func:`parallel_only_rule`, and finally the unscheduled function: a rule
  that raises is skipped, so an unexpected PrimFunc never fails the build.

All schedules keep the batch dimension symbolic.  Also applied: the
:func:`mark_trivial_noalias` fix for a TVM codegen pitfall, see there.

Runtime note: TVM's thread pool uses half the logical CPUs by default on
x86 (it assumes hyper-threading): one thread on a 2-vCPU machine.  hetero's
engines raise that (``hetero.execute``); set ``TVM_NUM_THREADS`` elsewhere.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable

import tvm
import tvm_ffi
from tvm import relax, s_tir, tirx
from tvm.relax.backend.cpu_generic import pipeline as _cpu_generic
from tvm.s_tir.dlight.analysis import normalize_prim_func

logger = logging.getLogger(__name__)

__all__ = [
    "CONV_OPTIONS",
    "DEFAULT_RULES",
    "ScheduleForCPU",
    "conv2d_rule",
    "cpu_pipeline",
    "dense_rule",
    "generic_rule",
    "mark_trivial_noalias",
    "parallel_only_rule",
    "schedule_prim_func",
    "window_rule",
]


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:
        width = 128
    if width <= 0:
        width = 128
    return max(width // max(dtype_bits, 8), 1)


def _block_iter_kinds(sch: s_tir.Schedule, block) -> list[str]:
    kinds = []
    for iv in sch.get(block).iter_vars:
        if iv.iter_type == tirx.IterVar.DataPar:
            kinds.append("S")
        elif iv.iter_type == tirx.IterVar.CommReduce:
            kinds.append("R")
        else:
            kinds.append("O")
    return kinds


def _loop_kinds(sch: s_tir.Schedule, block) -> list[str] | None:
    """Kind ('S'/'R') of each loop above ``block``, from the iter vars it binds.

    Returns None when a loop binds iter vars of several kinds or of kind 'O'.
    """
    loops = sch.get_loops(block)
    realize = _get_sblock_realize(sch, block)
    kinds = _block_iter_kinds(sch, block)
    result = []
    for loop in loops:
        loop_var = sch.get(loop).loop_var
        used = set()
        for kind, value in zip(kinds, realize.iter_values):
            if _uses_var(value, loop_var):
                used.add(kind)
        if not used:
            result.append("S")  # unit loop / unused loop: harmless
        elif len(used) == 1 and next(iter(used)) in ("S", "R"):
            result.append(next(iter(used)))
        else:
            return None
    return result


_get_sblock_realize_ffi = tvm.get_global_func("s_tir.schedule.GetSBlockRealize")


def _get_sblock_realize(sch: s_tir.Schedule, block):
    return _get_sblock_realize_ffi(sch, block)


def _uses_var(expr, var) -> bool:
    return any(v.same_as(var) for v in _vars_of(expr))


def _vars_of(expr) -> list:
    found = []
    tvm_ffi.structural_walk(expr, (tirx.Var, found.append), order="post")
    return found


def _out_dtype_bits(sch: s_tir.Schedule, block) -> int:
    stmt = sch.get(block)
    if stmt.writes:
        return int(stmt.writes[0].source.dtype.bits)
    return 32


def _pick_vector_factor(extent: int | None, lanes: int) -> int | None:
    """Choose an inner split factor for vectorisation of a loop of ``extent``.

    Returns None when the loop should be vectorised whole (LLVM splits a
    vector of up to 4 registers itself), 0 when it should not be vectorised,
    otherwise the factor; divisors of the extent are preferred so that no
    tail predicate (which TVM's vectoriser scalarises) is needed.
    """
    if extent is None:
        return lanes
    if extent <= 1:
        return 0
    if extent <= 4 * lanes:
        return None
    for f in list(range(4 * lanes, lanes - 1, -1)) + list(range(lanes - 1, max(lanes // 2, 3) - 1, -1)):
        if extent % f == 0:
            return f
    return lanes


def _inline_all(sch: s_tir.Schedule, blocks: list) -> list:
    """compute_inline / reverse_compute_inline every block that allows it.

    Returns the blocks that stay.  A producer is only inlined into its
    consumers when it is elementwise-like (each element read once), so a
    padding stage feeding a convolution or pooling stays materialised.
    """
    remaining = list(blocks)
    changed = True
    while changed:
        changed = False
        for blk in list(remaining):
            if not _is_spatial_block(sch, blk):
                continue
            if _can_inline_cheaply(sch, blk):
                try:
                    sch.compute_inline(blk)
                    remaining.remove(blk)
                    changed = True
                    continue
                except Exception:
                    pass
            try:
                sch.reverse_compute_inline(blk)
                remaining.remove(blk)
                changed = True
            except Exception:
                pass
    return remaining


def _is_spatial_block(sch: s_tir.Schedule, block) -> bool:
    return all(k == "S" for k in _block_iter_kinds(sch, block))


def _can_inline_cheaply(sch: s_tir.Schedule, block) -> bool:
    """True if every consumer reads the produced buffer with the consumer's
    spatial iters only (no reduction vars), i.e. inlining duplicates no work."""
    stmt = sch.get(block)
    if len(stmt.writes) != 1:
        return False
    buf = stmt.writes[0].source
    try:
        consumers = sch.get_consumers(block)
    except Exception:
        return False
    for cons in consumers:
        cstmt = sch.get(cons)
        red_vars = [iv.var for iv in cstmt.iter_vars if iv.iter_type != tirx.IterVar.DataPar]
        if not red_vars:
            continue
        for region in cstmt.reads:
            if not region.source.same_as(buf):
                continue
            for rng in region.region:
                for v in red_vars:
                    if _uses_var(rng.min, v):
                        return False
    return True


# --------------------------------------------------------------------------
# generic rule
# --------------------------------------------------------------------------

_PARALLEL_GRAIN = 64  # fuse outer loops until this many static iterations


def _schedule_block_generic(sch: s_tir.Schedule, block, lanes: int, vectorize: bool = True) -> None:
    """Parallel outer spatial loops + vectorised innermost spatial loop."""
    kinds = _loop_kinds(sch, block)
    loops = sch.get_loops(block)
    if not loops:
        return
    if kinds is None:
        # Mixed loops: only parallelise a leading spatial prefix we can prove.
        return
    s_loops = [loop for loop, k in zip(loops, kinds) if k == "S"]
    r_loops = [loop for loop, k in zip(loops, kinds) if k == "R"]
    if not s_loops:
        return

    # Move the innermost spatial loop inside the reduction loops so that it
    # can be vectorised (pooling, reductions over non-innermost axes).
    inner = s_loops[-1]
    inner_ext = _extent(sch, inner)
    vec = vectorize and inner_ext is not None and inner_ext > 1 and len(s_loops) >= 1
    if r_loops:
        if vec and len(s_loops) >= 2:
            sch.reorder(*s_loops[:-1], *r_loops, inner)
        else:
            vec = False
            sch.reorder(*s_loops, *r_loops)
    outer = s_loops[:-1] if vec else s_loops

    # Vectorise.
    vec_loop = None
    if vec:
        factor = _pick_vector_factor(inner_ext, lanes)
        if factor == 0:
            vec = False
        elif factor is None:
            vec_loop = inner
        else:
            _, vec_loop = sch.split(inner, factors=[None, factor])

    # Parallelise: fuse outer spatial loops until enough parallel work.
    to_fuse = []
    work = 1
    for loop in outer:
        to_fuse.append(loop)
        ext = _extent(sch, loop)
        if ext is not None:
            work *= ext
            if work >= _PARALLEL_GRAIN:
                break
    if not to_fuse and vec_loop is not None and not r_loops:
        # Single loop: split the vector loop's outer part instead.
        to_fuse = [sch.get_loops(block)[0]]
    if to_fuse:
        fused = sch.fuse(*to_fuse) if len(to_fuse) > 1 else to_fuse[0]
        sch.parallel(fused)
    if vec_loop is not None:
        sch.vectorize(vec_loop)
    if r_loops and vec_loop is not None:
        # Initialise outside of the reduction loops (the init loop copies the
        # vectorised inner loop).
        try:
            sch.decompose_reduction(block, r_loops[0])
        except Exception:
            pass


def _root_blocks(sch: s_tir.Schedule, func_name: str = "main") -> list:
    root = sch.get_sblock(sch.mod[func_name].body.block.name_hint)
    return list(sch.get_child_blocks(root))


def _located(func: tirx.PrimFunc, find: Callable) -> tuple[s_tir.Schedule, list, object] | None:
    """A schedule of ``func`` with its elementwise blocks inlined, the blocks left, and what
    ``find(sch, blocks)`` locates among them; None when either comes up empty."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    blocks = _inline_all(sch, [info.block_rv for info in infos])
    found = find(sch, blocks)
    return None if found is None else (sch, blocks, found)


def _static_shape(buf) -> list[int | None]:
    """A buffer's extents, None where one is symbolic (the batch)."""
    return [int(x) if isinstance(x, tirx.IntImm) else None for x in buf.shape]


def generic_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Parallel + vectorise every block of ``func`` (after inlining)."""
    prepared = _located(func, lambda sch, blocks: blocks)
    if prepared is None:
        return None
    sch, blocks, _ = prepared
    for blk in blocks:
        lanes = _vector_lanes(target, _out_dtype_bits(sch, blk))
        _schedule_block_generic(sch, blk, lanes)
    return sch


def parallel_only_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Last resort: only parallelise the outermost spatial loop of each block."""
    sch = s_tir.Schedule(func)
    try:
        blocks = _root_blocks(sch)
    except Exception:
        return None
    done = False
    for blk in blocks:
        try:
            loops = sch.get_loops(blk)
            kinds = _loop_kinds(sch, blk)
            if loops and kinds and kinds[0] == "S":
                sch.parallel(loops[0])
                done = True
        except Exception:
            continue
    return sch if done else None


# --------------------------------------------------------------------------
# multiply-accumulate analysis
# --------------------------------------------------------------------------


_Load = tvm.ir.expr.TensorLoad  # tirx.BufferLoad is a constructor function in 0.27


def _strip_cast(expr):
    while isinstance(expr, tirx.Cast):
        expr = expr.value
    return expr


def _parse_mac(block_stmt):
    """Match ``out[..] = out[..] + a[..] * b[..]``; return (out_store, a, b)."""
    body = block_stmt.body
    if not isinstance(body, tirx.BufferStore):
        return None
    value = body.value
    if not isinstance(value, tirx.Add):
        return None
    lhs, rhs = value.a, value.b
    if isinstance(rhs, _Load) and rhs.source.same_as(body.buffer):
        lhs, rhs = rhs, lhs
    if not (isinstance(lhs, _Load) and lhs.source.same_as(body.buffer)):
        return None
    rhs = _strip_cast(rhs)
    if not isinstance(rhs, tirx.Mul):
        return None
    a, b = _strip_cast(rhs.a), _strip_cast(rhs.b)
    if not (isinstance(a, _Load) and isinstance(b, _Load)):
        return None
    return body, a, b


def _read_index(block_stmt, buf) -> int:
    for i, region in enumerate(block_stmt.reads):
        if region.source.same_as(buf):
            return i
    raise ValueError("buffer not read by block")


def _var_is(expr, var) -> bool:
    return isinstance(expr, tirx.Var) and expr.same_as(var)


def _largest_divisor_leq(n: int, cap: int) -> int:
    for d in range(min(n, cap), 0, -1):
        if n % d == 0:
            return d
    return 1


# --------------------------------------------------------------------------
# conv2d (NCHW / OIHW, groups == 1): output channels vectorised
# --------------------------------------------------------------------------


def _find_conv(sch: s_tir.Schedule, blocks: list):
    """Find the NCHW conv2d MAC block among ``blocks``.

    Returns (block, weight_load, data_load) for a block
    ``out[n, f, y, x] += data[...] * w[f, rc, ry, rx]`` whose data access does
    not depend on f.
    """
    for blk in blocks:
        stmt = sch.get(blk)
        kinds = _block_iter_kinds(sch, blk)
        if kinds.count("R") < 1 or "O" in kinds:
            continue
        mac = _parse_mac(stmt)
        if mac is None:
            continue
        store, a, b = mac
        ivars = [iv.var for iv in stmt.iter_vars]
        s_vars = [v for v, k in zip(ivars, kinds) if k == "S"]
        if len(store.indices) != 4 or len(s_vars) != 4:
            continue
        if not all(_var_is(i, v) for i, v in zip(store.indices, s_vars)):
            continue
        f = s_vars[1]
        for w_load, d_load in ((b, a), (a, b)):
            if len(w_load.indices) != 4 or not _var_is(w_load.indices[0], f):
                continue
            if any(_uses_var(i, v) for i in w_load.indices[1:] for v in s_vars):
                continue
            if any(_uses_var(i, f) for i in d_load.indices):
                continue
            return blk, w_load, d_load
    return None


CONV_OPTIONS = {
    # "once": pack the weights in a block of their own, which cpu_pipeline moves out of the
    # kernel (SplitLayoutRewritePreproc) and out of main (LiftTransformParams): packed when the
    # engine loads, not on every call (benchmarks/HISTORY.md: resnet-50, 1 thread, batch 1, 10.9 -> 12.4
    # img/s); "task": pack each output-channel slab inside its parallel task; "root": all
    # before the kernel's loops
    "pack_at": "once",
    "pack_order": "cin_outer",  # "cin_outer": (c, r, s, f) with f vectorised
    "max_acc": 16,  # register accumulators (vectors) per tile
    # True: parallel over (K/B, row chunks) with the batch loop inside each task
    # (weights reused across the batch); False: parallel over (n, K/B, row
    # chunks) (activations of one image reused across output-channel slabs);
    # "auto": True when the weights are larger than one image's input.
    "batch_in_task": "auto",
    # output-channel slabs looped inside each (image, row chunk) task, so an
    # input tile is reused from L1 by every slab; "auto": when the batch is
    # not inside the task and the weights are at most fo_inner_max_bytes.
    # Off by default: +13% on a 1x1 256->64 56x56 layer at batch 8 but
    # neutral to -2% on whole resnet-50 / mobilenet (1 thread).
    "fo_inner": False,
    "fo_inner_max_bytes": 256 * 1024,
    "max_unroll_window": 9,  # unroll kh x kw up to this many taps
    # 1x1 stride-1 convs over at most this many input channels vectorise output columns instead
    # of output channels (see _columns_tile); 0: never.  One thread, this 2-core machine: 32->64
    # at 112x112 53 -> 84 GFLOP/s at batch 1, mobilenet +2%; 64->128 at 56x56 6-8% slower
    "columns_max_cin": 32,
}


def _num_cores(target: tvm.target.Target) -> int:
    cores = target.attrs.get("num-cores", None) if target.attrs is not None else None
    if cores:
        return int(cores)
    return max(os.cpu_count() or 1, 1)


def _pick_conv_tile(k_ext: int, w_ext: int, lanes: int, max_acc: int) -> tuple[int, int, int]:
    """(vec, nvec, tile_x): output channels in blocks of vec*nvec, tile_x columns."""
    vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and k_ext % v == 0), None)
    if vec is None:
        return None
    tile_x = _pick_tile_x(w_ext, max_acc)
    nvec = 1
    if tile_x * 2 <= max_acc and k_ext % (2 * vec) == 0:
        nvec = 2
    return vec, nvec, tile_x


def _columns_tile(stmt, w_load, d_load, k_ext: int, w_ext: int, lanes: int, opts: dict) -> tuple[int, int] | None:
    """(vec, channels) for a conv that reads its input row by row, unstrided (1x1, stride 1), over
    few input channels: ``vec`` output columns vectorised times ``channels`` output channels in
    registers.  With few input channels the usual channel-vectorised tile spends its time in the
    epilogue, which transposes every register tile into the NCHW output (mobilenet's 32->64 at
    112x112: 16 GMAC/s, where 512->512 convs run at 49)."""
    cin = _static_shape(w_load.source)[1]
    x_var = stmt.iter_vars[3].var
    if cin is None or cin > opts["columns_max_cin"] or not _var_is(d_load.indices[-1], x_var):
        return None
    if any(_uses_var(i, x_var) for i in d_load.indices[:-1]):
        return None
    vec = next((v for v in (lanes, lanes // 2) if v >= 4 and w_ext % v == 0), None)
    channels = _largest_divisor_leq(k_ext, opts["max_acc"])
    return None if vec is None or channels < 4 else (vec, channels)


def conv2d_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """NCHW conv2d with output channels vectorised.

    * weights packed to ``[K/B, C, kh, kw, B]`` (B = vec * nvec output channels),
      once (see ``CONV_OPTIONS["pack_at"]``; weights computed inside the function are packed
      slab by slab inside the parallel task that uses it);
    * accumulators: ``tile_x`` output columns x ``nvec`` vectors kept in
      registers (local buffer with the channel block innermost, unrolled); for
      1x1 stride-1 convs over few input channels, one vector of output columns x
      up to ``max_acc`` output channels instead (:func:`_columns_tile`);
    * parallel over (K/B, chunks of output rows) with the batch loop inside
      the task when the weights outweigh one image's input, else over
      (n, K/B, row chunks) (see :data:`CONV_OPTIONS`);
    * the elementwise epilogue (bias, residual add, relu) is applied per
      register tile while it is hot.
    """
    opts = CONV_OPTIONS
    prepared = _located(func, _find_conv)
    if prepared is None:
        return None
    sch, blocks, found = prepared
    conv, w_load, d_load = found
    stmt = sch.get(conv)
    out_buf = stmt.writes[0].source
    lanes = _vector_lanes(target, int(out_buf.dtype.bits))
    _, k_ext, h_ext, w_ext = _static_shape(out_buf)
    if k_ext is None or w_ext is None or h_ext is None:
        return None
    columns = _columns_tile(stmt, w_load, d_load, k_ext, w_ext, lanes, opts)
    if columns is not None:
        vec, blk_f = columns
    else:
        tile = _pick_conv_tile(k_ext, w_ext, lanes, opts["max_acc"])
        if tile is None:
            return None
        vec, nvec, tile_x = tile
        blk_f = vec * nvec

    others = [b for b in blocks if not b.same_as(conv)]
    consumers = [b for b in others if _reads_buffer(sch, b, out_buf)]
    producers = [b for b in others if b not in consumers]
    if len(consumers) > 1:
        return None

    # 1. weight packing: w[f, c, r, s] -> wp[f // B, c, r, s, f % B]
    w_idx = _read_index(stmt, w_load.source)
    wpack = sch.cache_read(conv, w_idx, "global")
    sch.transform_layout(
        conv, ("read", w_idx), lambda f, c, r, s: (f // blk_f, c, r, s, f % blk_f)
    )

    # 2. accumulator in a local buffer with the vectorised axis innermost.
    acc = sch.cache_write(conv, 0, "local")
    if columns is None:
        sch.transform_layout(
            conv, ("write", 0), lambda nn, f, y, x: (nn, f // blk_f, y, x, f % blk_f)
        )

    loops = sch.get_loops(conv)
    nn, ff, yy, xx = loops[:4]
    r_loops = loops[4:]
    if columns is None:  # register tile: tile_x columns x nvec vectors of vec channels
        fo, fv, fl = sch.split(ff, factors=[None, nvec, vec])
        xo, xi = sch.split(xx, factors=[None, tile_x])
        register_tile = [xi, fv, fl]
    else:  # register tile: blk_f channels x one vector of vec columns
        fo, fi = sch.split(ff, factors=[None, blk_f])
        xo, xv = sch.split(xx, factors=[None, vec])
        register_tile = [fi, xv]
    n_fo = k_ext // blk_f
    want = 4 * _num_cores(target)
    w_elems = _static_numel(w_load.source.shape)
    d_elems = _static_numel(d_load.source.shape[1:])
    batch_in_task = opts["batch_in_task"]
    if batch_in_task == "auto":
        batch_in_task = w_elems is not None and d_elems is not None and w_elems > d_elems
    fo_inner = opts["fo_inner"]
    if fo_inner == "auto":
        fo_inner = (not batch_in_task) and w_elems is not None and w_elems * 4 <= opts["fo_inner_max_bytes"]
    # parallel tasks: output-channel slabs x chunks of output rows (x images)
    slabs = 1 if fo_inner else n_fo
    chunks = 1
    if slabs < want:
        chunks = next((d for d in range(1, h_ext + 1) if h_ext % d == 0 and slabs * d >= want), h_ext)
    yc, yi = sch.split(yy, factors=[chunks, None])
    tile_loop = xo
    if fo_inner:
        # all output-channel slabs inside the task: one input tile (all c,
        # tile_x columns) is reused from L1 by every slab
        sch.reorder(nn, yc, yi, xo, fo, *r_loops, *register_tile)
        par = sch.fuse(nn, yc)
        tile_loop = fo
    elif batch_in_task:
        sch.reorder(fo, yc, nn, yi, xo, *r_loops, *register_tile)
        par = sch.fuse(fo, yc)
    else:
        sch.reorder(nn, fo, yc, yi, xo, *r_loops, *register_tile)
        par = sch.fuse(nn, fo, yc)
    sch.parallel(par)

    # write back (+ fused epilogue) per register tile
    epilogue = consumers[0] if consumers else None
    if epilogue is not None:
        sch.compute_inline(acc)
        sch.reverse_compute_at(epilogue, tile_loop, preserve_unit_loops=True)
        _vectorize_tile_tail(sch, epilogue, lanes)
    else:
        sch.reverse_compute_at(acc, tile_loop, preserve_unit_loops=True)
        _vectorize_tile_tail(sch, acc, lanes)

    for loop in register_tile[:-1]:
        sch.unroll(loop)
    sch.vectorize(register_tile[-1])
    # unroll the kernel window (not the channel loop) when it is small
    window = math.prod((_extent(sch, r) or 1 << 20) for r in r_loops[1:])
    for r in r_loops[1:]:
        if window <= opts["max_unroll_window"]:
            sch.unroll(r)
    if r_loops:
        init = sch.decompose_reduction(conv, r_loops[0])
        iloops = sch.get_loops(init)
        sch.vectorize(iloops[-1])
        for lp in iloops[-len(register_tile):-1]:
            sch.unroll(lp)

    # 3. weight packing schedule
    pack_at = opts["pack_at"]
    if pack_at == "once" and not any(w_load.source.same_as(p) for p in sch.mod["main"].params):
        pack_at = "task"  # the weights are computed in this function: nothing to prepack
    if pack_at == "once":
        sch.annotate(wpack, "meta_schedule.layout_rewrite_preproc", True)
        ploops = sch.get_loops(wpack)
    elif pack_at == "task":
        sch.compute_at(wpack, par, preserve_unit_loops=True)
        ploops = sch.get_loops(wpack)[1:]
    else:
        ploops = sch.get_loops(wpack)
        sch.parallel(ploops[0])
        ploops = ploops[1:]
    if opts["pack_order"] == "cin_outer" and len(ploops) == 4:
        pf, pc, pr, ps = ploops
        pfo, pfi = sch.split(pf, factors=[None, vec])
        sch.reorder(pfo, pc, pr, ps, pfi)
        sch.vectorize(pfi)
    for blk in producers:
        _schedule_block_generic(sch, blk, lanes)
    return sch


def _static_numel(shape) -> int | None:
    total = 1
    for dim in shape:
        if not isinstance(dim, tirx.IntImm):
            return None
        total *= int(dim)
    return total


def _pick_tile_x(w_ext: int, max_acc: int = 16) -> int:
    if w_ext <= max_acc:
        return w_ext
    best = _largest_divisor_leq(w_ext, max_acc)
    if best >= 6:
        return best
    if w_ext <= 28:
        return w_ext
    return 8


def _reads_buffer(sch, block, buf) -> bool:
    return any(r.source.same_as(buf) for r in sch.get(block).reads)


def _vectorize_tile_tail(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = _extent(sch, inner)
    if ext is not None and 1 < ext <= lanes:
        sch.vectorize(inner)


# --------------------------------------------------------------------------
# dense / matmul: out[.., i, j] += a[.., i, k] * b[.., k, j]
# --------------------------------------------------------------------------

DENSE_K_BLOCK = 512


def _find_dense(sch: s_tir.Schedule, blocks: list):
    """MAC block whose last output axis j is the contiguous (last) axis of one
    operand ``b`` and is not used by the other operand ``a``."""
    for blk in blocks:
        stmt = sch.get(blk)
        kinds = _block_iter_kinds(sch, blk)
        if kinds.count("R") != 1 or "O" in kinds or kinds[-1] != "R":
            continue
        mac = _parse_mac(stmt)
        if mac is None:
            continue
        store, a, b = mac
        ivars = [iv.var for iv in stmt.iter_vars]
        s_vars = ivars[:-1]
        k_var = ivars[-1]
        if len(store.indices) != len(s_vars) or len(s_vars) < 2:
            continue
        if not all(_var_is(i, v) for i, v in zip(store.indices, s_vars)):
            continue
        j_var = s_vars[-1]
        for a_load, b_load in ((a, b), (b, a)):
            if not _var_is(b_load.indices[-1], j_var):
                continue
            if len(b_load.indices) < 2 or not _var_is(b_load.indices[-2], k_var):
                continue
            if any(_uses_var(i, j_var) for i in a_load.indices):
                continue
            if not _var_is(a_load.indices[-1], k_var):
                continue
            return blk
    return None


DENSE_COL_CHUNK = 4096  # output columns per inner sweep (acc chunk stays in L1)


def dense_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """matmul with the weight in (K, N) layout (a GEMV at batch 1).

    The reduction is split into P contiguous k ranges (rfactor) computed in
    parallel, so even batch 1 uses every core and each task streams whole
    weight rows (contiguous, no TLB thrash); partial sums over chunks of
    columns stay in L1, the inner column loop is vectorised.  The P partial
    results are summed by a small write-back block.
    """
    prepared = _located(func, _find_dense)
    if prepared is None:
        return None
    sch, blocks, blk = prepared
    stmt = sch.get(blk)
    out_buf = stmt.writes[0].source
    lanes = _vector_lanes(target, int(out_buf.dtype.bits))
    loops = sch.get_loops(blk)
    kinds = _loop_kinds(sch, blk)
    if kinds is None or kinds[-1] != "R" or "R" in kinds[:-1]:
        return None
    j_loop, k_loop = loops[-2], loops[-1]
    n_ext, k_ext = _extent(sch, j_loop), _extent(sch, k_loop)
    if n_ext is None or k_ext is None or k_ext < 128:
        return None
    cores = _num_cores(target)
    parts = next(
        (p for p in range(4 * cores, 0, -1) if k_ext % p == 0 and p % cores == 0 and k_ext // p >= 32),
        None,
    )
    if parts is None:
        return None
    others = [b for b in blocks if not b.same_as(blk)]

    ko, _ = sch.split(k_loop, factors=[parts, None])
    rf = sch.rfactor(ko, factor_axis=0)
    wb = blk
    rloops = sch.get_loops(rf)
    s_loops, rj, rko, rki = rloops[:-3], rloops[-3], rloops[-2], rloops[-1]
    factor = _pick_vector_factor(n_ext, lanes)
    if factor is None:
        jo, jc, jl = sch.split(rj, factors=[1, 1, None])
    else:
        chunk = max(factor, (DENSE_COL_CHUNK // factor) * factor)
        while n_ext % chunk and chunk > factor:
            chunk -= factor
        jo, jc, jl = sch.split(rj, factors=[None, chunk // factor, factor])
    sch.reorder(rko, jo, rki, *s_loops, jc, jl)
    sch.parallel(rko)
    sch.vectorize(jl)
    init = sch.decompose_reduction(rf, rki)
    sch.vectorize(sch.get_loops(init)[-1])

    _schedule_block_generic(sch, wb, lanes)
    for other in others:
        _schedule_block_generic(sch, other, lanes)
    return sch


# --------------------------------------------------------------------------
# sliding-window reductions: depthwise conv2d, max / avg pooling
# --------------------------------------------------------------------------

WINDOW_MAX_TILE_X = 64


def _linear_coef(expr, var) -> int | None:
    """Coefficient of ``var`` in ``expr`` if ``expr`` is linear in it."""
    try:
        coefs = tvm.sym.detect_linear_equation(expr, [var])
    except Exception:
        return None
    if len(coefs) != 2 or not isinstance(coefs[0], tirx.IntImm):
        return None
    return int(coefs[0])


def _find_window(sch: s_tir.Schedule, blocks: list):
    """The single reduction block ``out[n, c, y, x] = reduce(data[.., y*s+.., x*s+..])``.

    Returns (block, data_buffer, x_stride)."""
    reds = [b for b in blocks if "R" in _block_iter_kinds(sch, b)]
    if len(reds) != 1:
        return None
    blk = reds[0]
    stmt = sch.get(blk)
    kinds = _block_iter_kinds(sch, blk)
    if "O" in kinds or len(stmt.writes) != 1:
        return None
    ivars = [iv.var for iv in stmt.iter_vars]
    s_vars = [v for v, k in zip(ivars, kinds) if k == "S"]
    body = stmt.body
    if not isinstance(body, tirx.BufferStore) or len(body.indices) != 4 or len(s_vars) != 4:
        return None
    if not all(_var_is(i, v) for i, v in zip(body.indices, s_vars)):
        return None
    x_var = s_vars[3]
    for region in stmt.reads:
        buf = region.source
        if buf.same_as(body.buffer) or len(region.region) < 2:
            continue
        last = region.region[-1].min
        if not _uses_var(last, x_var):
            continue
        coef = _linear_coef(last, x_var)
        if coef is None or coef < 1:
            return None
        return blk, buf, coef
    return None


def window_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Depthwise conv2d and pooling (NCHW): vectorise over output columns,
    reduction window innermost but one with the accumulator row in registers,
    parallel over (n, c); for stride > 1 the padded input is stored column
    deinterleaved (``w % s, w // s``) so the vector loads are contiguous."""
    prepared = _located(func, _find_window)
    if prepared is None:
        return None
    sch, blocks, found = prepared
    blk, data_buf, stride = found
    stmt = sch.get(blk)
    out_buf = stmt.writes[0].source
    _, c_ext, h_ext, w_ext = _static_shape(out_buf)
    if w_ext is None or w_ext < 4 or c_ext is None:
        return None
    lanes = _vector_lanes(target, int(out_buf.dtype.bits))
    others = [b for b in blocks if not b.same_as(blk)]
    consumers = [b for b in others if _reads_buffer(sch, b, out_buf)]
    producers = [b for b in others if b not in consumers]
    if len(consumers) > 1:
        return None

    acc = sch.cache_write(blk, 0, "local")
    loops = sch.get_loops(blk)
    kinds = _loop_kinds(sch, blk)
    if kinds is None or kinds[:4] != ["S"] * 4:
        return None
    nn, cc, yy, xx = loops[:4]
    r_loops = loops[4:]
    if w_ext <= WINDOW_MAX_TILE_X:
        tile_x = w_ext
    else:
        tile_x = _largest_divisor_leq(w_ext, WINDOW_MAX_TILE_X)
        if tile_x < lanes:
            tile_x = 2 * lanes
    xo, xi = sch.split(xx, factors=[None, tile_x])
    sch.reorder(nn, cc, yy, xo, *r_loops, xi)
    par = sch.fuse(nn, cc)
    sch.parallel(par)

    epilogue = consumers[0] if consumers else None
    if epilogue is not None:
        sch.compute_inline(acc)
        sch.reverse_compute_at(epilogue, xo, preserve_unit_loops=True)
        tail = epilogue
    else:
        sch.reverse_compute_at(acc, xo, preserve_unit_loops=True)
        tail = acc
    tail_loops = sch.get_loops(tail)
    sch.vectorize(tail_loops[-1])

    sch.vectorize(xi)
    window = 1
    for r in r_loops:
        window *= _extent(sch, r) or 1000
    if window <= 64:
        for r in r_loops:
            sch.unroll(r)
    if r_loops:
        init = sch.decompose_reduction(blk, r_loops[0])
        sch.vectorize(sch.get_loops(init)[-1])

    for prod in producers:
        pstmt = sch.get(prod)
        if (
            stride > 1
            and len(pstmt.writes) == 1
            and pstmt.writes[0].source.same_as(data_buf)
            and len(data_buf.shape) == 4
            and isinstance(data_buf.shape[3], tirx.IntImm)
            and int(data_buf.shape[3]) % stride == 0
        ):
            st = stride
            sch.transform_layout(
                prod, ("write", 0), lambda a, b, h, w: (a, b, h, w % st, w // st)
            )
            sch.transform_block_layout(prod, lambda a, b, h, w: (a, b, h, w % st, w // st))
        # The padded plane of one (n, c) is produced inside the task that
        # consumes it (stays in cache instead of a round trip to memory).
        try:
            sch.compute_at(prod, par, preserve_unit_loops=True)
            ploops = sch.get_loops(prod)[1:]
            if ploops:
                factor = _pick_vector_factor(_extent(sch, ploops[-1]), lanes)
                if factor is None:
                    sch.vectorize(ploops[-1])
                elif factor:
                    sch.vectorize(sch.split(ploops[-1], factors=[None, factor])[1])
        except Exception:
            _schedule_block_generic(sch, prod, lanes)
    return sch


# --------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------

Rule = Callable[[tirx.PrimFunc, tvm.target.Target], "s_tir.Schedule | None"]

DEFAULT_RULES: list[Rule] = [conv2d_rule, dense_rule, window_rule, generic_rule, parallel_only_rule]


def schedule_prim_func(
    func: tirx.PrimFunc, target: tvm.target.Target, rules: list[Rule] | None = None
) -> tuple[tirx.PrimFunc, str | None]:
    """Apply the first rule that succeeds; return (func, rule name or None)."""
    for rule in rules if rules is not None else DEFAULT_RULES:
        try:
            sch = rule(func, target)
        except Exception as err:
            logger.debug("rule %s failed: %s", getattr(rule, "__name__", rule), err)
            continue
        if sch is None:
            continue
        new_func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return new_func, getattr(rule, "__name__", str(rule))
    return func, None


@tvm.transform.module_pass(opt_level=0, name="ScheduleForCPU")
class ScheduleForCPU:
    """Schedule every unscheduled PrimFunc of a module for a CPU target."""

    def __init__(self, target: tvm.target.Target | None = None, rules: list[Rule] | None = None):
        self.target = target
        self.rules = rules
        self.applied: dict[str, str | None] = {}

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        target = self.target or tvm.target.Target.current(allow_none=False)
        updates = {}
        for gvar, func in mod.functions_items():
            if not isinstance(func, tirx.PrimFunc):
                continue
            if func.attrs is not None and func.attrs.get("tirx.is_scheduled", False):
                continue
            new_func, rule = schedule_prim_func(func, target, self.rules)
            self.applied[gvar.name_hint] = rule
            if rule is not None:
                updates[gvar] = new_func
        for gvar, func in updates.items():
            mod[gvar] = func
        return mod


def _buffer_param_count(func: tirx.PrimFunc) -> int:
    count = 0
    for param in func.params:
        if isinstance(getattr(param, "ty", None), tirx.buffer.BufferType):
            count += 1
    return count


@tvm.transform.module_pass(opt_level=0, name="MarkTrivialNoAlias")
def mark_trivial_noalias(mod: tvm.IRModule, _ctx) -> tvm.IRModule:
    """Mark PrimFuncs with at most one buffer parameter ``tirx.noalias``.

    TVM 0.27's LLVM codegen gives every buffer of *every* function in the
    module the same TBAA alias class as soon as one function of the module
    lacks ``tirx.noalias``.  VMShapeLower's ``shape_func`` (a single
    shape-heap buffer) is such a function; without this pass LLVM cannot keep
    the register-tiled conv accumulators in registers (stores after every
    FMA, ~2.3x slower conv kernels).  With a single buffer parameter the
    no-alias promise is trivially true.
    """
    updates = {}
    for gvar, func in mod.functions_items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and "tirx.noalias" in func.attrs:
            continue
        if _buffer_param_count(func) <= 1:
            updates[gvar] = func.with_attr("tirx.noalias", True)
    for gvar, func in updates.items():
        mod[gvar] = func
    return mod


def fusion_passes(target: tvm.target.Target) -> list[tvm.transform.Pass]:
    """What :func:`cpu_pipeline` runs before scheduling: library dispatch, legalization, fusion.

    MetaSchedule's tasks are taken from exactly this IR (hetero.tune), so that its records match the
    functions a later build schedules.
    """
    return _cpu_generic.library_dispatch_passes(target) + _cpu_generic.legalize_passes(target)


def cpu_pipeline(
    target: tvm.target.Target, rules: list[Rule] | None = None, records: str | None = None
) -> tvm.transform.Pass:
    """cpu_generic's default pipeline plus :class:`ScheduleForCPU` after fusion, then the
    weight packing it marks split out of the kernels and lifted into ``main_transform_params``
    (run once by hetero.compile.module_weights).

    ``rules`` overrides :data:`DEFAULT_RULES` (for experiments; ``[]`` gives
    the unscheduled default pipeline plus the no-alias fix). ``records``, a
    MetaSchedule database folder, schedules the functions it has records
    for; ScheduleForCPU skips those and schedules the rest.
    """
    @tvm.transform.module_pass(opt_level=0, name="HeteroCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target, (s_tir.meta_schedule.database.JSONDatabase(work_dir=records) if records
                      else contextlib.nullcontext()):
            seq = tvm.transform.Sequential(
                fusion_passes(target)
                + ([relax.transform.MetaScheduleApplyDatabase()] if records else [])
                + [ScheduleForCPU(target, rules), relax.transform.SplitLayoutRewritePreproc(),
                   relax.transform.LiftTransformParams()]
                + _cpu_generic.dataflow_lower_passes(target)
                + _cpu_generic.finalize_passes(target)
                + [mark_trivial_noalias]
            )
            mod = seq(mod)
        return mod

    return _pipeline
