"""Tuning-free CPU schedules for the Relax CPU pipeline of TVM 0.27.

TVM 0.27's ``relax.backend.cpu_generic`` pipeline legalizes every operator to
TIR and applies no schedule at all, so every kernel runs as a single-threaded
scalar loop nest.  :func:`cpu_pipeline` is that same pipeline with one extra
pass, :class:`ScheduleForCPU`, inserted after legalization and fusion.  It
schedules every PrimFunc:

* generic rule (any function): inline elementwise producers/consumers, then
  for every remaining block parallelise the fused outer spatial loops,
  move reduction loops outside the innermost spatial loop and vectorise it;
* falls back to "outer loop parallel" and finally to the unscheduled
  function, so an unexpected PrimFunc never raises.
"""

from __future__ import annotations

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

__all__ = ["cpu_pipeline", "ScheduleForCPU", "schedule_prim_func", "default_target"]


def default_target(num_cores: int | None = None) -> tvm.target.Target:
    """The llvm target of this host (``mcpu`` from LLVM's host detection)."""
    cfg = {
        "kind": "llvm",
        "mtriple": "x86_64-linux-gnu",
        "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
    }
    if num_cores:
        cfg["num-cores"] = int(num_cores)
    return tvm.target.Target(cfg)


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def _extent(sch: s_tir.Schedule, loop) -> int | None:
    ext = sch.get(loop).extent
    return int(ext) if isinstance(ext, tirx.IntImm) else None


def _vector_lanes(target: tvm.target.Target, dtype_bits: int = 32) -> int:
    try:
        width = int(tvm.target.codegen.llvm_get_vector_width(target))
    except Exception:  # pylint: disable=broad-except
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

    Prefers a divisor of the extent (no tail predicate); returns None when
    the loop should be vectorised as is (small extent) and 0 when it should
    not be vectorised.
    """
    if extent is None:
        return lanes
    if extent <= 1:
        return 0
    if extent <= lanes:
        return None
    for f in range(lanes, max(lanes // 2, 3) - 1, -1):
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
                except Exception:  # pylint: disable=broad-except
                    pass
            try:
                sch.reverse_compute_inline(blk)
                remaining.remove(blk)
                changed = True
            except Exception:  # pylint: disable=broad-except
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
    except Exception:  # pylint: disable=broad-except
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
    s_loops = [l for l, k in zip(loops, kinds) if k == "S"]
    r_loops = [l for l, k in zip(loops, kinds) if k == "R"]
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
        except Exception:  # pylint: disable=broad-except
            pass


def _root_blocks(sch: s_tir.Schedule, func_name: str = "main") -> list:
    root = sch.get_sblock(sch.mod[func_name].body.block.name_hint)
    return list(sch.get_child_blocks(root))


def generic_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Parallel + vectorise every block of ``func`` (after inlining)."""
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    blocks = [info.block_rv for info in infos]
    blocks = _inline_all(sch, blocks)
    for blk in blocks:
        lanes = _vector_lanes(target, _out_dtype_bits(sch, blk))
        _schedule_block_generic(sch, blk, lanes)
    return sch


def parallel_only_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """Last resort: only parallelise the outermost spatial loop of each block."""
    sch = s_tir.Schedule(func)
    try:
        blocks = _root_blocks(sch)
    except Exception:  # pylint: disable=broad-except
        return None
    done = False
    for blk in blocks:
        try:
            loops = sch.get_loops(blk)
            kinds = _loop_kinds(sch, blk)
            if loops and kinds and kinds[0] == "S":
                sch.parallel(loops[0])
                done = True
        except Exception:  # pylint: disable=broad-except
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
        r_vars = [v for v, k in zip(ivars, kinds) if k == "R"]
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
    "pack_at": "task",  # "task": pack each output-channel slab inside its parallel task
    "pack_order": "cin_outer",  # "cin_outer": (c, r, s, f) with f vectorised
    "max_acc": 16,  # register accumulators (vectors) per tile
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


def conv2d_rule(func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
    """NCHW conv2d with output channels vectorised.

    * weights packed to ``[K/B, C, kh, kw, B]`` (B = vec * nvec output channels),
      slab by slab inside the parallel task that uses it;
    * accumulators: ``tile_x`` output columns x ``nvec`` vectors kept in
      registers (local buffer with the channel block innermost, unrolled);
    * parallel over (K/B, chunks of output rows), batch inside the task;
    * the elementwise epilogue (bias, residual add, relu) is applied per
      register tile while it is hot.
    """
    opts = CONV_OPTIONS
    sch = s_tir.Schedule(func)
    infos = normalize_prim_func(sch)
    if infos is None:
        return None
    blocks = _inline_all(sch, [info.block_rv for info in infos])
    found = _find_conv(sch, blocks)
    if found is None:
        return None
    conv, w_load, _ = found
    stmt = sch.get(conv)
    out_buf = stmt.writes[0].source
    lanes = _vector_lanes(target, int(out_buf.dtype.bits))
    _, k_ext, h_ext, w_ext = [
        (int(x) if isinstance(x, tirx.IntImm) else None) for x in out_buf.shape
    ]
    if k_ext is None or w_ext is None or h_ext is None:
        return None
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

    # 2. accumulator in a local buffer with the channel block innermost.
    acc = sch.cache_write(conv, 0, "local")
    sch.transform_layout(
        conv, ("write", 0), lambda nn, f, y, x: (nn, f // blk_f, y, x, f % blk_f)
    )

    loops = sch.get_loops(conv)
    nn, ff, yy, xx = loops[:4]
    r_loops = loops[4:]
    fo, fv, fl = sch.split(ff, factors=[None, nvec, vec])
    xo, xi = sch.split(xx, factors=[None, tile_x])
    n_fo = k_ext // blk_f
    want = 4 * _num_cores(target)
    chunks = 1
    if n_fo < want:
        chunks = next((d for d in range(1, h_ext + 1) if h_ext % d == 0 and n_fo * d >= want), h_ext)
    yc, yi = sch.split(yy, factors=[chunks, None])
    sch.reorder(fo, yc, nn, yi, xo, *r_loops, xi, fv, fl)
    par = sch.fuse(fo, yc)
    sch.parallel(par)

    # write back (+ fused epilogue) per register tile
    epilogue = consumers[0] if consumers else None
    if epilogue is not None:
        sch.compute_inline(acc)
        sch.reverse_compute_at(epilogue, xo, preserve_unit_loops=True)
        _vectorize_tile_tail(sch, epilogue, lanes)
    else:
        sch.reverse_compute_at(acc, xo, preserve_unit_loops=True)
        _vectorize_tile_tail(sch, acc, lanes)

    sch.unroll(xi)
    sch.unroll(fv)
    sch.vectorize(fl)
    for r in r_loops[1:]:
        if (_extent(sch, r) or 99) <= 7:
            sch.unroll(r)
    if r_loops:
        init = sch.decompose_reduction(conv, r_loops[0])
        iloops = sch.get_loops(init)
        sch.vectorize(iloops[-1])
        for lp in iloops[-3:-1]:
            sch.unroll(lp)

    # 3. weight packing schedule
    if opts["pack_at"] == "task":
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


def _schedule_pack(sch: s_tir.Schedule, block, lanes: int) -> None:
    loops = sch.get_loops(block)
    sch.parallel(loops[0])


# --------------------------------------------------------------------------
# the pass
# --------------------------------------------------------------------------

Rule = Callable[[tirx.PrimFunc, tvm.target.Target], "s_tir.Schedule | None"]

DEFAULT_RULES: list[Rule] = [conv2d_rule, generic_rule, parallel_only_rule]


def schedule_prim_func(
    func: tirx.PrimFunc, target: tvm.target.Target, rules: list[Rule] | None = None
) -> tuple[tirx.PrimFunc, str | None]:
    """Apply the first rule that succeeds; return (func, rule name or None)."""
    for rule in rules if rules is not None else DEFAULT_RULES:
        try:
            sch = rule(func, target)
        except Exception as err:  # pylint: disable=broad-except
            logger.debug("rule %s failed: %s", getattr(rule, "__name__", rule), err)
            continue
        if sch is None:
            continue
        new_func = sch.mod["main"].with_attr("tirx.is_scheduled", True)
        return new_func, getattr(rule, "__name__", str(rule))
    return func, None


@tvm.transform.module_pass(opt_level=0, name="ScheduleForCPU")
class ScheduleForCPU:  # pylint: disable=too-few-public-methods
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


def cpu_pipeline(
    target: tvm.target.Target, rules: list[Rule] | None = None
) -> tvm.transform.Pass:
    """cpu_generic's default pipeline plus :class:`ScheduleForCPU` after fusion.

    ``rules`` overrides :data:`DEFAULT_RULES` (for experiments; ``[]`` gives
    the unscheduled default pipeline plus the no-alias fix).
    """

    @tvm.transform.module_pass(opt_level=0, name="HeteroCPUPipeline")
    def _pipeline(mod: tvm.IRModule, _ctx: tvm.transform.PassContext) -> tvm.IRModule:
        with target:
            seq = tvm.transform.Sequential(
                _cpu_generic.library_dispatch_passes(target)
                + _cpu_generic.legalize_passes(target)
                + [ScheduleForCPU(target, rules)]
                + _cpu_generic.dataflow_lower_passes(target)
                + _cpu_generic.finalize_passes(target)
                + [mark_trivial_noalias]
            )
            mod = seq(mod)
        return mod

    return _pipeline
