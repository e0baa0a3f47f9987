"""The loss's Triton kernel: one program per sample row, all H heads as one [H_PAD, BLOCK_C] tile, so the
consensus is formed in registers. Pass 1 accumulates online maxima and sums over column blocks; pass 2 writes
the gradient. When the row fits one block it is loaded once and its exponentials reused. The math is in the
package's docstring (collab_fast.kernels.collab_loss); launch.py picks the blocks and launches it."""

from __future__ import annotations

try:  # Triton is a dependency, but keep impl="torch" usable where it cannot be imported.
    import triton
    import triton.language as tl

    TRITON_IMPORT_ERROR: Exception | None = None
except Exception as exc:  # pragma: no cover - exercised only on machines without triton
    triton = None
    tl = None
    TRITON_IMPORT_ERROR = exc

__all__ = ["TRITON_IMPORT_ERROR", "collab_loss_kernel"]

collab_loss_kernel = None  # (no Triton)

if triton is not None:

    @triton.jit
    def _load_block(z_row, stride_zc, cols, col_mask, head_mask):
        # [H_PAD, BLOCK_C] fp32 tile; columns >= C read as -inf (absent), padded heads as 0.
        ptrs = z_row + cols[None, :].to(tl.int64) * stride_zc
        z = tl.load(ptrs, mask=head_mask[:, None] & col_mask[None, :], other=0.0).to(tl.float32)
        return tl.where(col_mask[None, :], z, float("-inf"))

    @triton.jit
    def _load_cols(z_row, stride_zc, cols, C, head_mask, SAFE: tl.constexpr):
        # SAFE: as _load_block (the columns past C read as -inf); else a full block: no column mask at all
        if SAFE:
            return _load_block(z_row, stride_zc, cols, cols < C, head_mask)
        else:
            return tl.load(z_row + cols[None, :].to(tl.int64) * stride_zc, mask=head_mask[:, None],
                           other=0.0).to(tl.float32)

    @triton.jit
    def _exp2(x, FAST: tl.constexpr):
        # 2^x. FAST (NVIDIA): one MUFU.EX2 with flush to zero; tl.exp/tl.exp2 wrap each in a denormal fix-up
        # (a compare and two predicated multiplies). A result below 2^-126 becomes 0, which no softmax sum
        # (at least 1) or gradient can tell apart. Elsewhere (interpreter, other backends): tl.exp2.
        if FAST:
            return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                             is_pure=True, pack=1)
        else:
            return tl.exp2(x)

    @triton.jit
    def _swap_heads(x):
        # x [2, BLOCK_C] -> the other head's row. Both heads of a column live in one thread (the tiles'
        # layouts put warps along the columns), so the selects fold away: no instruction.
        h = tl.arange(0, 2)[:, None]
        x0 = tl.sum(tl.where(h == 0, x, -0.0), axis=0)  # x + (-0.0) == x exactly, -inf and NaN included
        x1 = tl.sum(tl.where(h == 1, x, -0.0), axis=0)
        return tl.where(h == 0, x1[None, :], x0[None, :])

    @triton.jit
    def _swap_heads3(x):
        # x [2, G, VEC] -> the other head's (as _swap_heads)
        h = tl.arange(0, 2)[:, None, None]
        x0 = tl.sum(tl.where(h == 0, x, -0.0), axis=0)
        x1 = tl.sum(tl.where(h == 1, x, -0.0), axis=0)
        return tl.where(h == 0, x1[None, :, :], x0[None, :, :])

    @triton.jit
    def _swap_head_stats(x):
        # x [2] -> the other head's value
        h = tl.arange(0, 2)
        x0 = tl.sum(tl.where(h == 0, x, -0.0), axis=0)
        x1 = tl.sum(tl.where(h == 1, x, -0.0), axis=0)
        return tl.where(h == 0, x1, x0)

    @triton.jit
    def _consensus_log2(z, total, head_mask, ck, H: tl.constexpr, SAFE: tl.constexpr):
        # u_h log2(e) = (sum of the other heads' z) log2(e) / (T (H - 1)); ck = log2(e) / (T (H - 1)).
        # Not SAFE: the caller found no -inf in the block, and total [BLOCK_C] is the plain sum over heads
        # (padded heads load as 0): one FFMA per element. SAFE: sums of the finite logits only, and -inf
        # where another head masks the class.
        if H == 2:  # the other head's z, -inf included: exact, no arithmetic
            u2 = _swap_heads(z) * ck
        elif SAFE:
            finite = (z > float("-inf")) & head_mask[:, None]
            absent = (z == float("-inf")) & head_mask[:, None]
            zf = tl.where(finite, z, 0.0)
            n_absent = tl.sum(absent.to(tl.int32), axis=0)
            u2 = tl.sum(zf, axis=0)[None, :] * ck - zf * ck
            u2 = tl.where((n_absent[None, :] - absent.to(tl.int32)) > 0, float("-inf"), u2)
        else:
            u2 = total[None, :] * ck - z * ck
        return u2

    @triton.jit
    def _pass1_block(z, head_mask, k, inv_t, m1, s1, s_t, m_c, s_c, t_c, v_c, H: tl.constexpr,
                     T_IS_TWO: tl.constexpr, KL: tl.constexpr, FAST: tl.constexpr):
        # Online update of the row statistics with one [H_PAD, BLOCK_C] block that may hold -inf (absent
        # classes, columns past C), the SAFE way (k = log2(e) / T; m_c, the consensus maximum, in log2 units).
        # Also returns the block's exponentials (relative to the updated maxima) for reuse when the row is one
        # block. Full blocks of finite logits take _pass1_blocks_per_thread instead.
        m_new = tl.maximum(m1, tl.max(z, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # all absent so far: avoid inf - inf
        mk = m_safe * k
        e_t = _exp2(z * k - mk[:, None], FAST)  # exp((z - m) / T): the scale folded into one FFMA
        if T_IS_TWO:
            e_1 = e_t * e_t  # exp(z - m) from exp((z - m) / 2): one exponential fewer per element
        else:
            e_1 = _exp2(z * 1.4426950408889634 - (m_safe * 1.4426950408889634)[:, None], FAST)
        s1 = s1 * _exp2((m1 - m_safe) * 1.4426950408889634, FAST) + tl.sum(e_1, axis=1)
        s_t = s_t * _exp2(m1 * k - mk, FAST) + tl.sum(e_t, axis=1)
        e_u = e_t  # unused when H == 1
        if H == 2:
            # Head h's consensus is head 1-h's z / T: its maximum, exponentials and sum are the other head's
            # (m_c in log2 units, the offsets bit for bit those of e_t): no second exponential.
            mc_new = _swap_head_stats(m_new) * k
            mc_safe = _swap_head_stats(mk)
            e_u = _swap_heads(e_t)
            u2 = e_u  # (KL) computed below
            if KL:
                u2 = _swap_heads(z) * k
            carry = _exp2(m_c - mc_safe, FAST)
        elif H > 1:
            u2 = _consensus_log2(z, z, head_mask, k / (H - 1), H, True)
            mc_new = tl.maximum(m_c, tl.max(u2, axis=1))
            mc_safe = tl.where(mc_new == float("-inf"), 0.0, mc_new)
            e_u = _exp2(u2 - mc_safe[:, None], FAST)
            carry = _exp2(m_c - mc_safe, FAST)
        if H > 1:
            ez = tl.where(e_u > 0, e_u * z, 0.0)  # 0 * (-inf) at absent classes: their terms are 0
            if H == 2:
                s_c = _swap_head_stats(s_t)
            else:
                s_c = s_c * carry + tl.sum(e_u, axis=1)
            t_c = t_c * carry + tl.sum(ez, axis=1) * inv_t
            if KL:
                eu = tl.where(e_u > 0, e_u * u2, 0.0)
                v_c = v_c * carry + tl.sum(eu, axis=1) * 0.6931471805599453
            m_c = mc_new
        return m_new, s1, s_t, m_c, s_c, t_c, v_c, e_1, e_t, e_u

    @triton.jit
    def _grad_block(z, p_1, p_t, q, u, cols0, y_rel, t, t_sum, r, rh1, rh, rs, qa, qu, n_fin, inv_t, soft_coef,
                    eps, H: tl.constexpr, DETACH: tl.constexpr, SMOOTH: tl.constexpr, KL: tl.constexpr,
                    PROBS: tl.constexpr):
        # dL/dz for one block, every head, with the upstream weights r [H_PAD] folded into the row factors:
        # rh1 on p_1 (softmax(z) up to a row factor), rh = r * hard factor, rs = r * soft factor / T. PROBS:
        # t [BLOCK_C] is the block of the target distribution (summing to t_sum over the row), else the
        # label is column y_rel of the block (int32: one compare a column).
        if PROBS:
            grad = (p_1 * rh1[:, None]) * ((1.0 - eps) * t_sum + eps) - (rh * (1.0 - eps))[:, None] * t[None, :]
        else:
            grad = p_1 * rh1[:, None] - tl.where(cols0[None, :] == y_rel, (rh * (1.0 - eps))[:, None], 0.0)
        if SMOOTH:
            grad -= tl.where(z > float("-inf"), (rh * eps / n_fin)[:, None], 0.0)
        if H > 1:
            grad += rs[:, None] * (p_t - q)
            if not DETACH:
                if KL:  # b = a - u: the consensus entropy's gradient
                    g_q = tl.where(q > 0, q * ((z * inv_t - u) - (qa - qu)[:, None]), 0.0) * (-inv_t / (H - 1))
                else:  # b = a
                    g_q = tl.where(q > 0, q * (z * inv_t - qa[:, None]), 0.0) * (-inv_t / (H - 1))
                g_q = r[:, None] * g_q  # padded heads have r = 0
                grad += soft_coef * (tl.sum(g_q, axis=0)[None, :] - g_q)
        return grad

    @triton.jit
    def _target_block(tb, z, col0, zt, t_sum, t_max, t_arg, STATS: tl.constexpr):
        # A target distribution's block tb [BLOCK_C] (first column col0) into the row's <t, z> per head, its
        # sum and (STATS) its top class: the first column of the largest value wins.
        zt += tl.sum(tl.where(tb[None, :] != 0.0, tb[None, :] * z, 0.0), axis=1)
        t_sum += tl.sum(tb, axis=0)
        if STATS:
            blk_t = tl.max(tb, axis=0)
            t_arg = tl.where(blk_t > t_max, tl.argmax(tb, axis=0).to(tl.int64) + col0, t_arg)
            t_max = tl.maximum(t_max, blk_t)
        return zt, t_sum, t_max, t_arg

    @triton.jit
    def _pass1_blocks_per_thread(z_row, stride_zc, t_row, stride_yc, head_mask, cols0, start: tl.constexpr,
                                 stop: tl.constexpr, k, inv_t,
                                 m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                                 BLOCK_C: tl.constexpr, H: tl.constexpr, H_PAD: tl.constexpr, VEC: tl.constexpr,
                                 T_IS_TWO: tl.constexpr, KL: tl.constexpr, STATS: tl.constexpr,
                                 SMOOTH: tl.constexpr, PROBS: tl.constexpr, NUM_STAGES: tl.constexpr,
                                 FAST: tl.constexpr):
        # Pass 1 over full blocks [start, stop), taken as finite: no column mask, no absent-class arithmetic
        # (a -inf makes the consensus sums NaN or -inf, and the caller runs the row again SAFE, _pass1_blocks),
        # from the row's initial statistics, with online statistics per thread: each group of columns one
        # thread holds keeps its own maxima and sums [H_PAD, G], so a block costs no reduction across
        # threads (no shuffles, shared memory or barriers); the groups are merged into the row's [H_PAD] once,
        # after the loop (the statistics' argmax too: a first column per group). Only a probability target
        # reduces per block.
        # A group: VEC > 1, the VEC adjacent columns of a 16-byte load; VEC = 1 (rows not 16-byte aligned,
        # e.g. C = 50257), the columns LANES apart that one thread loads one at a time (a looped row runs 4
        # warps: 128 lanes). The grouping only decides how the sums are split, never their value.
        LANES: tl.constexpr = 128 if BLOCK_C >= 128 else BLOCK_C
        if VEC > 1:
            G: tl.constexpr = BLOCK_C // VEC
            STEP: tl.constexpr = 1  # from one column of a group to the next
            group_col = (tl.arange(0, G) * VEC)[None, :]  # [1, G]: the group's first column in a block
        else:
            G: tl.constexpr = LANES
            STEP: tl.constexpr = LANES
            group_col = tl.arange(0, G)[None, :]
        gm1 = tl.full([H_PAD, G], float("-inf"), tl.float32)  # max z of the group
        gs1 = tl.zeros([H_PAD, G], tl.float32)  # sum exp(z - gm1)
        gst = tl.zeros([H_PAD, G], tl.float32)  # sum exp((z - gm1) / T)
        gmc = tl.full([H_PAD, G], float("-inf"), tl.float32)  # H >= 3: max u (log2 units)
        gsc = tl.zeros([H_PAD, G], tl.float32)  # H >= 3: sum 2^(u - gmc)
        gtc = tl.zeros([H_PAD, G], tl.float32)  # sum of the consensus exponentials times z
        gvc = tl.zeros([H_PAD, G], tl.float32)  # KL: sum of the consensus exponentials times u
        gsf = tl.zeros([H_PAD, G], tl.float32)  # SMOOTH: sum z
        garg = tl.zeros([H_PAD, G], tl.int32)  # STATS: the group's first column holding its maximum
        for b in tl.range(start, stop, num_stages=NUM_STAGES):
            cols = b * BLOCK_C + cols0
            z = _load_cols(z_row, stride_zc, cols, 0, head_mask, False)
            if PROBS:
                tb = tl.load(t_row + cols.to(tl.int64) * stride_yc).to(tl.float32)
                zt, t_sum, t_max, t_arg = _target_block(tb, z, b * BLOCK_C, zt, t_sum, t_max, t_arg, STATS)
            if VEC > 1:
                z3 = tl.reshape(z, [H_PAD, G, VEC])  # [H_PAD, G, columns of a group]
            else:
                z3 = tl.permute(tl.reshape(z, [H_PAD, BLOCK_C // LANES, LANES]), (0, 2, 1))
            blk_max = tl.max(z3, axis=2)
            if STATS:  # strict: an earlier block's column wins a tie
                garg = tl.where(blk_max > gm1, b * BLOCK_C + group_col + STEP * tl.argmax(z3, axis=2), garg)
            gm_new = tl.maximum(gm1, blk_max)
            gmk = gm_new * k
            a_t = _exp2(gm1 * k - gmk, FAST)  # rescale of the group's sums to its new maximum
            e_t = _exp2(z3 * k - gmk[:, :, None], FAST)
            if T_IS_TWO:
                gs1 = gs1 * (a_t * a_t) + tl.sum(e_t * e_t, axis=2)
            else:
                gs1 = gs1 * _exp2((gm1 - gm_new) * 1.4426950408889634, FAST) + tl.sum(
                    _exp2(z3 * 1.4426950408889634 - (gm_new * 1.4426950408889634)[:, :, None], FAST), axis=2)
            gst = gst * a_t + tl.sum(e_t, axis=2)
            if H == 2:  # the consensus is the other head's: its exponentials and rescale are swapped e_t, a_t
                e_u = _swap_heads3(e_t)
                a_u = _swap_heads(a_t)
                gtc = gtc * a_u + tl.sum(e_u * z3, axis=2)
                if KL:
                    gvc = gvc * a_u + tl.sum(e_u * _swap_heads3(z3), axis=2)
            elif H > 1:
                ck = k / (H - 1)
                u2 = tl.sum(z3, axis=0)[None, :, :] * ck - z3 * ck
                gmc_new = tl.maximum(gmc, tl.max(u2, axis=2))
                a_u = _exp2(gmc - gmc_new, FAST)
                e_u = _exp2(u2 - gmc_new[:, :, None], FAST)
                gsc = gsc * a_u + tl.sum(e_u, axis=2)
                gtc = gtc * a_u + tl.sum(e_u * z3, axis=2)
                if KL:
                    gvc = gvc * a_u + tl.sum(e_u * u2, axis=2)
                gmc = gmc_new
            if SMOOTH:
                gsf += tl.sum(z3, axis=2)
            gm1 = gm_new
        # merge the groups: each group's sums rescaled to the row's maxima
        m_row = tl.max(gm1, axis=1)
        if STATS:  # the first column holding the row's maximum
            arg = tl.min(tl.where(gm1 == m_row[:, None], garg, 2147483647), axis=1).to(tl.int64)
        w_t = _exp2(gm1 * k - (m_row * k)[:, None], FAST)
        s_t = tl.sum(gst * w_t, axis=1)
        if T_IS_TWO:
            s1 = tl.sum(gs1 * (w_t * w_t), axis=1)
        else:
            s1 = tl.sum(gs1 * _exp2((gm1 - m_row[:, None]) * 1.4426950408889634, FAST), axis=1)
        if H == 2:  # m_c, s_c: the other head's (in log2 units, as _pass1_block keeps them)
            w_u = _swap_heads(w_t)
            m_c = _swap_head_stats(m_row) * k
            s_c = _swap_head_stats(s_t)
            t_c = tl.sum(gtc * w_u, axis=1) * inv_t
            if KL:
                v_c = tl.sum(gvc * w_u, axis=1) * inv_t
        elif H > 1:
            m_c = tl.max(gmc, axis=1)
            w_u = _exp2(gmc - m_c[:, None], FAST)
            s_c = tl.sum(gsc * w_u, axis=1)
            t_c = tl.sum(gtc * w_u, axis=1) * inv_t
            if KL:
                v_c = tl.sum(gvc * w_u, axis=1) * 0.6931471805599453
        if SMOOTH:
            sum_fin = tl.sum(gsf, axis=1)
            n_fin = n_fin + (stop - start) * BLOCK_C
        return m_row, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg

    @triton.jit
    def _pass1_blocks(z_row, stride_zc, t_row, stride_yc, head_mask, cols0, start: tl.constexpr, stop: tl.constexpr,
                      C, k, inv_t,
                      m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                      BLOCK_C: tl.constexpr, H: tl.constexpr, T_IS_TWO: tl.constexpr, KL: tl.constexpr,
                      STATS: tl.constexpr, SMOOTH: tl.constexpr, PROBS: tl.constexpr, NUM_STAGES: tl.constexpr,
                      FAST: tl.constexpr):
        # Pass 1 over the column blocks [start, stop) of a long row, the SAFE way: a block may hold -inf
        # (absent classes, the columns past C). Rows with -inf in a full block and the last, partial block
        # run here, in blocks of SAFE_BLOCK columns.
        for b in tl.range(start, stop, num_stages=NUM_STAGES):
            cols = b * BLOCK_C + cols0
            z = _load_cols(z_row, stride_zc, cols, C, head_mask, True)
            if STATS:
                blk_arg = tl.argmax(z, axis=1).to(tl.int64) + b * BLOCK_C
                arg = tl.where(tl.max(z, axis=1) > m1, blk_arg, arg)  # strict: first index wins
            m1, s1, s_t, m_c, s_c, t_c, v_c, _e1, _et, _eu = _pass1_block(
                z, head_mask, k, inv_t, m1, s1, s_t, m_c, s_c, t_c, v_c, H, T_IS_TWO, KL, FAST)
            if SMOOTH:
                finite = z > float("-inf")
                sum_fin += tl.sum(tl.where(finite, z, 0.0), axis=1)
                n_fin += tl.sum(finite.to(tl.float32), axis=1)
            if PROBS:
                tb = tl.load(t_row + cols.to(tl.int64) * stride_yc, mask=cols < C, other=0.0).to(tl.float32)
                zt, t_sum, t_max, t_arg = _target_block(tb, z, b * BLOCK_C, zt, t_sum, t_max, t_arg, STATS)
        return m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg

    @triton.jit
    def _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, cols0, start: tl.constexpr,
                     stop: tl.constexpr, C, k,
                     lt, l1, lq, y_safe, t_sum, r, rh1, rh, rs, qa, qu, n_fin, inv_t, soft_coef, eps,
                     BLOCK_C: tl.constexpr, H: tl.constexpr, T_IS_TWO: tl.constexpr, DETACH: tl.constexpr,
                     SMOOTH: tl.constexpr, KL: tl.constexpr, PROBS: tl.constexpr, NUM_STAGES: tl.constexpr,
                     FAST: tl.constexpr, SAFE: tl.constexpr):
        # Pass 2 over the column blocks [start, stop) of a long row: normalised exponentials straight from
        # exp2, the row's log-sums (log2 units: lt, l1, lq) folded into the offsets. SAFE as in _pass1_blocks
        # (the row's pass 1 says which).
        for b in tl.range(start, stop, num_stages=NUM_STAGES):
            cols = b * BLOCK_C + cols0
            z = _load_cols(z_row, stride_zc, cols, C, head_mask, SAFE)
            p_t = _exp2(z * k - lt[:, None], FAST)
            if T_IS_TWO:
                p_1 = p_t * p_t  # softmax(z) up to the row factor in rh1
            else:
                p_1 = _exp2(z * 1.4426950408889634 - l1[:, None], FAST)
            q = p_t  # unused when H == 1
            u = p_t
            if H == 2:
                q = _swap_heads(p_t)  # lq is the other head's lt (see _pass1_block)
                if KL and not DETACH:
                    u = _swap_heads(z) * inv_t
            elif H > 1:
                u2 = _consensus_log2(z, tl.sum(z, axis=0), head_mask, k / (H - 1), H, SAFE)
                q = _exp2(u2 - lq[:, None], FAST)
                if KL and not DETACH:
                    u = u2 * 0.6931471805599453
            tb = tl.zeros([BLOCK_C], tl.float32)
            if PROBS:
                if SAFE:
                    tb = tl.load(t_row + cols.to(tl.int64) * stride_yc, mask=cols < C, other=0.0).to(tl.float32)
                else:
                    tb = tl.load(t_row + cols.to(tl.int64) * stride_yc).to(tl.float32)
            y_rel = (y_safe - b * BLOCK_C).to(tl.int32)
            grad = _grad_block(z, p_1, p_t, q, u, cols0, y_rel, tb, t_sum[:, None], r, rh1, rh, rs, qa, qu, n_fin,
                               inv_t, soft_coef, eps, H, DETACH, SMOOTH and SAFE, KL, PROBS)
            if SMOOTH and not SAFE:  # every class is present
                grad -= (rh * eps / n_fin)[:, None]
            grad = grad.to(g_row.dtype.element_ty)
            if SAFE:
                tl.store(g_row + cols[None, :].to(tl.int64) * stride_gc, grad,
                         mask=head_mask[:, None] & (cols < C)[None, :])
            else:
                tl.store(g_row + cols[None, :].to(tl.int64) * stride_gc, grad, mask=head_mask[:, None])

    @triton.jit
    def collab_loss_kernel(
        z_ptr, stride_zh_v, stride_zn_v, stride_zc,  # logits [H, N, C], any strides (head/row strides / VEC)
        y_ptr, stride_y, stride_yc,  # target [N] integer labels, or (PROBS) [N, C] probabilities
        g_ptr, stride_gh_v, stride_gn_v, stride_gc,  # gradient out [H, N, C] (may alias the logits)
        loss_ptr,  # REDUCE: fp32 scalar, written by the last program; else fp32 [H, N] per-head per-sample loss
        stats_ptr,  # fp32 [5, H] out: mean hard, mean soft, correct count, [3, 0] = n_valid; [4, 0] n_valid for backward
        ws_ptr,  # fp32 [3H + 3] zeros (_workspace): sums of stats and loss, n_valid, ticket; left zeroed again
        r_ptr, stride_rh, stride_rn,  # upstream weights [H, N] (ROW_WEIGHTS: backward)
        rs_ptr,  # fp32 [K, H, N] row statistics (_row_stats_count): written by forward (ROW_STATS 1), read by backward (2)
        sf_ptr,  # fp32 [] (SOFT_FACTOR): a factor on soft_coef read from memory, so a schedule changes no argument
        N, C_v, ignore_index,  # C / VEC
        inv_t, hard_coef, soft_coef, eps,  # the factors on the hard and the soft objective
        H: tl.constexpr, H_PAD: tl.constexpr, BLOCK_C: tl.constexpr, NUM_BLOCKS: tl.constexpr,
        REDUCE: tl.constexpr, MEAN: tl.constexpr, COMPUTE_LOSS: tl.constexpr,
        COMPUTE_GRAD: tl.constexpr, ROW_WEIGHTS: tl.constexpr, DETACH: tl.constexpr,
        STATS: tl.constexpr, SMOOTH: tl.constexpr, T_IS_TWO: tl.constexpr, KL: tl.constexpr,
        VEC: tl.constexpr,  # elements per 16 bytes when every row starts 16-byte aligned, else 1
        ROW_STATS: tl.constexpr,  # 0: none; 1: store pass 1's statistics; 2: load them instead of pass 1
        NUM_STAGES: tl.constexpr,  # > 1: the column loops prefetch the next blocks (cp.async into shared memory)
        PROBS: tl.constexpr,  # the target is a distribution over classes per sample (mixup, cutmix, smoothing)
        FAST_EXP: tl.constexpr,  # exponentials as one MUFU.EX2 each (NVIDIA; see _exp2)
        TAIL: tl.constexpr,  # SAFE blocks covering the last, partial block (0: C is a multiple of BLOCK_C)
        SAFE_BLOCK: tl.constexpr,  # columns per block in the SAFE loops (a divisor of BLOCK_C; see _safe_block)
        SOFT_FACTOR: tl.constexpr,  # soft_coef is multiplied by *sf_ptr (a per-step ramp under CUDA graphs, compile)
    ):
        # The row strides and C arrive divided by VEC: multiplied back here, Triton knows that they are
        # multiples of VEC, so every row starts on a 16-byte boundary and masks are constant per VEC
        # columns: vector loads and stores (C = 1000 included) where the launcher found them legal.
        # tl.cast, not .to(): Triton's binder passes an integer argument equal to 1 as a Python constant.
        stride_zh = tl.cast(stride_zh_v, tl.int64) * VEC
        stride_zn = tl.cast(stride_zn_v, tl.int64) * VEC
        stride_gh = tl.cast(stride_gh_v, tl.int64) * VEC
        stride_gn = tl.cast(stride_gn_v, tl.int64) * VEC
        C = C_v * VEC
        if SOFT_FACTOR:
            soft_coef = soft_coef * tl.load(sf_ptr)
        n = tl.program_id(0).to(tl.int64)
        t_row = y_ptr + n * stride_y  # PROBS: the row's target distribution
        if PROBS:
            ok = n >= 0  # every sample counts
            bad = n < 0
            y_safe = n * 0
        else:
            y = tl.load(y_ptr + n * stride_y).to(tl.int64)
            valid = y != ignore_index
            in_range = (y >= 0) & (y < C)
            ok = valid & in_range
            bad = valid & (~in_range)  # out-of-range label: loss becomes NaN (device-side check, no sync)
            y_safe = tl.where(in_range, y, 0)

        heads = tl.arange(0, H_PAD)
        head_mask = heads < H
        z_row = z_ptr + n * stride_zn + heads[:, None].to(tl.int64) * stride_zh  # [H_PAD, 1]
        if PROBS:
            z_y = tl.zeros([H_PAD], tl.float32)  # unused
        else:
            z_y = tl.load(z_ptr + n * stride_zn + heads.to(tl.int64) * stride_zh + y_safe * stride_zc,
                          mask=head_mask, other=0.0).to(tl.float32)
        cols0 = tl.arange(0, BLOCK_C)
        k = inv_t * 1.4426950408889634  # log2(e) / T: exponentials as exp2 with the scale folded in
        SPLIT: tl.constexpr = BLOCK_C // SAFE_BLOCK  # SAFE blocks a block
        n_full: tl.constexpr = NUM_BLOCKS - (TAIL + SPLIT - 1) // SPLIT  # blocks of BLOCK_C columns, all before C
        safe_cols0 = tl.arange(0, SAFE_BLOCK)

        # ---- pass 1: row statistics per head ([H_PAD] vectors), online over column blocks ----
        # (backward of a long row loads them from forward instead: the row is read once per phase)
        m1 = tl.full([H_PAD], float("-inf"), tl.float32)  # max z
        s1 = tl.zeros([H_PAD], tl.float32)  # sum exp(z - m1)
        s_t = tl.zeros([H_PAD], tl.float32)  # sum exp((z - m1) / T)
        m_c = tl.full([H_PAD], float("-inf"), tl.float32)  # max u
        s_c = tl.zeros([H_PAD], tl.float32)  # sum exp(u - m_c)
        t_c = tl.zeros([H_PAD], tl.float32)  # sum exp(u - m_c) * a, so <q, a> = t_c / s_c
        v_c = tl.zeros([H_PAD], tl.float32)  # sum exp(u - m_c) * u, so <q, u> = v_c / s_c (KL)
        sum_fin = tl.zeros([H_PAD], tl.float32)  # sum of finite z (label smoothing)
        n_fin = tl.zeros([H_PAD], tl.float32)  # number of finite classes
        arg = tl.zeros([H_PAD], tl.int64)  # first argmax (stats)
        zt = tl.zeros([H_PAD], tl.float32)  # PROBS: <t, z_h> over the classes where t > 0
        if PROBS:
            t_sum = tl.zeros([H_PAD], tl.float32)  # sum of t (over the row; per head, all equal)
        else:
            t_sum = tl.zeros([H_PAD], tl.float32) + 1.0  # a label's distribution sums to 1
        t_max = (n * 0).to(tl.float32) - float("inf")  # PROBS: the target's top class (stats): value, first index
        t_arg = n * 0
        t = tl.zeros([BLOCK_C], tl.float32)  # PROBS: the target block of a one-block row, kept for pass 2
        safe_row = tl.zeros([H_PAD], tl.float32)  # > 0: the row holds -inf (absent classes); pass 2 is SAFE
        rs_row = rs_ptr + heads.to(tl.int64) * N + n  # [H_PAD]: statistic k of (head, row) at k * H * N
        if ROW_STATS == 2:
            # padded heads get finite values: their gradient is weighted by r = 0 and must not be NaN
            m1 = tl.load(rs_row, mask=head_mask, other=0.0)
            s1 = tl.load(rs_row + H * N, mask=head_mask, other=1.0)
            s_t = tl.load(rs_row + 2 * H * N, mask=head_mask, other=1.0)
            m_c = tl.load(rs_row + 3 * H * N, mask=head_mask, other=0.0)
            s_c = tl.load(rs_row + 4 * H * N, mask=head_mask, other=1.0)
            t_c = tl.load(rs_row + 5 * H * N, mask=head_mask, other=0.0)
            v_c = tl.load(rs_row + 6 * H * N, mask=head_mask, other=0.0)
            n_fin = tl.load(rs_row + 7 * H * N, mask=head_mask, other=1.0)
            safe_row = tl.load(rs_row + 8 * H * N, mask=head_mask, other=0.0)
            if PROBS:
                t_sum = tl.load(rs_row + 9 * H * N, mask=head_mask, other=1.0)
        elif NUM_BLOCKS == 1:
            # The whole row is one tile: read it once, keep its exponentials for pass 2.
            col_mask = cols0 < C
            z = _load_block(z_row, stride_zc, cols0, col_mask, head_mask)
            if STATS:
                arg = tl.argmax(z, axis=1).to(tl.int64)
            m1, s1, s_t, m_c, s_c, t_c, v_c, e_1, e_t, e_u = _pass1_block(
                z, head_mask, k, inv_t, m1, s1, s_t, m_c, s_c, t_c, v_c, H, T_IS_TWO, KL, FAST_EXP)
            if SMOOTH:
                finite = z > float("-inf")
                sum_fin = tl.sum(tl.where(finite, z, 0.0), axis=1)
                n_fin = tl.sum(finite.to(tl.float32), axis=1)
            if PROBS:
                t = tl.load(t_row + cols0.to(tl.int64) * stride_yc, mask=col_mask, other=0.0).to(tl.float32)
                zt = tl.sum(tl.where(t[None, :] != 0.0, t[None, :] * z, 0.0), axis=1)
                t_sum = tl.zeros([H_PAD], tl.float32) + tl.sum(t, axis=0)
                if STATS:
                    t_arg = tl.argmax(t, axis=0).to(tl.int64)
        else:
            # Full blocks first, taken as finite; again SAFE where the consensus sums say they were not (a
            # row with absent classes); then the last, partial block, SAFE.
            a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14 = _pass1_blocks_per_thread(
                z_row, stride_zc, t_row, stride_yc, head_mask, cols0, 0, n_full, k, inv_t,
                m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                BLOCK_C, H, H_PAD, VEC, T_IS_TWO, KL, STATS, SMOOTH, PROBS, NUM_STAGES, FAST_EXP)
            # A -inf (or NaN) logit in a full block makes these NaN or -inf: the row runs again SAFE.
            nonfinite = (a2 != a2) | (a3 != a3)
            if H > 1:
                nonfinite = nonfinite | (a5 != a5) | (a6 != a6) | (a6 == float("-inf")) | (a7 != a7)
            if SMOOTH:
                nonfinite = nonfinite | (a8 != a8) | (a8 == float("-inf"))
            if tl.sum(nonfinite.to(tl.int32), axis=0) > 0:
                safe_row += 1.0
                a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14 = _pass1_blocks(
                    z_row, stride_zc, t_row, stride_yc, head_mask, safe_cols0, 0, n_full * SPLIT, C, k, inv_t,
                    m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg,
                    SAFE_BLOCK, H, T_IS_TWO, KL, STATS, SMOOTH, PROBS, NUM_STAGES, FAST_EXP)
            if TAIL:
                m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin, arg, zt, t_sum, t_max, t_arg = _pass1_blocks(
                    z_row, stride_zc, t_row, stride_yc, head_mask, safe_cols0, n_full * SPLIT,
                    n_full * SPLIT + TAIL, C, k, inv_t, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14,
                    SAFE_BLOCK, H, T_IS_TWO, KL, STATS, SMOOTH, PROBS, NUM_STAGES, FAST_EXP)
            else:
                m1, s1, s_t, m_c, s_c, t_c, v_c, sum_fin, n_fin = a1, a2, a3, a4, a5, a6, a7, a8, a9
                arg, zt, t_sum, t_max, t_arg = a10, a11, a12, a13, a14

        m1_safe = tl.where(m1 == float("-inf"), 0.0, m1)
        lse_1 = m1_safe + tl.log(s1)
        if PROBS:
            hard = t_sum * lse_1 - zt  # -sum_i t_i log p_i
            if SMOOTH:
                hard = (1.0 - eps) * hard + eps * (lse_1 - sum_fin / n_fin)
        elif SMOOTH:
            hard = lse_1 - (1.0 - eps) * z_y - eps * sum_fin / n_fin
        else:
            hard = lse_1 - z_y
        mc_safe = tl.where(m_c == float("-inf"), 0.0, m_c)
        qa = t_c  # <q_h, a_h> below; unused when H == 1
        qu = v_c  # <q_h, u_h> below; used by KL only
        if H > 1:
            qa = t_c / s_c
            soft = m1_safe * inv_t + tl.log(s_t) - qa  # lse(a_h) - <q_h, a_h>
            if KL:
                qu = v_c / s_c
                soft -= mc_safe * 0.6931471805599453 + tl.log(s_c) - qu  # minus the consensus entropy lse(u_h) - <q_h, u_h>
            per = hard_coef * hard + soft_coef * soft
        else:
            soft = tl.zeros([H_PAD], tl.float32)
            per = hard

        # The workspace as int32 words: n_valid and the ticket after the sums of the stats and the loss; the
        # sums are read and zeroed as int32 exchanges (bit patterns; the interpreter exchanges no floats).
        ws_int = ws_ptr.to(tl.pointer_type(tl.int32))
        cnt_ptr = ws_int + 3 * H + 1
        if COMPUTE_LOSS:
            if REDUCE:
                row = tl.sum(tl.where(head_mask, per, 0.0), axis=0)
                tl.atomic_add(ws_ptr + 3 * H, tl.where(ok, row, tl.where(bad, float("nan"), 0.0)))
            else:
                per_out = tl.where(ok, per, tl.where(bad, float("nan"), 0.0))
                tl.store(loss_ptr + heads.to(tl.int64) * N + n, per_out, mask=head_mask)
            if STATS:
                # The mask as one comparison on the [H_PAD] block: an int1 block of the pointer's shape
                # (a scalar & block mixes ranks, which Triton 3.9's interpreter turns into int32).
                smask = tl.where(ok, heads, H_PAD) < H
                tl.atomic_add(ws_ptr + heads, hard, mask=smask)
                tl.atomic_add(ws_ptr + H + heads, soft, mask=smask)
                top = t_arg if PROBS else y_safe
                tl.atomic_add(ws_ptr + 2 * H + heads, (arg == top).to(tl.float32), mask=smask)
            if REDUCE or STATS:
                # The sums are finished by the last program to take a ticket: no count pass, no division
                # kernel. Triton's atomics are acq_rel, so every program's sums are visible to the one that
                # takes the last ticket; it reads them by exchanging them with 0, which leaves the workspace
                # zeroed for the next call (a workspace kept per device and stream: no zero fill per call).
                if (MEAN or STATS) and not PROBS:
                    tl.atomic_add(cnt_ptr, valid.to(tl.int32))
                if tl.atomic_add(cnt_ptr + 1, 1) == N - 1:
                    tl.atomic_xchg(cnt_ptr + 1, 0)
                    count = tl.atomic_xchg(cnt_ptr, 0).to(tl.float32)
                    if PROBS:
                        count = tl.cast(N, tl.float32)  # every sample counts
                    inv_valid = 1.0 / tl.maximum(count, 1.0)
                    if REDUCE:
                        total = tl.atomic_xchg(ws_int + 3 * H, 0).to(tl.float32, bitcast=True)
                        if MEAN:
                            total = total * inv_valid
                        tl.store(loss_ptr, total)
                    if STATS:
                        s_hard = tl.atomic_xchg(ws_int + heads, 0, mask=head_mask).to(tl.float32, bitcast=True)
                        s_soft = tl.atomic_xchg(ws_int + H + heads, 0, mask=head_mask).to(tl.float32, bitcast=True)
                        s_top = tl.atomic_xchg(ws_int + 2 * H + heads, 0, mask=head_mask).to(tl.float32, bitcast=True)
                        tl.store(stats_ptr + heads, s_hard * inv_valid, mask=head_mask)
                        tl.store(stats_ptr + H + heads, s_soft * inv_valid, mask=head_mask)
                        tl.store(stats_ptr + 2 * H + heads, s_top, mask=head_mask)
                        tl.store(stats_ptr + 3 * H + heads, tl.where(heads == 0, count, 0.0), mask=head_mask)
                    # n_valid for backward: a row the caller does not get (the stats are theirs to modify)
                    tl.store(stats_ptr + 4 * H, count)

        if ROW_STATS == 1:
            tl.store(rs_row, m1, mask=head_mask)
            tl.store(rs_row + H * N, s1, mask=head_mask)
            tl.store(rs_row + 2 * H * N, s_t, mask=head_mask)
            tl.store(rs_row + 3 * H * N, m_c, mask=head_mask)
            tl.store(rs_row + 4 * H * N, s_c, mask=head_mask)
            tl.store(rs_row + 5 * H * N, t_c, mask=head_mask)
            tl.store(rs_row + 6 * H * N, v_c, mask=head_mask)
            tl.store(rs_row + 7 * H * N, n_fin, mask=head_mask)
            tl.store(rs_row + 8 * H * N, safe_row, mask=head_mask)
            if PROBS:
                tl.store(rs_row + 9 * H * N, t_sum, mask=head_mask)

        # ---- pass 2: gradient ----
        if COMPUTE_GRAD:
            if ROW_WEIGHTS:
                r = tl.load(r_ptr + heads.to(tl.int64) * stride_rh + n * stride_rn,
                            mask=head_mask, other=0.0).to(tl.float32)
            else:
                r = tl.zeros([H_PAD], tl.float32) + 1.0
            if MEAN:  # the loss's grad_output over n_valid: every row of a distribution, else forward's [4, 0]
                if PROBS:
                    r = r / tl.maximum(tl.cast(N, tl.float32), 1.0)
                else:
                    r = r / tl.maximum(tl.load(stats_ptr + 4 * H), 1.0)
            r = tl.where(ok & head_mask, r, 0.0)
            if H > 1:
                rh = r * hard_coef
            else:
                rh = r  # one head: plain cross-entropy
            rs = r * (soft_coef * inv_t)
            g_row = g_ptr + n * stride_gn + heads[:, None].to(tl.int64) * stride_gh
            if NUM_BLOCKS == 1 and ROW_STATS != 2:
                u = e_u  # used only for KL through a live consensus
                if H > 1:
                    if KL and not DETACH:
                        u = _consensus_log2(z, z, head_mask, k / (H - 1), H, True) * 0.6931471805599453
                grad = _grad_block(z, e_1, e_t * (1.0 / s_t)[:, None], e_u * (1.0 / s_c)[:, None], u, cols0,
                                   y_safe.to(tl.int32), t, t_sum[:, None], r, rh / s1, rh, rs, qa, qu, n_fin, inv_t,
                                   soft_coef, eps, H, DETACH, SMOOTH, KL, PROBS)
                grad = tl.where(ok, grad, 0.0)
                tl.store(g_row + cols0[None, :].to(tl.int64) * stride_gc, grad.to(g_ptr.dtype.element_ty),
                         mask=head_mask[:, None] & col_mask[None, :])
            else:
                # With T = 2, softmax(z) = p_t^2 s_t^2 / s1: the row factor goes into rh1.
                lt = m1_safe * k + tl.log2(s_t)
                if T_IS_TWO:
                    rh1 = rh * (s_t * s_t / s1)
                else:
                    rh1 = rh
                l1 = m1_safe * 1.4426950408889634 + tl.log2(s1)
                lq = mc_safe + tl.log2(s_c)
                if ok:  # (a row-level branch: no per-element select of ignored rows)
                    if tl.max(safe_row, axis=0) > 0:  # pass 1 found -inf in a full block
                        _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, safe_cols0, 0,
                                     n_full * SPLIT, C, k, lt, l1, lq, y_safe, t_sum, r, rh1, rh, rs, qa, qu, n_fin,
                                     inv_t, soft_coef, eps, SAFE_BLOCK, H, T_IS_TWO, DETACH, SMOOTH, KL, PROBS,
                                     NUM_STAGES, FAST_EXP, True)
                    else:
                        _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, cols0, 0,
                                     n_full, C, k, lt, l1, lq, y_safe, t_sum, r, rh1, rh, rs, qa, qu, n_fin,
                                     inv_t, soft_coef, eps, BLOCK_C, H, T_IS_TWO, DETACH, SMOOTH, KL, PROBS,
                                     NUM_STAGES, FAST_EXP, False)
                    if TAIL:
                        _grad_blocks(z_row, stride_zc, g_row, stride_gc, t_row, stride_yc, head_mask, safe_cols0,
                                     n_full * SPLIT, n_full * SPLIT + TAIL, C, k, lt, l1, lq, y_safe, t_sum, r, rh1,
                                     rh, rs, qa, qu, n_fin, inv_t, soft_coef, eps, SAFE_BLOCK, H, T_IS_TWO, DETACH,
                                     SMOOTH, KL, PROBS, NUM_STAGES, FAST_EXP, True)
                else:  # an ignored sample: a zero gradient, whatever its logits hold
                    for b in tl.range(0, NUM_BLOCKS):
                        cols = b * BLOCK_C + cols0
                        tl.store(g_row + cols[None, :].to(tl.int64) * stride_gc,
                                 tl.zeros([H_PAD, BLOCK_C], g_ptr.dtype.element_ty),
                                 mask=head_mask[:, None] & (cols < C)[None, :])
