"""Transformer graph fusion of an exported graph: attention, LayerNorm, GELU and skip-LayerNorm kernels.

Two passes run on the traced graph before it is saved and parity-checked (so parity covers them):

1. **Attention** (ours): ``MatMul(Q, K^T) * scale -> Softmax -> MatMul(., V)`` between the
   per-head reshapes becomes one ``com.microsoft.MultiHeadAttention`` node (ONNX Runtime's fused
   CPU/CUDA kernel). ONNX Runtime's own attention fusion (``FusionAttention``) expects BERT's
   ``Div`` by sqrt(head size) and a mask path; transformers 5 multiplies by the scale (or splits it
   over Q and K for SDPA), DINOv2 puts LayerScale between the projection and the residual, and
   torchvision's ``nn.MultiheadAttention`` traces sequence-first with a packed projection, so it
   matches none of them. The pattern here starts from the Softmax and only needs the three
   ``[B, S, D]`` projections, the head split (``Reshape -> Transpose``) and the head merge; an
   ``Add`` of a 4-D constant (or of one repeated over the batch) between the scale and the Softmax
   becomes the kernel's ``attention_bias`` (Swin's relative-position bias and shifted-window mask), and
   so does a 4-D bias the graph computes apart from the scores (SAM's encoder: the decomposed
   relative-position bias, computed from the query). torchvision's ``nn.MultiheadAttention``, Swin's
   window attention and SAM's encoder attention are traced through
   export-only drop-ins (``plain.py``, the same weights) so that they have that shape too.
2. (``fuse="all"`` only) **LayerNorm / SkipLayerNorm / BiasGelu** (ONNX Runtime's transformer optimizer,
   ``onnxruntime.transformers.optimizer.optimize_by_fusion``), with shape inference off (it
   cannot follow the dynamic reshapes) and without the tanh GELU approximation (it changes numerics).

CNN graphs are left alone: ONNX Runtime's own session-level optimizer covers them.
"""
from __future__ import annotations

import contextlib
import contextvars
import logging
from collections import Counter
from typing import Any, Iterator

import numpy as np

log = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"
# "attention": pass 1 only (the default); "all": passes 1 and 2; "none": the graph as traced.
# Pass 2 is off by default because it measured slower on CPU (bench/session_options.py, ONNX
# Runtime 1.32, 1 thread, dinov2_small batch 1: traced 88 ms, + attention 89-90 ms, + LayerNorm/GELU
# 96 ms, + SkipLayerNorm alone 97 ms): ONNX Runtime's session-level ORT_ENABLE_ALL already fuses
# LayerNorm and folds the biases into FusedMatMul, which the offline SkipLayerNormalization prevents.
FUSION_LEVELS = ("attention", "all", "none")
DEFAULT_FUSION = "attention"
_LEVEL: contextvars.ContextVar[str] = contextvars.ContextVar("vfm_export_fusion", default=DEFAULT_FUSION)


def fusion_level(fuse: bool | str) -> str:
    """``True`` -> the default level, ``False`` -> "none", or one of ``FUSION_LEVELS``."""
    level = (DEFAULT_FUSION if fuse else "none") if isinstance(fuse, bool) else str(fuse).strip().lower()
    if level not in FUSION_LEVELS:
        raise ValueError(f"fuse must be one of {', '.join(FUSION_LEVELS)} (or true/false), got {fuse!r}.")
    return level


@contextlib.contextmanager
def fusion(fuse: bool | str) -> Iterator[None]:
    """The fusion level of the exports made inside (``vfm export --fuse LEVEL`` / ``--no-fuse``)."""
    token = _LEVEL.set(fusion_level(fuse))
    try:
        yield
    finally:
        _LEVEL.reset(token)


def current_fusion() -> str:
    return _LEVEL.get()


def fusion_enabled() -> bool:
    return _LEVEL.get() != "none"


def is_transformer(module: Any) -> bool:
    """Fusion applies to modules with attention: LayerNorm-ed ones (ViT, DINOv2, Swin, SAM's encoder).

    CNNs with LayerNorm (ConvNeXt) are fused too; the passes only rewrite what they match.
    """
    import torch

    return any(isinstance(m, (torch.nn.LayerNorm, torch.nn.MultiheadAttention)) for m in module.modules())


# ONNX Runtime session options an export records in config.json "session" and every replica
# opens its sessions with (``backends.onnx.session_options``; a replica's own ``num_threads``
# wins). Chosen with ``bench/session_options.py --threads 1 --clock cpu`` on the vit_b_16 and
# dinov2_small exports, batch 1, CPU time relative to these defaults: level extended 1.00 / 0.99,
# level basic 1.03 / 1.03, parallel execution 2.05 / 2.01 (its inter-op pool spins on a graph
# that is one chain of layers), no arena / memory pattern 1.30 / 1.35. Threads stay the
# replica's choice (null: one per core).
SESSION_DEFAULTS: dict[str, Any] = {"graph_optimization_level": "all", "execution_mode": "sequential",
                                    "enable_cpu_mem_arena": True, "enable_mem_pattern": True,
                                    "intra_op_threads": None}


def session_defaults() -> dict[str, Any]:
    return dict(SESSION_DEFAULTS)


# ---- pass 1: attention -> com.microsoft.MultiHeadAttention ------------------------------------

class _Graph:
    def __init__(self, model: Any):
        self.model = model
        self.graph = model.graph
        self.inits = {t.name: t for t in self.graph.initializer}
        self.refresh()

    def refresh(self) -> None:
        self.producer = {o: n for n in self.graph.node for o in n.output}
        self.consumers: dict[str, list[Any]] = {}
        for n in self.graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.outputs = {o.name for o in self.graph.output}

    def parent(self, node: Any, index: int, op: str) -> Any:
        if index >= len(node.input):
            return None
        p = self.producer.get(node.input[index])
        return p if p is not None and p.op_type == op else None

    def only_consumer(self, name: str) -> Any:
        users = self.consumers.get(name, [])
        return users[0] if len(users) == 1 and name not in self.outputs else None

    def constant(self, name: str) -> np.ndarray | None:
        from onnx import numpy_helper

        if name in self.inits:
            return numpy_helper.to_array(self.inits[name])
        node = self.producer.get(name)
        if node is not None and node.op_type == "Identity":
            return self.constant(node.input[0])
        if node is not None and node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    return numpy_helper.to_array(a.t)
        return None


def _perm(node: Any) -> list[int] | None:
    for a in node.attribute:
        if a.name == "perm":
            return list(a.ints)
    return None


def _is(node: Any, op: str, perm: list[int] | None = None) -> bool:
    return node is not None and node.op_type == op and (perm is None or _perm(node) == perm)


def _scalar(g: _Graph, node: Any) -> tuple[float, int] | None:
    """(value, index of the other input) of a Mul/Div by a scalar constant."""
    for i in (0, 1):
        value = g.constant(node.input[i])
        if value is not None and value.size == 1:
            if node.op_type == "Div" and i == 0:
                return None
            v = float(value.reshape(()))
            return (1.0 / v if node.op_type == "Div" else v), 1 - i
    return None


def _heads(g: _Graph, reshape: Any) -> tuple[int, int] | None:
    """(num_heads, head_size) of a ``[B, S, D] -> [B, S, N, H]`` Reshape, from its shape constant."""
    shape = g.constant(reshape.input[1])
    if shape is not None:
        dims = [int(x) for x in shape.reshape(-1)]
        if len(dims) != 4 or dims[3] <= 0:
            return None
        if dims[2] == -1:
            width = _width(g, reshape.input[0])
            dims[2] = width // dims[3] if width and width % dims[3] == 0 else 0
        return (dims[2], dims[3]) if dims[2] > 0 else None
    concat = g.producer.get(reshape.input[1])
    if concat is None or concat.op_type != "Concat" or len(concat.input) != 4:
        return None
    n, h = (g.constant(i) for i in concat.input[2:])
    n = int(n.reshape(-1)[0]) if n is not None and n.size == 1 else -1
    h = int(h.reshape(-1)[0]) if h is not None and h.size == 1 else -1
    if (n > 0) == (h > 0):
        return (n, h) if n > 0 else None
    # transformers: view(..., -1, head_dim); SAM's decoder: reshape(b, n, heads, c // heads)
    width = _width(g, reshape.input[0])
    known = max(n, h)
    if not width or width % known:
        return None
    return (n, width // n) if n > 0 else (width // h, h)


def _width(g: _Graph, name: str) -> int | None:
    """The last dimension of a linear projection's output (its bias or weight constant)."""
    node = g.producer.get(name)
    if node is not None and node.op_type == "Add":
        for i in node.input:
            value = g.constant(i)
            if value is not None and value.ndim == 1:
                return int(value.shape[0])
        node = next((g.producer.get(i) for i in node.input if _is(g.producer.get(i), "MatMul")), None)
    if node is not None and node.op_type == "MatMul":
        value = g.constant(node.input[1])
        if value is not None and value.ndim == 2:
            return int(value.shape[1])
    return None


def _depends_on(g: _Graph, name: str, node: Any, depth: int = 6) -> bool:
    """Whether tensor ``name`` is computed from ``node``'s output within ``depth`` steps."""
    if depth < 0:
        return False
    producer = g.producer.get(name)
    if producer is None:
        return False
    return producer is node or any(_depends_on(g, i, node, depth - 1) for i in producer.input)


def _split_heads(g: _Graph, node: Any, perm: list[int]) -> tuple[str, Any] | None:
    """``Transpose(perm) <- Reshape <- x`` -> (x, reshape): x is [B, S, D]."""
    if not _is(node, "Transpose", perm):
        return None
    reshape = g.parent(node, 0, "Reshape")
    return (reshape.input[0], reshape) if reshape is not None else None


def _match_attention(g: _Graph, softmax: Any) -> dict[str, Any] | None:
    from onnx import helper

    axis = next((helper.get_attribute_value(a) for a in softmax.attribute if a.name == "axis"), -1)
    if axis not in (-1, 3):
        return None
    pv = g.only_consumer(softmax.output[0])
    if not _is(pv, "MatMul") or pv.input[0] != softmax.output[0]:
        return None
    removed = [softmax, pv]
    # Shape readers (the exporter's size arithmetic) are allowed: fuse_attention checks they die with it
    users = [u for u in g.consumers.get(pv.output[0], []) if u.op_type != "Shape"]
    merge = users[0] if len(users) == 1 and pv.output[0] not in g.outputs else None
    if _is(merge, "Reshape"):  # SDPA's symbolic reshapes its output to the query's own shape: a no-op here
        shape = next((u for u in g.consumers[pv.output[0]] if u.op_type == "Shape"), None)
        if shape is None or not _depends_on(g, merge.input[1], shape):
            return None
        removed.append(merge)
        merge = g.only_consumer(merge.output[0])
    if not _is(merge, "Transpose", [0, 2, 1, 3]):
        return None
    out = g.only_consumer(merge.output[0])
    if not _is(out, "Reshape"):
        return None
    v = _split_heads(g, g.producer.get(pv.input[1]), [0, 2, 1, 3])
    if v is None:
        return None
    removed += [merge, out]
    scale = 1.0
    node = g.producer.get(softmax.input[0])
    bias = bias_heads = None
    if node is not None and node.op_type == "Add":                # (Q K^T) * scale + attention bias
        found = _attention_bias(g, node)
        if found is None:
            return None
        bias, scores, bias_heads = found
        removed.append(node)
        node = g.producer.get(scores)
    if node is not None and node.op_type in ("Mul", "Div"):       # (Q K^T) * scale
        found = _scalar(g, node)
        if found is None:
            return None
        scale, other = found
        removed.append(node)
        node = g.producer.get(node.input[other])
    if not _is(node, "MatMul"):
        return None
    qk = node
    removed.append(qk)
    sides = []
    for index in (0, 1):
        side = g.producer.get(qk.input[index])
        if side is not None and side.op_type == "Mul":            # SDPA: (Q * sqrt s) (K^T * sqrt s)
            found = _scalar(g, side)
            if found is None:
                return None
            scale *= found[0]
            removed.append(side)
            side = g.producer.get(side.input[found[1]])
        sides.append(side)
    q = _split_heads(g, sides[0], [0, 2, 1, 3])
    k = _split_heads(g, sides[1], [0, 2, 3, 1])
    if k is None and _is(sides[1], "Transpose", [0, 1, 3, 2]):
        k = _split_heads(g, g.producer.get(sides[1].input[0]), [0, 2, 1, 3])
        if k is not None:
            removed.append(sides[1])
            sides[1] = g.producer.get(sides[1].input[0])
    if q is None or k is None:
        return None
    # the head splits (Transpose <- Reshape) are left to the pruning: another reader may keep them
    heads = {_heads(g, r) for _, r in (q, k, v)}
    if len(heads) != 1 or None in heads:
        return None
    num_heads, head_size = heads.pop()
    if bias_heads is not None and bias_heads not in (1, num_heads):  # a computed bias: per head or for all
        return None
    # every intermediate must feed only this attention (a Shape may read it: checked after pruning)
    inner = {o for n in removed for o in n.output} - {out.output[0]}
    strangers = [u.op_type for name in inner for u in g.consumers.get(name, [])
                 if u not in removed and u.op_type != "Shape"]
    if strangers or inner & g.outputs:
        log.debug("attention at %s not fused: its intermediates are also read by %s", softmax.name, strangers)
        return None
    return {"q": q[0], "k": k[0], "v": v[0], "out": out.output[0], "num_heads": num_heads, "scale": scale,
            "head_size": head_size, "bias": bias, "removed": removed}


def _attention_bias(g: _Graph, add: Any) -> tuple[str, str, int | None] | None:
    """(bias, scores, heads) of ``scores + bias`` before a Softmax, where bias is a ``[B or 1, N or 1,
    S, T]`` constant or such a constant repeated over the batch (``Tile``, ``Expand``; heads None), or a
    bias computed apart from the scores (heads: its N): MultiHeadAttention's attention_bias (Swin's
    relative-position bias and shifted-window mask, SAM's decomposed relative-position bias)."""
    for i in (0, 1):
        scores = g.producer.get(add.input[i])
        if scores is None or scores.op_type not in ("Mul", "Div", "MatMul"):
            continue
        if scores.op_type != "MatMul" and _scalar(g, scores) is None:
            continue
        name = source = add.input[1 - i]
        value = g.constant(source)
        for _ in range(2):       # torch's repeat traces as Tile(Expand(constant, ones)) in the batch's size
            repeat = g.producer.get(source)
            if value is not None or not (_is(repeat, "Tile") or _is(repeat, "Expand")):
                break
            source = repeat.input[0]
            value = g.constant(source)
        if value is not None and value.ndim == 4:
            return name, add.input[i], None
        heads = _computed_bias(g, name, add) if value is None else None
        if heads is not None:
            return name, add.input[i], heads
    return None


def _computed_bias(g: _Graph, name: str, add: Any) -> int | None:
    """The head count N when ``name`` is an attention bias computed in the graph (SAM's encoder: the
    decomposed relative-position bias, from the query): a Reshape to ``[-1 or B, N, S, T]`` (a constant
    shape) that does not read the scores it is added to; None when it is not."""
    reshape = g.producer.get(name)
    shape = g.constant(reshape.input[1]) if _is(reshape, "Reshape") else None
    # [., N, S, T] with S, T > 1: not a padding mask broadcast over the queries ([B, 1, 1, T]), which
    # attention_bias does not take; N is checked against the heads once they are known
    if shape is None or shape.size != 4 or any(int(d) <= 1 for d in shape.reshape(-1)[2:]) or \
            int(shape.reshape(-1)[1]) <= 0:
        return None
    scores = {i for i in add.input if i != name}
    seen, stack = set(), [name]
    while stack:                       # the bias must come from before the scores, not from them
        tensor = stack.pop()
        if tensor in scores:
            return None
        node = g.producer.get(tensor)
        if node is None or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.input)
    return int(shape.reshape(-1)[1])


def fuse_attention(model: Any) -> int:
    """Replace every matched attention core of ``model`` (in place); returns how many."""
    from onnx import helper

    original = type(model)()
    original.CopyFrom(model)
    g = _Graph(model)
    fused = 0
    for softmax in [n for n in g.graph.node if n.op_type == "Softmax"]:
        match = _match_attention(g, softmax)
        if match is None:
            continue
        # where the last removed node was: every input (a computed attention bias too) is made before it
        index = max(list(g.graph.node).index(n) for n in match["removed"]) - (len(match["removed"]) - 1)
        inputs = [match["q"], match["k"], match["v"]] + (["", "", match["bias"]] if match["bias"] else [])
        node = helper.make_node("MultiHeadAttention", inputs, [match["out"]],
                                name=f"{softmax.name or 'attention'}_fused_mha", domain=MS_DOMAIN,
                                num_heads=match["num_heads"], scale=float(match["scale"]))
        for n in match["removed"]:
            g.graph.node.remove(n)
        g.graph.node.insert(index, node)
        g.refresh()
        fused += 1
    if fused:
        _prune(g)
        known = {i.name for i in g.graph.input} | set(g.inits) | {""} | set(g.producer)
        dangling = sorted({i for n in g.graph.node for i in n.input if i not in known})
        if dangling:  # a removed tensor is still read somewhere: keep the graph as traced
            log.warning("attention fusion skipped: it would leave %s unproduced", dangling[:3])
            model.CopyFrom(original)
            return 0
        if not any(o.domain == MS_DOMAIN for o in model.opset_import):
            model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    return fused


def _prune(g: _Graph) -> None:
    """Drop nodes whose outputs nobody reads (the head-split shape arithmetic left behind)."""
    while True:
        dead = [n for n in g.graph.node
                if not any(o in g.outputs or g.consumers.get(o) for o in n.output)]
        if not dead:
            return
        for n in dead:
            g.graph.node.remove(n)
        g.refresh()


# ---- pass 2: ONNX Runtime's LayerNorm / GELU fusions -------------------------------------------

@contextlib.contextmanager
def _quiet_optimizer() -> Iterator[None]:
    """ONNX Runtime's fusion modules log as top-level names ("fusion_utils", "onnx_model_bert", ...)
    and warn about the shape inference turned off here: keep them to errors while they run."""
    import sys

    loggers = [logger for name, logger in logging.root.manager.loggerDict.items()
               if isinstance(logger, logging.Logger) and "onnxruntime" in
               str(getattr(sys.modules.get(name), "__file__", "") or "").replace("\\", "/").split("site-packages/")[-1]]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def fuse_transformer(model: Any, level: str | None = None) -> tuple[Any, dict[str, int]]:
    """The passes of ``level`` (default: the current one) on ``model`` (a ModelProto), in place
    where possible; returns the fused model and the fused-op counts."""
    from onnx import helper
    from onnxruntime.transformers.fusion_options import FusionOptions
    from onnxruntime.transformers.optimizer import optimize_by_fusion

    level = level or current_fusion()
    if level == "none":
        return model, {}
    attention = fuse_attention(model)
    if level == "attention":
        return model, ({"MultiHeadAttention": attention} if attention else {})
    options = FusionOptions("vit")
    options.enable_attention = False          # pass 1 did it; FusionAttention matches none of these graphs
    options.enable_shape_inference = False     # symbolic shape inference fails on the dynamic reshapes
    options.enable_gelu_approximation = False
    options.enable_embed_layer_norm = False
    options.enable_rotary_embeddings = False
    # From opset 17 the exporter writes nn.LayerNorm as LayerNormalization already; what is left for
    # the LayerNorm fusions is hand-written channels-first norms (SAM's LayerNorm2d), which the RMSNorm
    # fusion turns into a SimplifiedLayerNormalization over C, H and W (wrong, and not a valid ONNX op).
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    options.enable_layer_norm = opset < 17
    with _quiet_optimizer():
        optimized = optimize_by_fusion(model, "vit", 0, 0, options)
    if any(n.domain == MS_DOMAIN for n in optimized.model.graph.node) and \
            not any(o.domain == MS_DOMAIN for o in optimized.model.opset_import):
        optimized.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    stats = {k: int(v) for k, v in optimized.get_fused_operator_statistics().items() if v}
    if attention:
        stats["MultiHeadAttention"] = attention
    counts = Counter(n.op_type for n in optimized.model.graph.node)
    log.info("transformer fusion: %s (%d nodes left)", stats, sum(counts.values()))
    return optimized.model, dict(sorted(stats.items()))
