"""Hand-written CPU kernels for the projections and the attention of a model step.

**Projections over packed low-bit weights** (``q_matmul``: ``y[b, n] = sum_k x[b, k] * W[n, k]``,
``W`` dequantized on the fly), row-major: the kernel of CPUs without AVX2 (NEON, SSE), of
weights the interleaved kernels do not take, and of ``--opt interleave=0``.  With AVX2 or AVX-512
the weights are instead re-laid out at load for the faster kernels of
:mod:`kiln_backends.cpu_interleaved`, which round the activations the same way.

Expressed as one TE reduction and left to schedule rules, TVM vectorizes the unpacking poorly
(the codes of a packed word end up gathered lane by lane) and unpacks every weight again for
every activation row.  This kernel is written out in TIR, and its inner loop is integer
arithmetic, as llama.cpp's is:

* each activation row is quantized per weight group (32 values) to int16: ``x ~ xd * xi`` with
  ``xd = max|x| / 32767`` and ``xi = round(x / xd)``, so each activation is off by at most half a
  step, 1.5e-5 of its group's largest (llama.cpp rounds activations to int8, 256 times coarser);
  SmolLM2's logits move by about 1e-2 against float32 activations.  The quantized row is laid out so
  that code ``q`` of the 16-bit half words of ``L`` packed words meets its activations in
  consecutive lanes (``xq[b, q, h] = xi[b, h * Q + q]``, ``Q`` codes per half word);
* a block of ``L`` words is loaded once as ``2L`` half words; code ``q`` is one shift and one
  mask of the whole vector, and its products with the activations are summed pairwise into
  the word's int32 lane, which LLVM emits as one ``vpmaddwd`` (``vpdpwssd`` with AVX-512 VNNI or
  AVX-VNNI; ``smull`` pairs and ``uzp`` on NEON): twice the multiply-adds of a float instruction, and no
  int-to-float conversion per weight.  Every block is full width: a row that does not fill its
  last block ends with a block over its last ``L`` words, whose already counted words meet zero
  activations.  Integer sums are exact, so a row's result does not depend
  on the order or the batch it is computed in;
* per block, each word's integer sum enters the float accumulator once, times its group's
  weight scale and activation step (``acc += isum * (scale * xd)``; the scales are spread over
  the lanes by a broadcast load and a shuffle);
* **super blocks**: a row's first whole runs of ``L`` groups (4-bit codes: 512 columns) are
  instead transposed in registers, ``S = min(words per group, 4)`` word vectors by
  ``vpunpck[l|h]dq`` / ``vpunpck[l|h]qdq``, so that each int32 lane sums all the words of a
  group (or of a quarter or half of a longer one) and the float part is paid once per ``L``
  groups: per 16 groups of 4-bit codes and activation row, 16 dot products and 3 float
  operations instead of 16 and 12.  The transpose is done once per weight row and shared by the
  tile's activation rows, which the re-layout writes in the matching order; whatever is left
  of the row (SmolLM2's 576 columns: 2 groups) runs in word blocks.  Batched projections ran
  1.15-1.45x faster single-threaded (int8: 1.3-1.8x), a lone row the same;
* after the blocks, each group's minimum meets the
  sum of the group's rounded activations, one multiply-add per group (symmetric codes: minimum =
  ``-offset * scale``), so that a row is exactly the dequantized weights times the rounded
  activations (with the float sum, each rounding error would weigh ``w - minimum`` instead of
  ``w``: about 2.5 times more for asymmetric 4-bit groups);
* with ``activations=int8`` (the backend option) the activations are rounded to int8 instead
  (steps of ``max|x| / 127``, llama.cpp's arithmetic), laid out so that code ``q`` of each byte
  meets them, and each word's four bytes of codes are multiplied and summed in one
  ``vpdpbusd`` (VNNI): half the dot-product instructions of int16 and a cheaper unpacking (8-bit
  codes need none), at a cost in accuracy the README quantifies;
* a block's codes are unpacked once for a tile of ``BATCH_TILE`` activation rows times
  ``TILE_WEIGHT_ROWS`` weight rows (batched decode, prefill): each activation block is loaded
  once for both weight rows (4 x 2 prefilled 5-14% faster than 8 x 1 in the engine, and decoded
  8 sequences as fast); a lone row instead runs ``PAIR`` weight rows side by side, so their
  dependency chains overlap;
* weight rows are spread over threads, and each block of a row hints the same words (and the
  super block's scales and minima) of the row ``PREFETCH_ROWS`` further on into L2: a decode
  step streams the whole model from memory, and the hardware prefetcher alone left the kernel
  at half the bandwidth it reaches with the hints.  Spread over the blocks, each hint costs an
  instruction or two; the burst of hints at the start of each task they replace (each line's
  address a division by the row length) left SmolLM2 decoding 8 sequences 14% and one 6%
  slower, and bursts with cheap addresses were slower still for some shapes;
* long inputs (prefill) run in chunks of ``CHUNK_ROWS`` activation rows, so the quantized
  activations stay in the core's cache while every weight row passes over them; long rows (more
  than 4096 columns for a tile of 4 activation rows with int16) run in chunks of blocks, so a tile's
  activations stay in the L1 cache for all the weight rows of a task, with the partial sums
  kept in a small buffer in between (same arithmetic, same results).

* an activation row is rounded a group at a time as vectors (the group's largest magnitude and
  sum folded in halves, every ``Q``-th activation gathered for each code position); the scalar
  loop it replaced took about 1 us for a row of 576 columns;
* element-wise operations that ``FuseOps`` puts after the projection (a residual add, a bias,
  a cast) become the kernel's epilogue: their expression is evaluated on each result as it is
  stored, so the sum never makes a round trip through memory and no kernel is launched for it.

The kernel keeps the signature of the ``q_matmul`` PrimFunc kiln's quantized layers emit (with
the fused operations' inputs where ``FuseTIR`` put them): :func:`replace_kernels` marks those
PrimFuncs for fusion, :func:`replace_projections` swaps the kernel in after it.
"""

from __future__ import annotations

import logging

import tvm
from tvm.script import tirx as T

from kiln.modeling import fast_exp2

log = logging.getLogger("kiln")

ROWS_PER_TASK = 4  # weight rows per parallel task
PAIR = 2  # weight rows computed side by side for a lone activation row
BATCH_TILE = 4  # activation rows sharing one unpacking of a word block (even; the rest runs in tiles of 2)
TILE_WEIGHT_ROWS = 2  # weight rows of such a tile, side by side (a divisor of ROWS_PER_TASK)
CHUNK_ROWS = 64  # activation rows re-laid out (and kept in cache) at a time
PARALLEL_RELAYOUT = 8  # chunks of at least this many rows are re-laid out by all threads
INT16_STEPS = 32767  # activation quantization: steps from 0 to a group's largest magnitude
INT8_STEPS = 127  # the same with byte dot products (VNNI)
PARALLEL_TOKENS = 16  # RoPE and cache appends of fewer tokens run on one thread
L1_ACTIVATION_BYTES = 32 << 10  # most of a tile's quantized activations per chunk (48 KiB L1)
VNNI_WIDTHS = {16: "llvm.x86.avx512.vpdpbusd.512", 8: "llvm.x86.avx512.vpdpbusd.256",
               4: "llvm.x86.avx512.vpdpbusd.128"}  # int32 lanes: LLVM's byte dot product
WORD_VNNI_WIDTHS = {16: "llvm.x86.avx512.vpdpwssd.512", 8: "llvm.x86.avx512.vpdpwssd.256",
                    4: "llvm.x86.avx512.vpdpwssd.128"}  # the same for pairs of int16
PREFETCH_ROWS = 8  # how far ahead weight rows are prefetched (the stream comes from DRAM; 4 and 16 did the same)
RELAYOUT_LANES = 8  # lanes a group's largest magnitude and sum are folded down to in the relayout


def _well_formed(func: tvm.tirx.PrimFunc) -> bool:
    """TVMScript's own check of a parsed function (s_tir), for a kernel parsed without it."""
    from tvm import s_tir

    try:
        return bool(s_tir.analysis.verify_well_formed(tvm.IRModule({"main": func})))
    except Exception:  # noqa: BLE001 - the verifier raises on what it rejects
        return False


def _gemv_takes(n_rows: int, k: int, bits: int, group: int, lanes: int) -> bool:
    """Whether :func:`quantized_gemv` takes this shape: whole tasks of rows, whole groups of
    whole words, blocks and the tail block of whole groups, and groups that the relayout folds
    in halves down to ``RELAYOUT_LANES`` (a power-of-two multiple of it, at least 2 activations
    per code position of a half word)."""
    per_word = 32 // bits
    if n_rows % ROWS_PER_TASK or ROWS_PER_TASK % PAIR or k % group or group % per_word:
        return False
    words_per_group = group // per_word
    folds = group // RELAYOUT_LANES
    return not (lanes % words_per_group or (k // per_word) % lanes % words_per_group
                or group % RELAYOUT_LANES or folds & (folds - 1) or group // (16 // bits) < 2)


def byte_dots(target: tvm.target.Target) -> bool:
    """Whether the target multiplies unsigned by signed bytes into int32 lanes in one
    instruction (AVX-512 VNNI or AVX-VNNI ``vpdpbusd``), which makes the ``activations=int8``
    option faster than int16 (elsewhere it gives the same results as here, no faster)."""
    from tvm.target.codegen import llvm_cpu_has_features

    try:
        return any(llvm_cpu_has_features([f], target) for f in ("avx512vnni", "avxvnni"))
    except Exception:  # noqa: BLE001 - non-x86 targets have other feature names
        return False


def _unit_lane(u, words_per_group: int, lanes: int):
    """The lane that :func:`_transpose_plan` puts unit ``u`` (a run of ``words_per_group`` words,
    counted from the first vector's) in: a Python int or a TIR expression."""
    per = lanes // words_per_group  # units per input vector
    return u % per * words_per_group + u // per


def _transpose_plan(words_per_group: int, lanes: int):
    """How ``S = words_per_group`` vectors of ``lanes`` words (``lanes / S`` whole groups each, the
    groups of vector ``j`` after those of vector ``j - 1``) become ``S`` vectors, the ``v``-th of
    which holds word ``v`` of every group: ``log2(S)`` stages of two-input shuffles, a butterfly
    over vectors ``c`` apart interleaving ``c``-word chunks of the low (or high) halves of their
    groups (``vpunpck[l|h]dq`` then ``vpunpck[l|h]qdq`` for 4 words a group).  Group ``g`` lands
    in lane :func:`_unit_lane` ``(g)``.  Returns the stages (per output, its two inputs and the
    indices into their concatenation) and which output holds which word; the plan is simulated on
    (group, word) tags and checked."""
    S, L = words_per_group, lanes
    tags = [[(j * (L // S) + l // S, l % S) for l in range(L)] for j in range(S)]
    plan, c = [], 1
    while c < S:
        stage, new = [None] * S, [None] * S
        for a in (a for a in range(S) if not a & c):
            for half, out in ((0, a), (1, a + c)):
                idx = []
                for t in range(0, L, S):
                    for m in range(S // 2 // c):
                        base = t + half * S // 2 + m * c
                        idx += [base + e for e in range(c)] + [L + base + e for e in range(c)]
                stage[out] = (a, a + c, idx)
                new[out] = [(tags[a] + tags[a + c])[x] for x in idx]
        plan.append(stage)
        tags, c = new, 2 * c
    word_at = [tags[o][0][1] for o in range(S)]
    assert all(tags[o][_unit_lane(g, S, L)] == (g, word_at[o]) for o in range(S) for g in range(L))
    return plan, word_at


def _transposed(vectors, plan, word_at):
    """The vectors of :func:`_transpose_plan` from ``vectors`` (expressions), word by word."""
    for stage in plan:
        vectors = [T.Shuffle([vectors[a], vectors[b]], idx) for a, b, idx in stage]
    return [vectors[word_at.index(v)] for v in range(len(vectors))]


def _fold_halves(v, n: int, op, lanes: int):
    """``op`` of the halves of an ``n``-lane vector, again and again, down to ``lanes`` lanes."""
    while n > lanes:
        n //= 2
        v = op(T.Shuffle([v], list(range(n))), T.Shuffle([v], list(range(n, 2 * n))))
    return v


def _l2_hint(ref):
    """A hint to fetch the cache line holding buffer element ``ref`` into L2 (``prefetcht1``):
    both the projections' weight rows and attention's next pages ran slower hinted into L1."""
    return T.call_intrin("", "tirx.prefetch", T.address_of(ref), 0, 2, 1)


def _lane_sums_plan(n: int, lanes: int):
    """How ``n`` vectors of ``lanes`` lanes (``n`` a power of two, at most ``lanes``) become one
    vector of ``n`` lanes whose lane ``i`` sums vector ``i``'s lanes.  Each stage adds the first
    and the second halves of every output's run of lanes, gathered by two shuffles: over pairs of
    vectors (two-input shuffles) until one is left, then within it.  ``n`` outputs take ``n - 1 +
    log2(lanes / n)`` adds and twice as many shuffles, where one horizontal sum per vector takes
    ``log2(lanes)`` of each; the lanes are added in the same order.  Returns the stages (whether
    over pairs, the indices of the first halves, of the second); simulated on tags and checked."""
    assert n & (n - 1) == 0 and n <= lanes, (n, lanes)
    tags, plan = [[i] * lanes for i in range(n)], []
    while len(tags) > 1 or len(tags[0]) > n:
        width = len(tags[0])
        run = width * len(tags) // n  # lanes per output before this stage
        pairs = len(tags) > 1
        first, second = [], []
        for base in ((0, width) if pairs else (0,)):
            for c in range(0, width, run):
                first += [base + c + e for e in range(run // 2)]
                second += [base + c + run // 2 + e for e in range(run // 2)]
        tags = ([[(tags[a] + tags[a + 1])[x] for x in first] for a in range(0, len(tags), 2)] if pairs
                else [[tags[0][x] for x in first]])
        plan.append((pairs, first, second))
    assert tags == [list(range(n))], tags
    return plan


def _lane_sums(vectors, plan):
    """The vector of :func:`_lane_sums_plan` from ``vectors`` (expressions)."""
    for pairs, first, second in plan:
        groups = [vectors[a:a + 2] for a in range(0, len(vectors), 2)] if pairs else [vectors]
        vectors = [T.Shuffle(g, first) + T.Shuffle(g, second) for g in groups]
    return vectors[0]


def quantized_gemv(n_rows: int, k: int, bits: int, group: int, scale_dtype: str, has_min: bool,
                   x_dtype: str, out_dtype: str, lanes: int, batch_first: bool, epilogue=None,
                   int8: bool = False, vnni: bool = False):
    """A PrimFunc ``(x, q_weight, q_scale[, q_min], out)`` computing ``out = x @ dequant(W).T``.

    ``epilogue(value, index)``, if given, builds the expression stored at ``out[index]`` from the
    float32 ``value`` of the product there (an element-wise tail fused into the kernel, such as
    the residual add after a projection: :func:`_fused_epilogue`); by default the value cast to
    ``out_dtype``.

    ``x`` is ``[B, 1, K]`` (``batch_first``: a decode step) or ``[1, B, K]`` (a prefill), with
    ``B`` symbolic.  Weights as :mod:`kiln.quantization.group` stores them: ``bits``-bit codes
    packed ``32 / bits`` per uint32, a scale (and for asymmetric schemes a minimum) per ``group``
    weights; symmetric codes are offset by ``2**(bits - 1) - 1``.

    ``int8`` rounds the activations to int8 instead of int16 and multiplies them with the codes a
    byte at a time (``vpdpbusd`` when ``vnni``: the target has it, see :func:`byte_dots`).
    """
    P = 32 // bits  # codes per word
    W = k // P  # words per weight row
    G = k // group
    WG = group // P  # words per group
    L = lanes
    NB = W // L
    TAIL = W - NB * L
    # A row whose words do not fill its last block (SmolLM2's 576 columns: 72 words, 4 blocks of
    # 16 and 8 over) ends with a narrower block of TAIL lanes where that is a power of two (4-5%
    # faster at 576 columns), else with one more full block, over its last L words.  That one's
    # activations sit in an extra block of the quantized row: the last TAIL words' at its end,
    # zeros before, so the words the blocks before have counted add nothing.  (The narrow block
    # once took as long as the whole rest of the row: LLVM hoisted its loads out of the loop
    # over weight rows and spilled them, which unknown_zero below now prevents.)
    OVERLAP = TAIL > 0 and NB > 0 and TAIL & (TAIL - 1) != 0
    NBX = NB + 1 if OVERLAP else NB  # full-width blocks per row
    SHIFT = L - TAIL if OVERLAP else 0  # words the tail's activations move by
    XW = NBX * L if OVERLAP else W  # words of a quantized activation row
    # Super blocks: the row's first whole runs of L groups (WG blocks of L words each) are
    # transposed in registers, so that each int32 lane sums a whole group and the float part
    # (convert, scale, add) is paid once per L groups instead of once per block.  The transpose
    # is done once per weight row and shared by the tile's activation rows, whose quantized
    # words are laid out to match (word v of the super block's groups side by side).  The rest
    # of the row runs in word blocks as before.
    S = min(WG, 4)  # words a lane sums (a group, or a quarter or half of a longer one)
    UPG = WG // S  # such units per group
    GPS = L // UPG  # groups per super block
    NSB = G // GPS if S in (2, 4) and L % S == 0 and WG % S == 0 else 0  # super blocks per row
    SB = S * L  # words per super block
    PLAN, WORD_AT = _transpose_plan(S, L) if NSB else (None, None)

    def chunks(n_batch):
        """Chunks of blocks for a tile of ``n_batch`` activation rows.  Long rows run in chunks,
        so that the tile's quantized activations stay in the L1 cache while its weight rows pass
        over them (8 rows x 4096 columns are 64 KiB: from L2 the kernel ran at half speed; up to
        2048 columns, 32 KiB, chunks only cost time); partial sums wait in a small buffer
        between chunks.  A lone row's activations fit whole."""
        most = max(1, L1_ACTIVATION_BYTES // (n_batch * L * P * XB))  # blocks
        return max(1, -(-NBX // most))

    def chunk_blocks(n_batch):
        """Blocks per chunk: the row's blocks shared out evenly (whole super blocks)."""
        per = -(-NBX // chunks(n_batch))
        return -(-per // S) * S if NSB else per

    MASK = (1 << bits) - 1
    # Activations meet the codes of a sub-word: a 16-bit half word (int16 activations,
    # ``vpmaddwd``) or a byte (int8, ``vpdpbusd``).  ``xq[b, q, s]`` is the activation of code
    # ``q`` of sub-word ``s`` of the row.
    XB = 1 if int8 else 2  # bytes per quantized activation
    SUB = 4 // XB  # sub-words per word
    Q = 8 * XB // bits  # codes per sub-word
    XT, STEPS = ("int8", INT8_STEPS) if int8 else ("int16", INT16_STEPS)
    H = 2 * W  # half words per weight row
    OFF = float((1 << (bits - 1)) - 1)
    RT, RB, BT, MC = ROWS_PER_TASK, PAIR, BATCH_TILE, CHUNK_ROWS
    if not _gemv_takes(n_rows, k, bits, group, lanes):
        raise ValueError("shape not supported by the hand-written GEMV")

    def store(value, index):
        return epilogue(value, index) if epilogue is not None else T.Cast(out_dtype, value)

    def spread(buf, n, g0, nl):
        """``nl`` lanes of words from group ``g0`` on: each lane gets its group's value."""
        q = nl // WG
        if q == 1:  # the block is one group (8-bit codes with 8 lanes): a plain broadcast
            return T.Broadcast(T.Cast("float32", buf[n, g0]), nl)
        v = T.Cast(f"float32x{q}", buf[n, T.Ramp(g0, 1, q)])
        return T.Shuffle([v] * WG, [lane // WG for lane in range(nl)])

    def word_dot(halves, xq, a0, b, nl, acc=None):
        """``nl`` int32 lanes: lane ``l`` sums the codes of word ``l`` of ``halves`` (``nl``
        words as ``2 nl`` half words) times their int16 activations of row ``b`` (word ``a0 + l``
        of ``xq``).  Written as widening products of ``2 nl`` half-word lanes whose even and odd
        lanes are added: the pattern LLVM turns into ``vpmaddwd``.  Added to ``acc`` if given, with
        ``vpdpwssd`` itself where the target has it (VNNI): as a pattern, LLVM chained a super
        block's 16 products of a row into one dependency chain."""
        total = acc
        for q in range(Q):
            if q == Q - 1:
                c = T.shift_right(halves, T.Broadcast(T.uint16(bits * q), 2 * nl))
            elif q == 0:
                c = T.bitwise_and(halves, T.Broadcast(T.uint16(MASK), 2 * nl))
            else:
                c = T.bitwise_and(T.shift_right(halves, T.Broadcast(T.uint16(bits * q), 2 * nl)),
                                  T.Broadcast(T.uint16(MASK), 2 * nl))
            x16 = xq[b, q, T.Ramp(2 * a0, 1, 2 * nl)]
            if acc is not None and vnni and nl in WORD_VNNI_WIDTHS:
                total = T.call_llvm_pure_intrin(f"int32x{nl}", WORD_VNNI_WIDTHS[nl], total,
                                                T.reinterpret(f"int16x{2 * nl}", c), x16)
            else:
                prod = T.Cast(f"int32x{2 * nl}", c) * T.Cast(f"int32x{2 * nl}", x16)
                pair = T.Shuffle([prod], list(range(0, 2 * nl, 2))) + T.Shuffle([prod], list(range(1, 2 * nl, 2)))
                total = pair if total is None else total + pair
        return total

    def byte_dot(words, xq, a0, b, nl, acc=None):
        """The same with int8 activations: code ``q`` of each byte of ``nl`` words (one shift and
        one mask of the words), times the activations of row ``b``, four products summed into
        each word's int32 lane: ``vpdpbusd`` (unsigned codes times signed activations) when the
        target has it and ``nl`` is a register's width, else widening products LLVM sums; added
        to ``acc`` if given."""
        plane = T.Broadcast(T.uint32(MASK * 0x01010101), nl)
        total = acc
        for q in range(Q):
            c = words if bits == 8 else T.bitwise_and(
                words if q == 0 else T.shift_right(words, T.Broadcast(T.uint32(bits * q), nl)), plane)
            x8 = xq[b, q, T.Ramp(4 * a0, 1, 4 * nl)]
            if vnni and nl in VNNI_WIDTHS:
                total = T.call_llvm_pure_intrin(f"int32x{nl}", VNNI_WIDTHS[nl],
                                                total if total is not None else T.Broadcast(T.int32(0), nl),
                                                T.reinterpret(f"int8x{4 * nl}", c), x8)
            else:
                prod = T.Cast(f"int32x{4 * nl}", T.reinterpret(f"uint8x{4 * nl}", c)) * T.Cast(f"int32x{4 * nl}", x8)
                for j in range(4):
                    part = T.Shuffle([prod], list(range(j, 4 * nl, 4)))
                    total = part if total is None else total + part
        return total

    def dot(qh, n, w0, xq, a0, b, nl):
        """Words ``[w0, w0 + nl)`` of weight row ``n`` times activation row ``b``, lane by lane."""
        if int8:
            return byte_dot(qh[n, T.Ramp(w0, 1, nl)], xq, a0, b, nl)
        return word_dot(qh[n, T.Ramp(2 * w0, 1, 2 * nl)], xq, a0, b, nl)

    def words_dot(words, xq, a0, b, acc):
        """``acc +`` the same for ``L`` words given as a vector (a transposed super block's)."""
        if int8:
            return byte_dot(words, xq, a0, b, L, acc)
        return word_dot(T.reinterpret(f"uint16x{2 * L}", words), xq, a0, b, L, acc)

    def transposed(qw, n, s):
        """Super block ``s`` of weight row ``n``: its ``S`` word vectors transposed, one after
        another (word ``v`` of the ``L`` units in vector ``v``)."""
        words = [qw[n, T.Ramp(s * SB + j * L, 1, L)] for j in range(S)]
        return T.Shuffle(_transposed(words, PLAN, WORD_AT), list(range(SB)))

    def group_scales(qs, n, s):
        """The scales of super block ``s``'s groups, in the lanes the transpose puts their units in."""
        v = T.Cast(f"float32x{GPS}", qs[n, T.Ramp(s * GPS, 1, GPS)])
        unit_at = sorted(range(L), key=lambda u: _unit_lane(u, S, L))  # the unit in each lane
        return T.Shuffle([v] * UPG, [u // UPG for u in unit_at])

    def chains(n_batch, n_rows_side):
        """Integer accumulators per output in a super block: a small tile's few outputs would
        otherwise each be one chain of ``S * Q`` dependent dot products (a lone row ran 4% slower
        than with word blocks), but chains shorter than 4 cost more in the adds that join them;
        the partial sums are exact, so the result is the same."""
        return min(S, max(1, 8 // (n_batch * n_rows_side)), max(1, S * Q // 4))

    def make_super(n_batch, n_rows_side):
        """``acc +=`` super block ``s`` of weight rows ``n ..`` times activation rows ``b0 ..``:
        integer sums over whole groups, then one float multiply-add per lane."""
        CH = chains(n_batch, n_rows_side)

        @T.macro
        def sblock(qw, qs, qm, xq, xd, acc, sv, isum, tw, n, s, b0):
            for rb in T.unroll(n_rows_side):
                tw[rb, T.Ramp(0, 1, SB)] = transposed(qw, n + rb, s)
                sv[rb, T.Ramp(0, 1, L)] = group_scales(qs, n + rb, s)
            for a in T.unroll(n_batch * n_rows_side * CH):
                isum[a, T.Ramp(0, 1, L)] = T.Broadcast(T.int32(0), L)
            for rb in T.unroll(n_rows_side):
                for j in T.unroll(S):
                    T.evaluate(ahead(qw, n + rb, s * SB + j * L))
                T.evaluate(ahead(qs, n + rb, s * GPS))
                if has_min:
                    T.evaluate(ahead(qm, n + rb, s * GPS))
            for v in T.unroll(S):
                for rb in T.unroll(n_rows_side):
                    for bb in T.unroll(n_batch):
                        isum[(rb * n_batch + bb) * CH + v % CH, T.Ramp(0, 1, L)] = words_dot(
                            tw[rb, T.Ramp(v * L, 1, L)], xq, s * SB + v * L, b0 + bb,
                            isum[(rb * n_batch + bb) * CH + v % CH, T.Ramp(0, 1, L)])
            for a in T.unroll(n_batch * n_rows_side):
                for c in T.unroll(1, CH):
                    isum[a * CH, T.Ramp(0, 1, L)] = isum[a * CH, T.Ramp(0, 1, L)] + isum[a * CH + c, T.Ramp(0, 1, L)]
            for rb in T.unroll(n_rows_side):
                for bb in T.unroll(n_batch):
                    acc[rb * n_batch + bb, T.Ramp(0, 1, L)] = (
                        acc[rb * n_batch + bb, T.Ramp(0, 1, L)]
                        + T.Cast(f"float32x{L}", isum[(rb * n_batch + bb) * CH, T.Ramp(0, 1, L)])
                        * (sv[rb, T.Ramp(0, 1, L)] * xd[b0 + bb, T.Ramp(s * SB, 1, L)]))
        return sblock

    def make_block(nl, n_batch, n_rows_side):
        """``acc += `` words ``[w0, w0 + nl)`` of rows ``n ..`` times activation rows ``b0 ..``
        (their words ``[a0, a0 + nl)`` of ``xq`` and ``xd``)."""

        @T.macro
        def block(qh, qs, xq, xd, acc, sv, n, w0, a0, b0):
            for rb in T.unroll(n_rows_side):
                T.evaluate(ahead(qh, n + rb, w0 if int8 else 2 * w0))
            for rb in T.unroll(n_rows_side):
                sv[rb, T.Ramp(0, 1, nl)] = spread(qs, n + rb, w0 // WG, nl)
                for bb in T.unroll(n_batch):
                    acc[rb * n_batch + bb, T.Ramp(0, 1, nl)] = (
                        acc[rb * n_batch + bb, T.Ramp(0, 1, nl)]
                        + T.Cast(f"float32x{nl}", dot(qh, n + rb, w0, xq, a0, b0 + bb, nl))
                        * (sv[rb, T.Ramp(0, 1, nl)] * xd[b0 + bb, T.Ramp(a0, 1, nl)]))
        return block

    def ahead(buf, n, col):
        """A hint to fetch column ``col`` of row ``n + PREFETCH_ROWS`` of ``buf`` (the last row
        past the end) into L2.  Into L1 (``prefetcht0``) a lone row of 1536 columns streamed
        from memory ran 1.4x slower (our reading: the hints took the L1's few miss buffers from
        the row's own loads)."""
        return _l2_hint(buf[T.min(n + PREFETCH_ROWS, n_rows - 1), col])

    def span(start, nl):
        """Index of ``nl`` consecutive lanes (one lane: a scalar index)."""
        return T.Ramp(start, 1, nl) if nl > 1 else start

    def minimum(qs, qm, n, g0, nl):
        """The minimum of ``nl`` groups from ``g0`` on (symmetric codes: ``-offset * scale``)."""
        ty = f"float32x{nl}" if nl > 1 else "float32"
        if has_min:
            return T.Cast(ty, qm[n, span(g0, nl)])
        return T.Cast(ty, qs[n, span(g0, nl)]) * (T.Broadcast(T.float32(-OFF), nl) if nl > 1 else T.float32(-OFF))

    def unknown_zero(xq):
        """Zero, in a form LLVM cannot tell: the rows of the activation buffer (at most
        ``CHUNK_ROWS``) shifted right by 62.  Adding ``r`` times it to a tile's activation row
        keeps the activation loads inside the loop over a task's weight rows: as loop
        invariants LLVM hoisted all of them (64 vectors for a super block of 4 rows) out of it
        and spilled them to the stack, where a tile of 576 columns ran at two thirds of the
        speed (int8 too, without super blocks: the 1.5x it gained there)."""
        return T.shift_right(xq.shape[0], 62)

    def make_tile(n_batch, n_rows_side):
        """Whole rows: ``n_batch`` activation rows from ``b0`` (``y`` rows from ``yb0``) times
        ``n_rows_side`` weight rows from ``n``."""
        full = make_block(L, n_batch, n_rows_side)
        tail = make_block(TAIL, n_batch, n_rows_side) if TAIL and not OVERLAP else None
        sup = make_super(n_batch, n_rows_side) if NSB else None
        NA = n_batch * n_rows_side  # one accumulator per output
        # Tiles of 4 outputs or more sum their accumulators' lanes together (batch-8 projections
        # 1-3.5% faster, 64 rows 2.5-5%); a lone row's pair of outputs ran 7% slower so, and sums
        # each output on its own (the same order of additions either way).
        SUMS = _lane_sums_plan(NA, L) if 4 <= NA <= L and NA & (NA - 1) == 0 else None
        EACH = _lane_sums_plan(1, L)

        def total(acc, a):
            """Output ``a``'s sum, where the sums across lanes left it."""
            return acc[0, a] if SUMS is not None else acc[a, 0]
        CB = chunk_blocks(n_batch)

        @T.macro
        def finish(qs, qm, y, xs, acc, n, b0, yb0):
            # the minima meet each group's float activation sum: one multiply-add per group
            for a in T.unroll(NA):
                for gc in T.serial(G // L):
                    acc[a, span(0, L)] = acc[a, span(0, L)] + minimum(qs, qm, n + a // n_batch, gc * L, L) * xs[b0 + a % n_batch, span(gc * L, L)]
                if G % L > 0:
                    acc[a, span(0, G % L)] = acc[a, span(0, G % L)] + minimum(qs, qm, n + a // n_batch, G // L * L, G % L) * xs[b0 + a % n_batch, span(G // L * L, G % L)]
            if SUMS is not None:  # all the tile's sums across lanes at once: output a in lane a
                acc[0, T.Ramp(0, 1, NA)] = _lane_sums([acc[a, T.Ramp(0, 1, L)] for a in range(NA)], SUMS)
            else:  # each output's own, in lane 0
                for a in T.unroll(NA):
                    acc[a, 0] = _lane_sums([acc[a, T.Ramp(0, 1, L)]], EACH)
            for a in T.unroll(NA):
                if batch_first:
                    y[yb0 + a % n_batch, 0, n + a // n_batch] = store(
                        total(acc, a), (yb0 + a % n_batch, T.int64(0), n + a // n_batch))
                else:
                    y[0, yb0 + a % n_batch, n + a // n_batch] = store(
                        total(acc, a), (T.int64(0), yb0 + a % n_batch, n + a // n_batch))

        @T.macro
        def blocks(qw, qh, qs, qm, xq, xd, acc, sv, isum, tw, n, b0, kb0, kb1):
            """Blocks ``[kb0, kb1)`` (``kb0`` a multiple of ``S``): first the super blocks among
            them, then word blocks; the last of a row that overlaps (``OVERLAP``) starts at
            weight word ``W - L``, against its own block of activations."""
            if NSB > 0:
                for s in T.serial(kb0 // S, T.max(kb0, T.min(kb1, NSB * S)) // S):
                    sup(qw, qs, qm, xq, xd, acc, sv, isum, tw, n, s, b0)
            for kb in T.serial(T.max(kb0, NSB * S), T.max(kb1, T.max(kb0, NSB * S))):
                full(qh, qs, xq, xd, acc, sv, n, T.min(kb * L, W - L), kb * L, b0)
            if TAIL > 0 and not OVERLAP:  # a narrower block for the row's last words
                if kb1 == NBX:
                    tail(qh, qs, xq, xd, acc, sv, n, NB * L, NB * L, b0)

        @T.macro
        def tile(qw, qh, qs, qm, y, xq, xs, xd, n, b0, yb0):
            with T.sblock("tile"):
                acc = T.sblock_alloc_buffer((NA, L), "float32")
                sv = T.sblock_alloc_buffer((n_rows_side, L), "float32")
                isum = T.sblock_alloc_buffer((NA * chains(n_batch, n_rows_side), L), "int32")
                tw = T.sblock_alloc_buffer((n_rows_side, SB), "uint32")
                for a in T.unroll(NA):
                    for l in T.vectorized(L):
                        acc[a, l] = T.float32(0)
                blocks(qw, qh, qs, qm, xq, xd, acc, sv, isum, tw, n, b0, 0, NBX)
                finish(qs, qm, y, xs, acc, n, b0, yb0)

        @T.macro
        def part(qw, qh, qs, qm, xq, xd, n, b0, saved, slot, kc):
            """Chunk ``kc`` of the blocks, added to the tile's partial sums in ``saved[slot]``."""
            with T.sblock("tile"):
                acc = T.sblock_alloc_buffer((NA, L), "float32")
                sv = T.sblock_alloc_buffer((n_rows_side, L), "float32")
                isum = T.sblock_alloc_buffer((NA * chains(n_batch, n_rows_side), L), "int32")
                tw = T.sblock_alloc_buffer((n_rows_side, SB), "uint32")
                for a in T.unroll(NA):
                    for l in T.vectorized(L):
                        acc[a, l] = saved[slot, a, l]
                blocks(qw, qh, qs, qm, xq, xd, acc, sv, isum, tw, n, b0, kc * CB, T.min(NBX, kc * CB + CB))
                for a in T.unroll(NA):
                    for l in T.vectorized(L):
                        saved[slot, a, l] = acc[a, l]

        @T.macro
        def last(qs, qm, y, xs, n, b0, yb0, saved, slot):
            with T.sblock("tile"):
                acc = T.sblock_alloc_buffer((NA, L), "float32")
                for a in T.unroll(NA):
                    for l in T.vectorized(L):
                        acc[a, l] = saved[slot, a, l]
                finish(qs, qm, y, xs, acc, n, b0, yb0)

        nch = -(-NBX // CB) if CB else 1  # chunks (CB rounded up to whole super blocks: no empty one)
        per = RT // n_rows_side  # tiles per task

        @T.macro
        def whole(qw, qh, qs, qm, y, xq, xs, xd, no, b0, yb0):
            """The task's ``RT`` weight rows times activation rows ``b0 ..``, tile by tile."""
            for r in T.serial(per):
                tile(qw, qh, qs, qm, y, xq, xs, xd, no * RT + r * n_rows_side, b0 + r * unknown_zero(xq), yb0)

        @T.macro
        def chunked(qw, qh, qs, qm, y, xq, xs, xd, no, b0, yb0):
            """The same, chunk by chunk: each chunk of activations serves all the task's weight
            rows while it is in L1, and the partial sums wait in a small buffer.  Same results."""
            with T.sblock("chunked"):
                saved = T.sblock_alloc_buffer((per, NA, L), "float32")
                for r in T.serial(per):
                    for a in T.serial(NA):
                        for l in T.vectorized(L):
                            saved[r, a, l] = T.float32(0)
                for kc in T.serial(nch):
                    for r in T.serial(per):
                        part(qw, qh, qs, qm, xq, xd, no * RT + r * n_rows_side, b0 + r * unknown_zero(xq), saved, r, kc)
                for r in T.serial(per):
                    last(qs, qm, y, xs, no * RT + r * n_rows_side, b0, yb0, saved, r)
        return whole, (chunked if nch > 1 else whole), nch > 1

    big, big_c, big_chunked = make_tile(BT, TILE_WEIGHT_ROWS)
    two, two_c, two_chunked = make_tile(2, 1)
    lone, lone_c, lone_chunked = make_tile(1, RB)

    def make_task(big, two, lone):
        @T.macro
        def task(qh, qs, qm, y, xq, xs, xd, qw, no, nb, mc):
            """Weight rows ``no * RT ..`` times the chunk's ``nb`` activation rows: tiles of BT
            rows (by ``TILE_WEIGHT_ROWS`` weight rows), then tiles of 2 for the rest, then a
            lone row."""
            for bt in T.serial(nb // BT):
                big(qw, qh, qs, qm, y, xq, xs, xd, no, bt * BT, mc * MC + bt * BT)
            for t in T.serial(nb % BT // 2):
                two(qw, qh, qs, qm, y, xq, xs, xd, no, nb // BT * BT + 2 * t, mc * MC + nb // BT * BT + 2 * t)
            if nb % 2 == 1:
                lone(qw, qh, qs, qm, y, xq, xs, xd, no, nb - 1, mc * MC + nb - 1)
        return task

    task_whole = make_task(big, two, lone)
    task_chunked = make_task(big_c, two_c, lone_c)

    def chunks_run(nb):
        """Whether a batch of ``nb`` activation rows has a tile that runs in chunks."""
        conds = [c for on, c in ((big_chunked, nb >= BT), (two_chunked, nb % BT >= 2), (lone_chunked, nb % 2 == 1))
                 if on]
        if not conds:
            return False
        expr = conds[0]
        for c in conds[1:]:
            expr = tvm.tirx.Or(expr, c)
        return expr

    def moved(g):
        """Words group ``g``'s activations move by in the quantized row."""
        return T.Select(g * WG >= NB * L, SHIFT, 0) if OVERLAP else 0

    VR = RELAYOUT_LANES

    x_vec = _activation_loader(batch_first, x_dtype)

    def fold(v, op):
        return _fold_halves(v, group, op, VR)

    @T.macro
    def relayout(x, xq, xs, xd, b, row):
        """Quantize activation row ``row`` into ``xq[b]``, with per-word steps ``xd[b]`` and float
        group sums ``xs[b]`` (the last ``TAIL`` words' moved ``SHIFT`` words on, after zeros)."""
        with T.sblock("relayout"):
            if OVERLAP:
                for q in T.serial(Q):
                    for h in T.vectorized(SUB * SHIFT):
                        xq[b, q, SUB * NB * L + h] = T.Cast(XT, 0)
                for j in T.serial(SHIFT):
                    xd[b, NB * L + j] = T.float32(0)
            st = T.sblock_alloc_buffer((2,), "float32")  # the group's largest magnitude, 1 / step
            part = T.sblock_alloc_buffer((2, VR), "float32")  # VR-lane partial maxima and sums
            for g in T.serial(G):
                # the group as one vector, folded in halves down to VR lanes, then VR scalars
                part[0, T.Ramp(0, 1, VR)] = fold(T.fabs(x_vec(x, row, g * group, group)), T.max)
                st[0] = T.float32(0)
                for i in T.serial(VR):
                    st[0] = T.max(st[0], part[0, i])
                st[1] = T.Select(st[0] > T.float32(0), T.float32(STEPS) / st[0], T.float32(0))
                # the sum of the rounded activations (integers, exact in float32), for the minima
                part[1, T.Ramp(0, 1, VR)] = fold(T.round(x_vec(x, row, g * group, group) * T.Broadcast(st[1], group)),
                                                 lambda a, c: a + c)
                xs[b, g] = T.float32(0)
                for i in T.serial(VR):
                    xs[b, g] = xs[b, g] + part[1, i]
                xs[b, g] = xs[b, g] * (st[0] * T.float32(1.0 / STEPS))
                if g < NSB * GPS:  # a super block's group: word v of a unit beside word v of the others
                    for q in T.serial(Q):
                        for v in T.serial(WG):
                            xq[b, q, T.Ramp(SUB * (g // GPS * SB + v % S * L + _unit_lane(g % GPS * UPG + v // S, S, L)), 1, SUB)] = T.Cast(
                                f"{XT}x{SUB}", T.round(x_vec(x, row, g * group + q + Q * SUB * v, SUB, Q)
                                                       * T.Broadcast(st[1], SUB)))
                    for u in T.serial(UPG):
                        xd[b, g // GPS * SB + _unit_lane(g % GPS * UPG + u, S, L)] = st[0] * T.float32(1.0 / STEPS)
                else:
                    for q in T.serial(Q):  # code q of each sub-word: every Q-th activation of the group
                        xq[b, q, T.Ramp(g * (group // Q) + SUB * moved(g), 1, group // Q)] = T.Cast(
                            f"{XT}x{group // Q}", T.round(x_vec(x, row, g * group + q, group // Q, Q)
                                                          * T.Broadcast(st[1], group // Q)))
                    for v in T.serial(WG):
                        xd[b, g * WG + v + moved(g)] = st[0] * T.float32(1.0 / STEPS)

    round_chunk = _chunk_rounder(relayout)

    @T.macro
    def body(x, qw, qs, qm, y, B):
        with T.sblock("root"):
            qh = T.decl_buffer((n_rows, H), "uint16", data=qw.data) if not int8 else qw
            xq = T.sblock_alloc_buffer((T.min(B, MC), Q, SUB * XW), XT)
            xs = T.sblock_alloc_buffer((T.min(B, MC), G), "float32")
            xd = T.sblock_alloc_buffer((T.min(B, MC), XW), "float32")
            for mc in T.serial((B + MC - 1) // MC):
                nb: T.let[T.int64] = T.min(B - mc * MC, MC)
                round_chunk(x, xq, xs, xd, nb, mc * MC)
                # Rows long enough to be chunked take a buffer for partial sums, which TVM
                # allocates at the top of every task: batches that chunk nothing (a single
                # sequence's decode step) run a loop without it.
                if chunks_run(nb):
                    for no in T.parallel(n_rows // RT):
                        task_chunked(qh, qs, qm, y, xq, xs, xd, qw, no, nb, mc)
                else:
                    for no in T.parallel(n_rows // RT):
                        task_whole(qh, qs, qm, y, xq, xs, xd, qw, no, nb, mc)

    gemv = _projection_func(body, n_rows, k, W, G, scale_dtype, has_min, x_dtype, out_dtype, batch_first, {})
    if epilogue is None and not _well_formed(gemv):
        raise RuntimeError("kiln's projection kernel is not well-formed TIR")
    return gemv


def _activation_loader(batch_first: bool, x_dtype: str):
    """``x_vec(x, row, start, n, stride=1)``: ``n`` activations of row ``row`` of a projection's
    input (``[B, 1, K]`` if ``batch_first``, else ``[1, B, K]``) from column ``start`` on, ``stride``
    apart, as float32."""

    def x_vec(x, row, start, n, stride=1):
        v = x[row, 0, T.Ramp(start, stride, n)] if batch_first else x[0, row, T.Ramp(start, stride, n)]
        return v if x_dtype == "float32" else T.Cast(f"float32x{n}", v)

    return x_vec


def _chunk_rounder(relayout):
    """A macro ``(x, xq, xs, xd, nb, first)`` rounding activation rows ``first .. first + nb`` of a
    chunk with ``relayout(x, xq, xs, xd, b, row)`` into slots ``0 .. nb``: on all cores from
    ``PARALLEL_RELAYOUT`` rows on, else on the calling thread."""

    @T.macro
    def round_chunk(x, xq, xs, xd, nb, first):
        if nb >= PARALLEL_RELAYOUT:
            for b in T.parallel(nb):
                relayout(x, xq, xs, xd, b, first + b)
        else:
            for b in T.serial(nb):
                relayout(x, xq, xs, xd, b, first + b)

    return round_chunk


def _projection_func(body, n_rows: int, k: int, words: int, groups: int, scale_dtype: str, has_min: bool,
                     x_dtype: str, out_dtype: str, batch_first: bool, attrs: dict):
    """The PrimFunc ``(x, q_weight, q_scale[, q_min], out)`` of a projection kernel (the signature of
    kiln's ``q_matmul``, ``B`` rows symbolic) around the macro ``body(x, qw, qs, qm, y, B)``, which
    gets ``q_scale`` again as ``qm`` when there are no minima.  Not checked for well-formedness:
    an epilogue loads buffers of the function it came from until :func:`_gemv_for` makes them
    parameters."""
    W, G = words, groups
    attrs = {"tirx.is_scheduled": True, "tirx.noalias": True, **attrs}
    if has_min:
        @T.prim_func(s_tir=True, private=True, check_well_formed=False)
        def gemv(var_x: T.handle, qw: T.Buffer((n_rows, W), "uint32"), qs: T.Buffer((n_rows, G), scale_dtype),
                 qm: T.Buffer((n_rows, G), scale_dtype), var_y: T.handle):
            T.func_attr(attrs)
            B = T.int64()
            x = T.match_buffer(var_x, (B, 1, k) if batch_first else (1, B, k), x_dtype)
            y = T.match_buffer(var_y, (B, 1, n_rows) if batch_first else (1, B, n_rows), out_dtype)
            body(x, qw, qs, qm, y, B)
    else:
        @T.prim_func(s_tir=True, private=True, check_well_formed=False)
        def gemv(var_x: T.handle, qw: T.Buffer((n_rows, W), "uint32"), qs: T.Buffer((n_rows, G), scale_dtype),
                 var_y: T.handle):
            T.func_attr(attrs)
            B = T.int64()
            x = T.match_buffer(var_x, (B, 1, k) if batch_first else (1, B, k), x_dtype)
            y = T.match_buffer(var_y, (B, 1, n_rows) if batch_first else (1, B, n_rows), out_dtype)
            body(x, qw, qs, qs, y, B)
    return gemv


def _static(dim) -> int | None:
    return int(dim) if isinstance(dim, tvm.tirx.IntImm) else None


class _NotElementwise(Exception):
    """An epilogue block that is not element-wise over the projection's output."""


def _rebuild(expr, names, env, block_vars):
    """``expr`` of an epilogue block with its iteration variables replaced (``names``: pairs of
    variable and value) and each load of an earlier result (``env``: pairs of buffer and value)
    replaced by that value; such a load must be at the block's own iteration variables."""
    tir = tvm.tirx

    def rec(e):
        if isinstance(e, tir.Var):
            return next((value for var, value in names if var.same_as(e)), e)
        if isinstance(e, (tir.IntImm, tir.FloatImm)):
            return e
        if isinstance(e, tvm.ir.expr.TensorLoad):
            for buf, value in env:
                if buf.same_as(e.source):
                    if len(e.indices) != len(block_vars) or not all(
                            i.same_as(v) for i, v in zip(e.indices, block_vars)):
                        raise _NotElementwise(buf.name)
                    return value
            return tir.BufferLoad(e.source, [rec(i) for i in e.indices])
        if isinstance(e, tir.Cast):
            return tir.Cast(e.ty.dtype, rec(e.value))
        if isinstance(e, (tir.Add, tir.Sub, tir.Mul, tir.Div, tir.Mod, tir.FloorDiv, tir.FloorMod, tir.Min, tir.Max,
                          tir.EQ, tir.NE, tir.LT, tir.LE, tir.GT, tir.GE, tir.And, tir.Or)):
            return type(e)(rec(e.a), rec(e.b))
        if isinstance(e, tir.Not):
            return tir.Not(rec(e.a))
        if isinstance(e, tir.Select):
            return tir.Select(rec(e.condition), rec(e.true_value), rec(e.false_value))
        if isinstance(e, tvm.ir.expr.Call) and isinstance(e.op, tvm.ir.Op):
            return tir.call_intrin(e.ty, e.op, *[rec(a) for a in e.args])
        raise _NotElementwise(type(e).__name__)

    return rec(expr)


def _fused_epilogue(blocks, product):
    """``(epilogue, output buffer)`` for the blocks after a projection's ``q_matmul`` block
    (``product``: the buffer it writes) when each is element-wise over the product's shape —
    a cast, a residual add, a bias —, or ``None``.  ``epilogue(value, index)`` is the expression
    the fused kernel stores at ``index`` of the output, given the product's ``value`` there."""
    steps = []
    for blk in blocks:
        store = blk.body
        iters = [iv.var for iv in blk.iter_vars]
        if (blk.init is not None or not isinstance(store, tvm.tirx.BufferStore) or len(iters) != len(product.shape)
                or len(store.indices) != len(iters) or not all(i.same_as(v) for i, v in zip(store.indices, iters))
                or len(store.buffer.shape) != len(product.shape)
                or not all(a.same_as(b) or (_static(a) is not None and _static(a) == _static(b))
                            for a, b in zip(store.buffer.shape, product.shape))):
            return None
        steps.append((store.buffer, iters, store.value))

    def epilogue(value, index):
        env = [(product, value)]
        for buf, iters, expr in steps:
            env.append((buf, _rebuild(expr, list(zip(iters, index)), env, iters)))
        return env[-1][1]

    probe = [tvm.tirx.Var(f"i{d}", "int64") for d in range(len(product.shape))]
    try:  # every block must rebuild, before the kernel is written around it
        epilogue(tvm.tirx.FloatImm("float32", 0.0), probe)
    except _NotElementwise:
        return None
    return epilogue, (steps[-1][0] if steps else product)


def _gemv_for(func: tvm.tirx.PrimFunc, lanes: int, build: bool = True, int8: bool = False, vnni: bool = False,
              interleaved: bool = False):
    """The hand-written kernel for a ``q_matmul`` PrimFunc (decode ``[B, 1, K]`` or prefill
    ``[1, B, K]`` activations, ``B`` symbolic), with any element-wise blocks fused after it
    (``FuseOps``: a cast, a residual add) as the kernel's epilogue, or ``None``.  With ``build``
    false, only whether it would be replaced: ``None``, or the positions of the weight's tensors
    among the function's parameters (``{"qw": i, "qs": j[, "qm": l]}``).  ``int8`` and ``vnni`` as
    for :func:`quantized_gemv`; ``interleaved``: the kernel over weights interleaved ``lanes`` rows
    to a vector (:func:`kiln_backends.cpu_interleaved.interleaved_gemv`) instead."""
    from tvm import s_tir

    from .cpu_interleaved import interleaved_gemv, interleaved_takes

    try:
        sch = s_tir.Schedule(func)
        blocks = [sch.get(b) for b in sch.get_child_blocks(sch.get_sblock("root"))]
    except Exception:  # noqa: BLE001 - not the block structure kiln's layers emit
        return None
    if not blocks or blocks[0].name_hint != "q_matmul":
        return None
    reads = [r.source for r in blocks[0].reads]  # x, q_weight, q_scale[, q_min] (the layer's expression order)
    if len(reads) not in (3, 4) or len(blocks[0].writes) != 1:
        return None
    x, qw, qs, *rest = reads
    qm = rest[0] if rest else None
    fused = _fused_epilogue(blocks[1:], blocks[0].writes[0].source)
    if fused is None:
        return None
    epilogue, out = fused
    params = list(func.params)
    if not params or not params[-1].same_as(out) or not all(any(p.same_as(b) for p in params) for b in reads):
        return None
    if len(x.shape) != 3 or qw.dtype != "uint32":
        return None
    d0, d1, k = (_static(d) for d in x.shape)
    n_rows, words = _static(qw.shape[0]), _static(qw.shape[1])
    groups = _static(qs.shape[1])
    if None in (k, n_rows, words, groups) or (d0 is None) == (d1 is None) or (d0 or d1) != 1:
        return None  # static rows (the logits of a prefill) or another layout: the schedule rules handle it
    bits = 32 * words // k
    takes = interleaved_takes(n_rows, k, bits, k // groups, int8, lanes) if interleaved else _gemv_takes(
        n_rows, k, bits, k // groups, lanes)
    if bits not in (2, 4, 8) or k % groups or not takes:
        return None
    if not build:
        return {role: next(i for i, p in enumerate(params) if p.same_as(b))
                for role, b in (("qw", qw), ("qs", qs), ("qm", qm)) if b is not None}
    try:
        if interleaved:
            kernel = interleaved_gemv(n_rows, k, bits, k // groups, str(qs.dtype), qm is not None, str(x.dtype),
                                      str(out.dtype), batch_first=d1 == 1, epilogue=epilogue, int8=int8, rows=lanes,
                                      vnni=vnni)
        else:
            kernel = quantized_gemv(n_rows, k, bits, k // groups, str(qs.dtype), qm is not None, str(x.dtype),
                                    str(out.dtype), lanes, batch_first=d1 == 1, epilogue=epilogue, int8=int8,
                                    vnni=vnni)
    except ValueError:
        return None
    # the kernel's parameters in the fused function's order; the epilogue's other inputs (a
    # residual) are the fused function's own buffers, which its expression already loads
    own = dict(zip(("x", "qw", "qs", "qm", "y"), kernel.params if qm is not None else
                   [*kernel.params[:3], None, kernel.params[3]]))
    mine = {"x": x, "qw": qw, "qs": qs, "qm": qm, "y": out}
    ordered = []
    for p in params:
        role = next((r for r, b in mine.items() if b is not None and b.same_as(p)), None)
        ordered.append(own[role] if role else p)
    fused_kernel = tvm.tirx.PrimFunc(ordered, kernel.body, kernel.ret_type, kernel.attrs)
    if not _well_formed(fused_kernel):
        return None
    return fused_kernel


def _replacing_pass(name: str, replace, kind=None):
    """A module pass putting ``replace(global_var, func)`` (when not ``None``) in place of each
    function of type ``kind`` (default: PrimFunc), under the same global symbol, in a copy of the
    module it is given (a pass must not change its caller's module)."""
    kind = kind or tvm.tirx.PrimFunc

    @tvm.transform.module_pass(opt_level=0, name=name)
    def _pass(mod, _ctx):
        updates = {}
        for gv, func in mod.functions_items():
            if isinstance(func, kind):
                new = replace(gv, func)
                if new is not None:
                    symbol = (func.attrs or {}).get("global_symbol")
                    updates[gv] = new.with_attr("global_symbol", symbol) if symbol else new
        if not updates:
            return mod
        mod = mod.clone()
        for gv, func in updates.items():
            mod[gv] = func
        log.debug("%s: %s", name, ", ".join(sorted(gv.name_hint for gv in updates)))
        return mod

    return _pass


def replace_projections(target: tvm.target.Target, int8: bool = False):
    """Module pass, after ``FuseTIR``: kiln's hand-written projection kernel for every PrimFunc
    that is a ``q_matmul`` followed by element-wise blocks (a residual add, a cast), which become
    its epilogue; any other stays for the schedule rules.  ``int8``: activations rounded to int8
    (the backend's ``activations=int8`` option)."""
    from .cpu_schedules import vector_bits

    lanes, vnni = max(vector_bits(target) // 32, 4), byte_dots(target)
    if int8 and not vnni:
        log.warning("activations=int8 without byte dot products (VNNI) on %s: the same results, no faster than int16",
                    target.attrs.get("mcpu", target.kind.name))
    return _replacing_pass("KilnReplaceProjections", lambda gv, func: _gemv_for(
        func, lanes, int8=int8, vnni=vnni)
        if "q_matmul" in gv.name_hint and not (func.attrs or {}).get("kiln.interleaved") else None)


def cast_before_reshape():
    """Module pass, before ``LegalizeOps``: ``astype(reshape(x))`` becomes ``reshape(astype(x))``.

    The values are the same (a cast is element-wise), but only the second lets ``FuseOps`` put
    the cast in the kernel that made ``x``: a float32 model's fused QKV projection is reshaped into
    heads and then cast to the float16 KV cache's dtype, which otherwise costs a kernel per layer
    (and a round trip of the projection through memory).  With the cast as its epilogue the
    projection writes float16 directly: SmolLM2 decoded 8 requests 3% faster (one 0.5-4%)."""
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    data, shape = wildcard(), wildcard()
    reshaped = is_op("relax.reshape")(data, shape)
    pattern = is_op("relax.astype")(reshaped)

    def swap(call, matches):
        return relax.op.reshape(relax.op.astype(matches[data], call.attrs.dtype), matches[reshaped].args[1])

    def rewritten(_gv, func):
        new = rewrite_call(pattern, swap, func)
        return None if new.same_as(func) else new

    return _replacing_pass("KilnCastBeforeReshape", rewritten, relax.Function)


def replace_kernels(target: tvm.target.Target):
    """Module pass: mark kiln's ``q_matmul`` PrimFuncs for fusion with what follows them (see
    :func:`replace_projections`) and swap kiln's hand-written kernels in for TVM's CPU decode
    attention, prefill attention (ragged and paged), KV cache append and RoPE kernels.  Each keeps
    the signature (and the global symbol) of the kernel it replaces; a kernel whose shapes it does
    not take stays as it is, for the schedule rules."""
    from .cpu_schedules import vector_bits

    lanes = max(vector_bits(target) // 32, 4)
    by_symbol = {"batch_decode_paged_kv_cpu": _decode_attention_for, "batch_prefill_ragged_kv": _prefill_attention_for,
                 "batch_prefill_paged_kv_cpu": _paged_prefill_attention_for,
                 "tir_kv_cache_transpose_append": _kv_append_for}

    def replace(gv, func):
        attrs = func.attrs or {}
        if gv.name_hint.startswith("q_matmul"):
            # replaced after fusion (replace_projections), with the element-wise ops FuseOps puts
            # after it (kOutEWiseFusable: consumers only) as the kernel's epilogue
            takes = _gemv_for(func, lanes, build=False) or _gemv_for(func, lanes, build=False, interleaved=True)
            return func.with_attr("op_pattern", 4) if takes else None
        if "kiln.rope" in attrs:
            return _rope_for(func)
        kernel = by_symbol.get(str(attrs.get("global_symbol", "")))
        return kernel(func) if kernel is not None else None

    return _replacing_pass("KilnReplaceKernels", replace)


# ---------------------------------------------------------------------------------------- attention
LOG2E = 1.4426950408889634
def _attention_state(D: int, KB: int, VL: int, G: int, key_at, value_at, prefetch=None):
    """Macros for the ``G`` query heads that share one key/value head (grouped-query attention),
    for one query token, over blocks of ``KB`` keys: online softmax in base 2 (TVM's convention:
    scores carry ``log2 e``, ``lse`` is a log2-sum-exp).  Each key and value is read once for the
    whole group: attention over a long cache is bound by these reads.

    ``key_at(kbuf, base, hk, t, d)`` and ``value_at(vbuf, base, hk, t, d)`` load key/value ``t`` of
    the block at ``base`` (a page, or a first row).  ``prefetch(kbuf, next_base, hk, t)``, if
    given, is called once per key with the next block's base (``block``'s ``next_base``).
    """
    NCH = D // VL

    @T.macro
    def start(qv, o, st, Qbuf, qrow, hk, sm_scale):
        for g in T.serial(G):
            for d in T.vectorized(D):
                qv[g, d] = T.Cast("float32", Qbuf[qrow, hk * G + g, d]) * (sm_scale * T.float32(LOG2E))
                o[g, d] = T.float32(0)
            st[g, 0] = T.float32(-5e4)  # running max
            st[g, 1] = T.float32(0)  # running denominator

    @T.macro
    def block(qv, o, s, dot, st, kbuf, vbuf, base, hk, n_rows, next_base=0):
        for g in T.serial(G):
            st[g, 3] = T.float32(-5e4)  # block max
        for t in T.serial(KB):
            if prefetch is not None:
                prefetch(kbuf, next_base, hk, t)
            if t < n_rows:
                for g in T.unroll(G):
                    for l in T.vectorized(VL):
                        dot[l] = qv[g, l] * T.Cast("float32", key_at(kbuf, base, hk, t, l))
                    for c in T.serial(NCH - 1):
                        for l in T.vectorized(VL):
                            dot[l] = dot[l] + qv[g, (c + 1) * VL + l] * T.Cast("float32", key_at(kbuf, base, hk, t, (c + 1) * VL + l))
                    if VL >= 16:
                        for l in T.vectorized(8):
                            dot[l] = dot[l] + dot[l + 8]
                    if VL >= 8:
                        for l in T.vectorized(4):
                            dot[l] = dot[l] + dot[l + 4]
                    if VL >= 4:
                        for l in T.vectorized(2):
                            dot[l] = dot[l] + dot[l + 2]
                    if VL >= 2:
                        s[g, t] = dot[0] + dot[1]
                    else:
                        s[g, t] = dot[0]
                    st[g, 3] = T.max(st[g, 3], s[g, t])
        for g in T.serial(G):
            st[g, 2] = T.max(st[g, 0], st[g, 3])
            st[g, 1] = st[g, 1] * fast_exp2(st[g, 0] - st[g, 2])
            for d in T.vectorized(D):
                o[g, d] = o[g, d] * fast_exp2(st[g, 0] - st[g, 2])
            st[g, 0] = st[g, 2]
            for t in T.vectorized(KB):
                s[g, t] = T.Select(t < n_rows, fast_exp2(s[g, t] - st[g, 0]), T.float32(0))
            for t in T.serial(KB):
                st[g, 1] = st[g, 1] + s[g, t]
        for t in T.serial(n_rows):
            for g in T.unroll(G):
                for d in T.vectorized(D):
                    o[g, d] = o[g, d] + s[g, t] * T.Cast("float32", value_at(vbuf, base, hk, t, d))

    @T.macro
    def finish(o, st, out, lse_buf, qrow, hk, dtype):
        for g in T.serial(G):
            for d in T.vectorized(D):
                out[qrow, hk * G + g, d] = T.Cast(dtype, o[g, d] / T.max(st[g, 1], T.float32(1e-30)))
            lse_buf[qrow, hk * G + g] = st[g, 0] + T.log2(T.max(st[g, 1], T.float32(1e-30)))

    return start, block, finish


def _vector_lanes(head_dim: int) -> int:
    return 16 if head_dim % 16 == 0 else 8 if head_dim % 8 == 0 else 4 if head_dim % 4 == 0 else 1


def _next_page_prefetch(head_dim: int, dtype: str):
    """``prefetch(pages, page, hk, t)``: key and value ``t`` of ``page``, one hint per cache line.
    Issued for the next page at each key step of the current one, the hints keep the cache's
    reads in flight (8 sequences' caches are far larger than the L3, and the hardware prefetcher
    does not follow the page table).  Into L2: into L1 (``prefetcht0``) a batch-8 step's
    attention took 10-20% longer."""
    elem = tvm.DataType(dtype).bits // 8

    def prefetch(buf, page, hk, t):
        for kv in range(2):
            for c in range(-(-head_dim * elem // 64)):
                T.evaluate(_l2_hint(buf[page, kv, hk, t, c * 64 // elem]))
    return prefetch


def decode_attention(num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str, page_size: int):
    """Paged-KV decode attention: one query token per sequence against its cached keys/values.

    Same signature and results (output and log2-sum-exp ``lse``) as TVM's CPU kernel
    ``batch_decode_paged_kv_cpu``, which walks the cache one scalar at a time on one thread.
    Here every (sequence, key/value head) is a task spread over threads, for all the query heads
    that share the key/value head (each cached key is read once per group); a page's scores are
    computed with vectorized dot products, exponentiated together (:func:`fast_exp2`), and one
    online-softmax update per page rescales the vectorized output accumulator.  While a page is
    read, each key's step prefetches the same key and value of the sequence's next page: at 8
    sequences of 300 tokens this halved the time (the caches are read at ~33 GB/s instead of ~18).
    RoPE must have been applied before caching (kiln's models do); the kernel refuses
    ``rotary_mode`` 1.
    """
    H_qo, H_kv, D, PS = num_qo_heads, num_kv_heads, head_dim, page_size
    GROUP = H_qo // H_kv
    VL = _vector_lanes(D)
    start, block, finish = _attention_state(
        D, PS, VL, GROUP, lambda buf, pg, hk, t, d: buf[pg, 0, hk, t, d], lambda buf, pg, hk, t, d: buf[pg, 1, hk, t, d],
        _next_page_prefetch(D, dtype))

    @T.prim_func(s_tir=True, private=True)
    def batch_decode_paged_kv(
        Q_handle: T.handle,
        pages_handle: T.handle,
        page_table_indptr_handle: T.handle,
        page_table_values_handle: T.handle,
        var_length_info: T.handle,
        k_rope_pos_offset_handle: T.handle,
        q_rope_position_handle: T.handle,
        output_handle: T.handle,
        lse_handle: T.handle,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        B = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        Q = T.match_buffer(Q_handle, (B, H_qo, D), dtype)
        pages = T.match_buffer(pages_handle, (max_num_pages, 2, H_kv, PS, D), dtype)
        page_table_indptr = T.match_buffer(page_table_indptr_handle, (B + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_table_values = T.match_buffer(page_table_values_handle, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        k_rope_pos_offset = T.match_buffer(k_rope_pos_offset_handle, (B,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        q_rope_position = T.match_buffer(q_rope_position_handle, (B,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        output = T.match_buffer(output_handle, (B, H_qo, D), dtype)
        lse = T.match_buffer(lse_handle, (B, H_qo), "float32")
        length_info = T.match_buffer(var_length_info, (B,), "int32", elem_offset=length_info_elem_offset)
        assert rotary_mode == 0, "kiln's CPU decode attention expects RoPE applied before caching"

        for task in T.parallel(B * H_kv):
            with T.sblock("attn"):
                T.reads(Q[0:B, 0:H_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:PS, 0:D],
                        page_table_indptr[0:B + 1], page_table_values[0:nnz_pages], length_info[0:B])
                T.writes(output[0:B, 0:H_qo, 0:D], lse[0:B, 0:H_qo])
                qv = T.sblock_alloc_buffer((GROUP, D), "float32")
                o = T.sblock_alloc_buffer((GROUP, D), "float32")
                s = T.sblock_alloc_buffer((GROUP, PS), "float32")
                dot = T.sblock_alloc_buffer((VL,), "float32")
                st = T.sblock_alloc_buffer((GROUP, 4), "float32")
                b: T.let[T.int32] = task // H_kv
                hk: T.let[T.int32] = task % H_kv
                begin: T.let[T.int32] = page_table_indptr[b]
                n_pages: T.let[T.int32] = page_table_indptr[b + 1] - begin
                start(qv, o, st, Q, b, hk, sm_scale)
                for p in T.serial(n_pages):
                    block(qv, o, s, dot, st, pages, pages, page_table_values[begin + p], hk,
                          T.if_then_else(p == n_pages - 1, length_info[b], PS),
                          page_table_values[begin + T.min(p + 1, n_pages - 1)])
                finish(o, st, output, lse, b, hk, dtype)

    return batch_decode_paged_kv


def _decode_attention_for(func: tvm.tirx.PrimFunc):
    """kiln's kernel for TVM's ``batch_decode_paged_kv_cpu`` (no sliding window), or ``None``."""
    params = list(func.params)
    if len(params) != 13:
        return None
    q, pages = params[0], params[1]
    try:
        _, h_qo, d = (_static(x) for x in q.shape)
        _, _, h_kv, page_size, _ = (_static(x) for x in pages.shape)
    except (AttributeError, TypeError, ValueError):
        return None
    if None in (h_qo, d, h_kv, page_size) or h_qo % h_kv:
        return None
    return decode_attention(h_qo, h_kv, d, str(q.dtype), page_size)


@T.macro
def _sequence_of(seq, q_indptr, batch_size, row):
    """``seq[0]`` = the sequence that query token ``row`` of a prefill belongs to."""
    seq[0] = 0
    for bb in T.serial(batch_size):
        if q_indptr[bb + 1] <= row:
            seq[0] = bb + 1


def _visible_keys(causal, k_len, q_indptr, b, row):
    """How many of sequence ``b``'s ``k_len`` keys query token ``row`` sees: all, or (causal)
    those up to its own position, the chunk's queries being the last of the keys' positions."""
    q_len = q_indptr[b + 1] - q_indptr[b]
    return T.if_then_else(causal > 0, T.max(T.min(k_len - q_len + (row - q_indptr[b]) + 1, k_len), 0), k_len)


def prefill_attention(num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str, block_keys: int = 16):
    """Causal self-attention of a prefill chunk (the "ragged" part: the chunk's new tokens among
    themselves; earlier tokens come from the paged kernel and the two are merged by ``lse``).

    Same signature and results as TVM's CPU ``batch_prefill_ragged_kv``, which runs every query
    against every key, scalar, on one thread.  Here every (query token, key/value head) is a task
    spread over threads; it reads only the keys the causal mask lets it see, ``block_keys`` at a time,
    with the block update of :func:`decode_attention`.  RoPE must have been applied before
    (kiln's models do); ``rotary_mode`` 1 is refused.
    """
    H_qo, H_kv, D, KB = num_qo_heads, num_kv_heads, head_dim, block_keys
    GROUP = H_qo // H_kv
    VL = _vector_lanes(D)
    start, block, finish = _attention_state(
        D, KB, VL, GROUP, lambda buf, row, hk, t, d: buf[row + t, hk, d], lambda buf, row, hk, t, d: buf[row + t, hk, d])

    @T.prim_func(s_tir=True, private=True)
    def batch_prefill_ragged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_k: T.handle,
        var_v: T.handle,
        var_kv_indptr: T.handle,
        var_q_rope_position: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        qo_len = T.int32()
        kv_len = T.int32()
        q_indptr_elem_offset = T.int32()
        kv_indptr_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q = T.match_buffer(var_q, (qo_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        k = T.match_buffer(var_k, (kv_len, H_kv, D), dtype)
        v = T.match_buffer(var_v, (kv_len, H_kv, D), dtype)
        kv_indptr = T.match_buffer(var_kv_indptr, (batch_size + 1,), "int32", elem_offset=kv_indptr_elem_offset)
        q_rope_position = T.match_buffer(var_q_rope_position, (qo_len,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        output = T.match_buffer(var_output, (qo_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (qo_len, H_qo), "float32")
        assert rotary_mode == 0, "kiln's CPU prefill attention expects RoPE applied before attention"

        for task in T.parallel(qo_len * H_kv):
            with T.sblock("attn"):
                T.reads(q[0:qo_len, 0:H_qo, 0:D], k[0:kv_len, 0:H_kv, 0:D], v[0:kv_len, 0:H_kv, 0:D],
                        q_indptr[0:batch_size + 1], kv_indptr[0:batch_size + 1])
                T.writes(output[0:qo_len, 0:H_qo, 0:D], lse[0:qo_len, 0:H_qo])
                qv = T.sblock_alloc_buffer((GROUP, D), "float32")
                o = T.sblock_alloc_buffer((GROUP, D), "float32")
                s = T.sblock_alloc_buffer((GROUP, KB), "float32")
                dot = T.sblock_alloc_buffer((VL,), "float32")
                st = T.sblock_alloc_buffer((GROUP, 4), "float32")
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = task // H_kv
                hk: T.let[T.int32] = task % H_kv
                _sequence_of(seq, q_indptr, batch_size, row)
                b: T.let[T.int32] = seq[0]
                k_len: T.let[T.int32] = kv_indptr[b + 1] - kv_indptr[b]
                n_keys: T.let[T.int32] = _visible_keys(causal, k_len, q_indptr, b, row)
                start(qv, o, st, q, row, hk, sm_scale)
                for kb in T.serial((n_keys + KB - 1) // KB):
                    block(qv, o, s, dot, st, k, v, kv_indptr[b] + kb * KB, hk, T.min(KB, n_keys - kb * KB))
                finish(o, st, output, lse, row, hk, dtype)

    return batch_prefill_ragged_kv


def paged_prefill_attention(num_qo_heads: int, num_kv_heads: int, head_dim: int, dtype: str, page_size: int):
    """A prefill chunk's queries against the sequence's cached keys/values (the "paged" part of
    a chunked prefill, a prompt beyond one chunk, a chat's next turn or a prefix-cache hit: the
    tokens before the chunk; the ragged kernel covers the chunk itself and the two are merged by
    ``lse``).

    Same signature and results as TVM's CPU ``batch_prefill_paged_kv_cpu`` (no sliding window),
    which runs every query against every cached key, scalar, on one thread: a 1600-token prompt
    in chunks of 256 prefilled SmolLM2 at 49 tok/s.  Here every (query token, key/value head) is
    a task spread over threads, walking the sequence's pages with the block update and the
    next-page prefetch of :func:`decode_attention`, and reading only the keys the causal mask
    lets it see.  RoPE must have been applied before caching; ``rotary_mode`` 1 is refused.
    """
    H_qo, H_kv, D, PS = num_qo_heads, num_kv_heads, head_dim, page_size
    GROUP = H_qo // H_kv
    VL = _vector_lanes(D)
    start, block, finish = _attention_state(
        D, PS, VL, GROUP, lambda buf, pg, hk, t, d: buf[pg, 0, hk, t, d], lambda buf, pg, hk, t, d: buf[pg, 1, hk, t, d],
        _next_page_prefetch(D, dtype))

    @T.prim_func(s_tir=True, private=True)
    def batch_prefill_paged_kv(
        var_q: T.handle,
        var_q_indptr: T.handle,
        var_pages: T.handle,
        var_page_indptr: T.handle,
        var_page_values: T.handle,
        var_length_info: T.handle,
        var_k_rope_pos_offset: T.handle,
        var_q_rope_position: T.handle,
        var_output: T.handle,
        var_lse: T.handle,
        causal: T.int32,
        rotary_mode: T.int32,
        rope_scale: T.float32,
        rope_theta: T.float32,
        sm_scale: T.float32,
    ):
        T.func_attr({"tirx.is_scheduled": True})
        batch_size = T.int32()
        total_len = T.int32()
        nnz_pages = T.int32()
        max_num_pages = T.int32()
        q_indptr_elem_offset = T.int32()
        page_indptr_elem_offset = T.int32()
        page_values_elem_offset = T.int32()
        k_rope_pos_offset_elem_offset = T.int32()
        q_rope_position_elem_offset = T.int32()
        length_info_elem_offset = T.int32()
        q = T.match_buffer(var_q, (total_len, H_qo, D), dtype)
        q_indptr = T.match_buffer(var_q_indptr, (batch_size + 1,), "int32", elem_offset=q_indptr_elem_offset)
        pages = T.match_buffer(var_pages, (max_num_pages, 2, H_kv, PS, D), dtype)
        page_indptr = T.match_buffer(var_page_indptr, (batch_size + 1,), "int32", elem_offset=page_indptr_elem_offset)
        page_values = T.match_buffer(var_page_values, (nnz_pages,), "int32", elem_offset=page_values_elem_offset)
        length_info = T.match_buffer(var_length_info, (batch_size,), "int32", elem_offset=length_info_elem_offset)
        k_rope_pos_offset = T.match_buffer(var_k_rope_pos_offset, (batch_size,), "int32", elem_offset=k_rope_pos_offset_elem_offset)  # noqa: F841
        q_rope_position = T.match_buffer(var_q_rope_position, (total_len,), "int32", elem_offset=q_rope_position_elem_offset)  # noqa: F841
        output = T.match_buffer(var_output, (total_len, H_qo, D), dtype)
        lse = T.match_buffer(var_lse, (total_len, H_qo), "float32")
        assert rotary_mode == 0, "kiln's CPU prefill attention expects RoPE applied before caching"

        for task in T.parallel(total_len * H_kv):
            with T.sblock("attn"):
                T.reads(q[0:total_len, 0:H_qo, 0:D], pages[0:max_num_pages, 0:2, 0:H_kv, 0:PS, 0:D],
                        q_indptr[0:batch_size + 1], page_indptr[0:batch_size + 1], page_values[0:nnz_pages],
                        length_info[0:batch_size])
                T.writes(output[0:total_len, 0:H_qo, 0:D], lse[0:total_len, 0:H_qo])
                qv = T.sblock_alloc_buffer((GROUP, D), "float32")
                o = T.sblock_alloc_buffer((GROUP, D), "float32")
                s = T.sblock_alloc_buffer((GROUP, PS), "float32")
                dot = T.sblock_alloc_buffer((VL,), "float32")
                st = T.sblock_alloc_buffer((GROUP, 4), "float32")
                seq = T.sblock_alloc_buffer((1,), "int32")
                row: T.let[T.int32] = task // H_kv
                hk: T.let[T.int32] = task % H_kv
                _sequence_of(seq, q_indptr, batch_size, row)
                b: T.let[T.int32] = seq[0]
                begin: T.let[T.int32] = page_indptr[b]
                n_pages: T.let[T.int32] = page_indptr[b + 1] - begin
                k_len: T.let[T.int32] = T.if_then_else(n_pages > 0, (n_pages - 1) * PS + length_info[b], 0)
                n_keys: T.let[T.int32] = _visible_keys(causal, k_len, q_indptr, b, row)
                n_blocks: T.let[T.int32] = (n_keys + PS - 1) // PS
                start(qv, o, st, q, row, hk, sm_scale)
                for p in T.serial(n_blocks):
                    block(qv, o, s, dot, st, pages, pages, page_values[begin + p], hk, T.min(PS, n_keys - p * PS),
                          page_values[begin + T.min(p + 1, n_blocks - 1)])
                finish(o, st, output, lse, row, hk, dtype)

    return batch_prefill_paged_kv


def _paged_prefill_attention_for(func: tvm.tirx.PrimFunc):
    """kiln's kernel for TVM's ``batch_prefill_paged_kv_cpu`` (no sliding window), or ``None``."""
    params = list(func.params)
    if len(params) != 15:
        return None
    q, pages, length_info = params[0], params[2], params[5]
    try:
        _, h_qo, d = (_static(x) for x in q.shape)
        _, _, h_kv, page_size, d_k = (_static(x) for x in pages.shape)
    except (AttributeError, TypeError, ValueError):
        return None
    if None in (h_qo, d, h_kv, page_size, d_k) or h_qo % h_kv or d != d_k or len(length_info.shape) != 1:
        return None
    return paged_prefill_attention(h_qo, h_kv, d, str(q.dtype), page_size)


def _prefill_attention_for(func: tvm.tirx.PrimFunc):
    """kiln's kernel for TVM's ``batch_prefill_ragged_kv`` CPU kernel, or ``None``."""
    params = list(func.params)
    if len(params) != 14:
        return None
    q, k = params[0], params[2]
    try:
        _, h_qo, d = (_static(x) for x in q.shape)
        _, h_kv, d_k = (_static(x) for x in k.shape)
    except (AttributeError, TypeError, ValueError):
        return None
    if None in (h_qo, d, h_kv, d_k) or h_qo % h_kv or d != d_k:
        return None
    return prefill_attention(h_qo, h_kv, d, str(q.dtype))


# ---------------------------------------------------------------------------------------- KV append
def kv_append(num_kv_heads: int, head_dim: int, dtype: str, page_size: int):
    """Write new tokens' keys and values into their cache pages.

    Same signature and results as TVM's ``tir_kv_cache_transpose_append`` (token ``t`` goes to
    slot ``position_map[t]``; -1 skips it).  TVM's kernel is one scalar loop over every element
    that the schedule rules split into parallel chunks: 6-10 us a layer to copy a decode step's
    few hundred values.  Here each token's heads are vector copies, on one thread for a decode
    step's few tokens and in parallel for a prefill's.
    """
    H, D, PS = num_kv_heads, head_dim, page_size

    @T.macro
    def append_token(pages, k_data, v_data, position_map, t):
        if position_map[t] != T.int32(-1):
            for h in T.serial(H):
                for d in T.vectorized(D):
                    pages[position_map[t] // PS, 0, h, position_map[t] % PS, d] = k_data[t, h, d]
                for d in T.vectorized(D):
                    pages[position_map[t] // PS, 1, h, position_map[t] % PS, d] = v_data[t, h, d]

    @T.prim_func(s_tir=True, private=True)
    def tir_kv_cache_transpose_append(var_pages: T.handle, var_k_data: T.handle, var_v_data: T.handle,
                                      var_position_map: T.handle):
        T.func_attr({"tirx.noalias": True, "tirx.is_scheduled": True})
        ntoken = T.int64()
        num_pages = T.int64()
        pages_elem_offset = T.int64()
        position_map_elem_offset = T.int32()
        pages = T.match_buffer(var_pages, (num_pages, 2, H, PS, D), dtype, elem_offset=pages_elem_offset)
        k_data = T.match_buffer(var_k_data, (ntoken, H, D), dtype)
        v_data = T.match_buffer(var_v_data, (ntoken, H, D), dtype)
        position_map = T.match_buffer(var_position_map, (ntoken,), "int32", elem_offset=position_map_elem_offset)
        if ntoken >= PARALLEL_TOKENS:
            for t in T.parallel(ntoken):
                append_token(pages, k_data, v_data, position_map, t)
        else:
            for t in T.serial(ntoken):
                append_token(pages, k_data, v_data, position_map, t)

    return tir_kv_cache_transpose_append


def _kv_append_for(func: tvm.tirx.PrimFunc):
    """kiln's kernel for TVM's ``tir_kv_cache_transpose_append``, or ``None``."""
    params = list(func.params)
    if len(params) != 4:
        return None
    try:
        _, two, h_kv, page_size, d = (_static(x) for x in params[0].shape)
        _, h_k, d_k = (_static(x) for x in params[1].shape)
    except (AttributeError, TypeError, ValueError):
        return None
    if None in (h_kv, page_size, d) or two != 2 or (h_k, d_k) != (h_kv, d):
        return None
    return kv_append(h_kv, d, str(params[0].dtype), page_size)


# ---------------------------------------------------------------------------------------- RoPE
def rope(num_q_heads: int, num_kv_heads: int, head_dim: int, dtype: str, record: dict):
    """The KV cache's RoPE kernel (split fused q/k/v, rotate q and k by their position).

    Same signature and results as TVM's ``llama_rope_with_position_map`` kernel, whose frequency
    expression (``cos``, ``sin`` and a ``pow``) is evaluated for every head and lane: on the CPU
    that is three libm calls per element, the largest cost of attention in a batched decode
    step.  Here the frequencies of a token are evaluated once per rotated pair of dimensions
    (TVM's own frequency functions, so scaled RoPE variants give the same numbers) and applied to
    all its heads with vector arithmetic; a prefill's tokens run in parallel, a decode step's few
    on one thread (a parallel region costs more than their work).  ``record`` holds the
    parameters the kernel was built from (``kiln.rope``, see :func:`kiln.modeling._annotate_rope`).
    """
    from tvm.relax.frontend.nn.llm.position_embedding import switch_rope_freq_func

    scaling = record.get("rope_scaling") or {}
    if scaling.get("rope_type") in ("gptj", "longrope"):  # other pairings / extra factors: keep TVM's
        raise ValueError("RoPE variant not supported by the hand-written kernel")
    R = int(record["rotary_dim"])
    half = R // 2
    if R % 2 or R > head_dim:
        raise ValueError("rotary_dim not supported by the hand-written kernel")
    freq_func = switch_rope_freq_func(scaling)
    scale = float(record["scale"])
    theta = float(record["theta"])
    H = num_q_heads + 2 * num_kv_heads
    # dimensions d and d + R/2 rotate together by one angle in these variants (their frequency
    # functions depend on d * 2 % R): evaluate it once; others evaluate every dimension
    NF = half if scaling.get("rope_type") in (None, "default", "llama3", "yarn") else R
    SH = half % NF  # where the second half's angles start

    def factor(pos, d, which):
        """``cos`` (``which`` 0) or ``sin`` (1) of the rotation of dimension ``d`` at ``pos``."""
        cos_f, sin_f, var_map = freq_func(T.Cast("float32", pos) * T.float32(scale), d, R, theta, "float32")
        expr = cos_f if which == 0 else sin_f
        for var, value in var_map.items():
            expr = tvm.tirx.Let(var, value, expr)
        return expr

    def rotated(qkv, s, h, d, cs, sn, first_half):
        """Element ``d`` (first half) or ``d + half`` (second) of head ``h``, rotated."""
        if first_half:
            return T.Cast(dtype, cs[d] * T.Cast("float32", qkv[s, h, d]) - sn[d] * T.Cast("float32", qkv[s, h, d + half]))
        return T.Cast(dtype, cs[d + SH] * T.Cast("float32", qkv[s, h, d + half]) + sn[d + SH] * T.Cast("float32", qkv[s, h, d]))

    @T.macro
    def rope_token(qkv, position_map, q, k, v, apply_rope, s):
        with T.sblock("rope"):
            T.reads(qkv[s, 0:H, 0:head_dim], position_map[s])
            T.writes(q[s, 0:num_q_heads, 0:head_dim], k[s, 0:num_kv_heads, 0:head_dim], v[s, 0:num_kv_heads, 0:head_dim])
            cs = T.sblock_alloc_buffer((NF,), "float32")
            sn = T.sblock_alloc_buffer((NF,), "float32")
            for d in T.serial(NF):
                cs[d] = T.if_then_else(apply_rope > T.int64(0), factor(position_map[s], d, 0), T.float32(1))
                sn[d] = T.if_then_else(apply_rope > T.int64(0), factor(position_map[s], d, 1), T.float32(0))
            for h in T.serial(num_q_heads):
                for d in T.vectorized(half):
                    q[s, h, d] = rotated(qkv, s, h, d, cs, sn, True)
                for d in T.vectorized(half):
                    q[s, h, d + half] = rotated(qkv, s, h, d, cs, sn, False)
                if head_dim > R:
                    for d in T.vectorized(head_dim - R):
                        q[s, h, R + d] = qkv[s, h, R + d]
            for h in T.serial(num_kv_heads):
                for d in T.vectorized(half):
                    k[s, h, d] = rotated(qkv, s, num_q_heads + h, d, cs, sn, True)
                for d in T.vectorized(half):
                    k[s, h, d + half] = rotated(qkv, s, num_q_heads + h, d, cs, sn, False)
                if head_dim > R:
                    for d in T.vectorized(head_dim - R):
                        k[s, h, R + d] = qkv[s, h + num_q_heads, R + d]
                for d in T.vectorized(head_dim):
                    v[s, h, d] = qkv[s, num_q_heads + num_kv_heads + h, d]

    @T.prim_func(s_tir=True, private=True)
    def fused_rope(var_qkv: T.handle, var_position_map: T.handle, var_q: T.handle, var_k: T.handle,
                   var_v: T.handle, apply_rope: T.int64):
        T.func_attr({"op_pattern": 8, "tirx.noalias": True, "tirx.is_scheduled": True})
        seq_len = T.int32()
        position_map_elem_offset = T.int32()
        qkv = T.match_buffer(var_qkv, (seq_len, H, head_dim), dtype)
        q = T.match_buffer(var_q, (seq_len, num_q_heads, head_dim), dtype)
        k = T.match_buffer(var_k, (seq_len, num_kv_heads, head_dim), dtype)
        v = T.match_buffer(var_v, (seq_len, num_kv_heads, head_dim), dtype)
        position_map = T.match_buffer(var_position_map, (seq_len,), "int32", elem_offset=position_map_elem_offset)
        if seq_len >= PARALLEL_TOKENS:
            for s in T.parallel(seq_len):
                rope_token(qkv, position_map, q, k, v, apply_rope, s)
        else:
            for s in T.serial(seq_len):
                rope_token(qkv, position_map, q, k, v, apply_rope, s)

    return fused_rope


def _rope_for(func: tvm.tirx.PrimFunc):
    """kiln's kernel for TVM's RoPE kernel annotated with ``kiln.rope``, or ``None``."""
    import json

    record = func.attrs.get("kiln.rope") if func.attrs is not None else None
    params = list(func.params)
    if record is None or len(params) != 6:
        return None
    qkv, _, q, k = params[:4]
    try:
        d, n_q, n_kv = _static(qkv.shape[2]), _static(q.shape[1]), _static(k.shape[1])
        if None in (d, n_q, n_kv):
            return None
        return rope(n_q, n_kv, d, str(qkv.dtype), json.loads(str(record)))
    except (AttributeError, TypeError, ValueError, KeyError):
        return None
