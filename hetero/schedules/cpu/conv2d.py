"""NCHW conv2d with groups 1 (any kernel, stride, padding, dilation): a register tile of output columns x
output-channel vectors, weights packed to output-channel slabs once, when the engine loads, the
elementwise epilogue (bias, residual, relu) applied per tile while it is hot."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import tvm
from tvm import s_tir, tirx

from ..base.analysis import (
    is_var,
    largest_divisor_at_most,
    loop_extent,
    read_index,
    reads_buffer,
    static_numel,
    static_shape,
    uses_var,
)
from ..base.conv import match_conv
from ..base.rule import Rule
from .common import located, num_cores, schedule_block_generic, vector_lanes


def find_conv(sch: s_tir.Schedule, blocks: list):
    """The NCHW conv2d MAC block among ``blocks``: (block, weight load, data load) for a block
    ``out[n, f, y, x] += data[...] * w[f, rc, ry, rx]`` whose data access does not depend on f."""
    for blk in blocks:
        mac = match_conv(sch.get(blk), 1)
        if mac is not None:
            return blk, mac.weight, mac.data
    return None


def pick_tile_x(w_ext: int, max_acc: int = 16) -> int:
    """Output columns of a register tile."""
    if w_ext <= max_acc:
        return w_ext
    best = largest_divisor_at_most(w_ext, max_acc)
    if best >= 6:
        return best
    if w_ext <= 28:
        return w_ext
    return 8


def vectorize_tile_tail(sch: s_tir.Schedule, block, lanes: int) -> None:
    """Vectorise ``block``'s innermost loop where it fits one vector."""
    loops = sch.get_loops(block)
    if not loops:
        return
    inner = loops[-1]
    ext = loop_extent(sch, inner)
    if ext is not None and 1 < ext <= lanes:
        sch.vectorize(inner)


@dataclass(frozen=True)
class ConvTile:
    """A register tile: ``channels`` output channels (the packed weights' slab) by some output
    columns.  By channels, ``tile_x`` columns x ``nvec`` vectors of ``vec`` channels; by columns,
    one vector of ``vec`` columns x ``channels`` channels."""

    vec: int
    channels: int
    by_columns: bool
    nvec: int = 1
    tile_x: int = 1


@dataclass(frozen=True)
class Conv2D(Rule):
    """NCHW conv2d with output channels vectorised.

    * weights packed to ``[K/B, C, kh, kw, B]`` (B = vec * nvec output channels),
      once (see ``pack_at``; weights computed inside the function are packed
      slab by slab inside the parallel task that uses it);
    * accumulators: ``tile_x`` output columns x ``nvec`` vectors kept in
      registers (local buffer with the channel block innermost, unrolled); for
      1x1 stride-1 convs over few input channels, one vector of output columns x
      up to ``max_acc`` output channels instead (:meth:`columns_tile`);
    * parallel over (K/B, chunks of output rows) with the batch loop inside
      the task when the weights outweigh one image's input, else over
      (n, K/B, row chunks) (see ``batch_in_task``);
    * the elementwise epilogue (bias, residual add, relu) is applied per
      register tile while it is hot.
    """

    # "once": pack the weights in a block of their own, which cpu_pipeline moves out of the
    # kernel (SplitLayoutRewritePreproc) and out of main (LiftTransformParams): packed when the
    # engine loads, not on every call (benchmarks/HISTORY.md: resnet-50, 1 thread, batch 1, 10.9 -> 12.4
    # img/s); "task": pack each output-channel slab inside its parallel task; "root": all
    # before the kernel's loops
    pack_at: Literal["once", "task", "root"] = "once"
    pack_order: str = "cin_outer"  # "cin_outer": (c, r, s, f) with f vectorised; anything else: (f, c, r, s)
    max_acc: int = 16  # register accumulators (vectors) per tile
    # True: parallel over (K/B, row chunks) with the batch loop inside each task
    # (weights reused across the batch); False: parallel over (n, K/B, row
    # chunks) (activations of one image reused across output-channel slabs);
    # "auto": True when the weights are larger than one image's input.
    batch_in_task: bool | Literal["auto"] = "auto"
    # output-channel slabs looped inside each (image, row chunk) task, so an
    # input tile is reused from L1 by every slab; "auto": when the batch is
    # not inside the task and the weights are at most fo_inner_max_bytes.
    # Off by default: +13% on a 1x1 256->64 56x56 layer at batch 8 but
    # neutral to -2% on whole resnet-50 / mobilenet (1 thread).
    fo_inner: bool | Literal["auto"] = False
    fo_inner_max_bytes: int = 256 * 1024
    max_unroll_window: int = 9  # unroll kh x kw up to this many taps
    # 1x1 stride-1 convs over at most this many input channels vectorise output columns instead
    # of output channels (see columns_tile); 0: never.  One thread, this 2-core machine: 32->64
    # at 112x112 53 -> 84 GFLOP/s at batch 1, mobilenet +2%; 64->128 at 56x56 6-8% slower
    columns_max_cin: int = 32

    name = "conv2d"

    # -- the tile ---------------------------------------------------------------------------------

    def columns_tile(self, stmt, weight, data, k_ext: int, w_ext: int, lanes: int) -> tuple[int, int] | None:
        """(vec, channels) for a conv that reads its input row by row, unstrided (1x1, stride 1), over
        few input channels: ``vec`` output columns vectorised times ``channels`` output channels in
        registers.  With few input channels the usual channel-vectorised tile spends its time in the
        epilogue, which transposes every register tile into the NCHW output (mobilenet's 32->64 at
        112x112: 16 GMAC/s, where 512->512 convs run at 49)."""
        cin = static_shape(weight.source)[1]
        x_var = stmt.iter_vars[3].var
        if cin is None or cin > self.columns_max_cin or not is_var(data.indices[-1], x_var):
            return None
        if any(uses_var(i, x_var) for i in data.indices[:-1]):
            return None
        vec = next((v for v in (lanes, lanes // 2) if v >= 4 and w_ext % v == 0), None)
        channels = largest_divisor_at_most(k_ext, self.max_acc)
        return None if vec is None or channels < 4 else (vec, channels)

    def channels_tile(self, k_ext: int, w_ext: int, lanes: int) -> tuple[int, int, int] | None:
        """(vec, nvec, tile_x): output channels in blocks of vec*nvec, tile_x columns."""
        vec = next((v for v in (lanes, lanes // 2, lanes // 4) if v >= 4 and k_ext % v == 0), None)
        if vec is None:
            return None
        tile_x = pick_tile_x(w_ext, self.max_acc)
        nvec = 1
        if tile_x * 2 <= self.max_acc and k_ext % (2 * vec) == 0:
            nvec = 2
        return vec, nvec, tile_x

    def tile(self, stmt, weight, data, k_ext: int, w_ext: int, lanes: int) -> ConvTile | None:
        """The conv's register tile: by columns where :meth:`columns_tile` allows, else by channels."""
        columns = self.columns_tile(stmt, weight, data, k_ext, w_ext, lanes)
        if columns is not None:
            vec, channels = columns
            return ConvTile(vec, channels, by_columns=True)
        tile = self.channels_tile(k_ext, w_ext, lanes)
        if tile is None:
            return None
        vec, nvec, tile_x = tile
        return ConvTile(vec, vec * nvec, by_columns=False, nvec=nvec, tile_x=tile_x)

    # -- where the loops go -----------------------------------------------------------------------

    def task_order(self, weight, data) -> tuple[bool, bool]:
        """(batch_in_task, fo_inner), "auto" decided from the sizes of the weights and of one image."""
        w_elems = static_numel(weight.source.shape)
        d_elems = static_numel(data.source.shape[1:])
        batch_in_task = self.batch_in_task
        if batch_in_task == "auto":
            batch_in_task = w_elems is not None and d_elems is not None and w_elems > d_elems
        fo_inner = self.fo_inner
        if fo_inner == "auto":
            fo_inner = (not batch_in_task) and w_elems is not None and w_elems * 4 <= self.fo_inner_max_bytes
        return batch_in_task, fo_inner

    def _tile_loops(self, sch: s_tir.Schedule, conv, tile: ConvTile, k_ext: int, h_ext: int, weight, data,
                    target: tvm.target.Target) -> tuple[object, object, list, list]:
        """Split the conv's loops into parallel tasks, tiles and the register tile: the task loop, the
        loop over tiles in a task, the register tile's loops and the reduction loops."""
        loops = sch.get_loops(conv)
        nn, ff, yy, xx = loops[:4]
        r_loops = loops[4:]
        if tile.by_columns:  # register tile: channels x one vector of vec columns
            fo, fi = sch.split(ff, factors=[None, tile.channels])
            xo, xv = sch.split(xx, factors=[None, tile.vec])
            register_tile = [fi, xv]
        else:  # register tile: tile_x columns x nvec vectors of vec channels
            fo, fv, fl = sch.split(ff, factors=[None, tile.nvec, tile.vec])
            xo, xi = sch.split(xx, factors=[None, tile.tile_x])
            register_tile = [xi, fv, fl]
        batch_in_task, fo_inner = self.task_order(weight, data)
        # parallel tasks: output-channel slabs x chunks of output rows (x images)
        want = 4 * num_cores(target)
        slabs = 1 if fo_inner else k_ext // tile.channels
        chunks = 1
        if slabs < want:
            chunks = next((d for d in range(1, h_ext + 1) if h_ext % d == 0 and slabs * d >= want), h_ext)
        yc, yi = sch.split(yy, factors=[chunks, None])
        tile_loop = xo
        if fo_inner:
            # all output-channel slabs inside the task: one input tile (all c,
            # tile_x columns) is reused from L1 by every slab
            sch.reorder(nn, yc, yi, xo, fo, *r_loops, *register_tile)
            task = sch.fuse(nn, yc)
            tile_loop = fo
        elif batch_in_task:
            sch.reorder(fo, yc, nn, yi, xo, *r_loops, *register_tile)
            task = sch.fuse(fo, yc)
        else:
            sch.reorder(nn, fo, yc, yi, xo, *r_loops, *register_tile)
            task = sch.fuse(nn, fo, yc)
        sch.parallel(task)
        return task, tile_loop, register_tile, r_loops

    def _unroll(self, sch: s_tir.Schedule, conv, register_tile: list, r_loops: list) -> None:
        """The register tile unrolled but for its vectorised innermost loop, the kernel window (not
        the channel loop) unrolled when it is small, the accumulators initialised outside the
        reduction."""
        for loop in register_tile[:-1]:
            sch.unroll(loop)
        sch.vectorize(register_tile[-1])
        window = math.prod((loop_extent(sch, r) or 1 << 20) for r in r_loops[1:])
        for r in r_loops[1:]:
            if window <= self.max_unroll_window:
                sch.unroll(r)
        if r_loops:
            init = sch.decompose_reduction(conv, r_loops[0])
            iloops = sch.get_loops(init)
            sch.vectorize(iloops[-1])
            for lp in iloops[-len(register_tile):-1]:
                sch.unroll(lp)

    def _schedule_packing(self, sch: s_tir.Schedule, wpack, weight, task, vec: int) -> None:
        """Where and in which order the weights are packed (see ``pack_at`` and ``pack_order``)."""
        pack_at = self.pack_at
        if pack_at == "once" and not any(weight.source.same_as(p) for p in sch.mod["main"].params):
            pack_at = "task"  # the weights are computed in this function: nothing to prepack
        if pack_at == "once":
            sch.annotate(wpack, "meta_schedule.layout_rewrite_preproc", True)
            ploops = sch.get_loops(wpack)
        elif pack_at == "task":
            sch.compute_at(wpack, task, preserve_unit_loops=True)
            ploops = sch.get_loops(wpack)[1:]
        else:
            ploops = sch.get_loops(wpack)
            sch.parallel(ploops[0])
            ploops = ploops[1:]
        if self.pack_order == "cin_outer" and len(ploops) == 4:
            pf, pc, pr, ps = ploops
            pfo, pfi = sch.split(pf, factors=[None, vec])
            sch.reorder(pfo, pc, pr, ps, pfi)
            sch.vectorize(pfi)

    # -- the rule ---------------------------------------------------------------------------------

    def schedule(self, func: tirx.PrimFunc, target: tvm.target.Target) -> s_tir.Schedule | None:
        prepared = located(func, find_conv)
        if prepared is None:
            return None
        sch, blocks, (conv, weight, data) = prepared
        stmt = sch.get(conv)
        out_buf = stmt.writes[0].source
        lanes = vector_lanes(target, int(out_buf.dtype.bits))
        _, k_ext, h_ext, w_ext = static_shape(out_buf)
        if k_ext is None or w_ext is None or h_ext is None:
            return None
        tile = self.tile(stmt, weight, data, k_ext, w_ext, lanes)
        if tile is None:
            return None
        others = [b for b in blocks if not b.same_as(conv)]
        consumers = [b for b in others if reads_buffer(sch.get(b), out_buf)]
        producers = [b for b in others if b not in consumers]
        if len(consumers) > 1:
            return None

        # weight packing: w[f, c, r, s] -> wp[f // B, c, r, s, f % B]
        blk_f = tile.channels
        w_idx = read_index(stmt, weight.source)
        wpack = sch.cache_read(conv, w_idx, "global")
        sch.transform_layout(conv, ("read", w_idx), lambda f, c, r, s: (f // blk_f, c, r, s, f % blk_f))
        # the accumulators in a local buffer, the vectorised axis innermost
        acc = sch.cache_write(conv, 0, "local")
        if not tile.by_columns:
            sch.transform_layout(conv, ("write", 0), lambda nn, f, y, x: (nn, f // blk_f, y, x, f % blk_f))

        task, tile_loop, register_tile, r_loops = self._tile_loops(sch, conv, tile, k_ext, h_ext, weight, data,
                                                                   target)
        # write back (+ the fused epilogue) per register tile
        if consumers:
            sch.compute_inline(acc)
            sch.reverse_compute_at(consumers[0], tile_loop, preserve_unit_loops=True)
            vectorize_tile_tail(sch, consumers[0], lanes)
        else:
            sch.reverse_compute_at(acc, tile_loop, preserve_unit_loops=True)
            vectorize_tile_tail(sch, acc, lanes)
        self._unroll(sch, conv, register_tile, r_loops)
        self._schedule_packing(sch, wpack, weight, task, tile.vec)
        for blk in producers:
            schedule_block_generic(sch, blk, lanes)
        return sch
