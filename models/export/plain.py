"""Pass 0 of the transformer fusion (``optimize.py``): export-only drop-ins that trace attention in
the form pass 1 fuses, sharing the weights of the modules they stand in for.

- torchvision's ``nn.MultiheadAttention`` (ViT-B/16): batch-first, per-head matmuls (``_PlainSelfAttention``).
- torchvision's Swin v1 ``ShiftedWindowAttention``: the relative-position bias and the shifted-window
  mask as one constant, the shift and window partition as one token Gather (``_PlainWindowAttention``);
  ``PatchMerging`` as one space-to-depth (``_PlainPatchMerging``).
- segment-anything's image encoder: the decomposed relative-position bias as a graph tensor beside
  the scores (``_PlainRelPosAttention``), the blocks' window partition from plain numbers and their
  residual stream as ``[B, S, C]`` tokens (``_PlainSamBlock``).

They are swapped in only while tracing (``plain_attention``); parity then compares the graph with
the modules as PyTorch serves them.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np

from .optimize import fusion_enabled

# ---- pass 0: trace torchvision's nn.MultiheadAttention in a fusable form ---------------------

class _PlainSelfAttention:
    """Factory of a drop-in for a batch-first self-attention ``nn.MultiheadAttention`` (export only)."""

    @staticmethod
    def make(mha: Any) -> Any:
        import torch
        import torch.nn.functional as F

        class PlainSelfAttention(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.mha = mha

            def forward(self, query: Any, key: Any, value: Any, need_weights: bool = False, **_: Any) -> Any:
                m = self.mha
                d, heads = m.embed_dim, m.num_heads
                w, b = m.in_proj_weight, m.in_proj_bias
                q = F.linear(query, w[:d], None if b is None else b[:d])
                k = F.linear(key, w[d:2 * d], None if b is None else b[d:2 * d])
                v = F.linear(value, w[2 * d:], None if b is None else b[2 * d:])
                batch, seq = query.shape[0], query.shape[1]
                q = q.reshape(batch, seq, heads, d // heads).permute(0, 2, 1, 3)
                k = k.reshape(batch, key.shape[1], heads, d // heads).permute(0, 2, 3, 1)
                v = v.reshape(batch, key.shape[1], heads, d // heads).permute(0, 2, 1, 3)
                attn = torch.softmax(torch.matmul(q, k) * (float(d // heads) ** -0.5), dim=-1)
                out = torch.matmul(attn, v).permute(0, 2, 1, 3).reshape(batch, seq, d)
                return m.out_proj(out), None

        return PlainSelfAttention()


class _PlainWindowAttention:
    """Factory of a drop-in for torchvision's Swin (v1) ``ShiftedWindowAttention`` (export only).

    torchvision's ``shifted_window_attention`` traces into a graph that rebuilds the shifted-window
    mask on every call (ScatterND, Range, Where on shapes), pads by amounts computed from the shape,
    and takes Q, K and V out of one packed projection by a 5-D Transpose and three Gathers. This
    computes the same attention from the sizes of the traced input (the classifier's crop is fixed, only
    the batch is dynamic): the relative-position bias plus the shift mask is one constant
    ``[windows or 1, heads, S, S]`` (repeated over the batch's images), Q, K and V are three
    projections of the same packed weights, and the core has the shape pass 1 fuses, with the bias as
    ``MultiHeadAttention``'s ``attention_bias``.
    """

    @staticmethod
    def make(attn: Any) -> Any:
        import torch
        import torch.nn.functional as F

        class PlainWindowAttention(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn = attn

            def bias(self, pad_h: int, pad_w: int, shift: list[int]) -> Any:
                """Relative-position bias [1, nH, S, S], plus the shift mask: [nW, nH, S, S]."""
                a = self.attn
                wh, ww = a.window_size
                bias = a.get_relative_position_bias()                      # [1, nH, S, S]
                if sum(shift) == 0:
                    return bias
                # torchvision's mask, built here from plain numbers (a constant of the graph)
                region = np.zeros((pad_h, pad_w), dtype=np.float32)
                count = 0
                for h in ((0, -wh), (-wh, -shift[0]), (-shift[0], None)):
                    for w in ((0, -ww), (-ww, -shift[1]), (-shift[1], None)):
                        region[h[0]:h[1], w[0]:w[1]] = count
                        count += 1
                region = region.reshape(pad_h // wh, wh, pad_w // ww, ww).transpose(0, 2, 1, 3).reshape(-1, wh * ww)
                mask = np.where(region[:, None, :] - region[:, :, None] != 0, -100.0, 0.0).astype(np.float32)
                return bias + torch.from_numpy(mask).to(bias.dtype)[:, None]   # [nW, nH, S, S]

            def forward(self, x: Any) -> Any:
                a = self.attn
                _, height, width, channels = (int(d) for d in x.shape)   # the crop is fixed: plain numbers
                wh, ww = a.window_size
                heads, head = a.num_heads, channels // a.num_heads
                pad_r, pad_b = (ww - width % ww) % ww, (wh - height % wh) % wh
                if pad_r or pad_b:
                    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
                pad_h, pad_w = height + pad_b, width + pad_r
                shift = [0 if wh >= pad_h else a.shift_size[0], 0 if ww >= pad_w else a.shift_size[1]]
                windows, size = (pad_h // wh) * (pad_w // ww), wh * ww
                # the cyclic shift and the window partition are one permutation of the tokens: one Gather
                # (and its inverse one Gather back) instead of Slice/Concat rolls and 6-D Transposes
                order = np.roll(np.arange(pad_h * pad_w).reshape(pad_h, pad_w), (-shift[0], -shift[1]), (0, 1))
                order = order.reshape(pad_h // wh, wh, pad_w // ww, ww).transpose(0, 2, 1, 3).reshape(-1)
                x = x.reshape(-1, pad_h * pad_w, channels).index_select(1, torch.from_numpy(order))
                x = x.reshape(-1, size, channels)                             # [B * nW, S, C]
                w, b = a.qkv.weight, a.qkv.bias
                c = channels
                q = F.linear(x, w[:c], None if b is None else b[:c])
                k = F.linear(x, w[c:2 * c], None if b is None else b[c:2 * c])
                v = F.linear(x, w[2 * c:], None if b is None else b[2 * c:])
                q = q.reshape(-1, size, heads, head).permute(0, 2, 1, 3)
                k = k.reshape(-1, size, heads, head).permute(0, 2, 3, 1)
                v = v.reshape(-1, size, heads, head).permute(0, 2, 1, 3)
                bias = self.bias(pad_h, pad_w, shift)
                if bias.shape[0] > 1:                                          # one bias per window, every image
                    bias = bias.repeat(x.shape[0] // windows, 1, 1, 1)
                scores = torch.matmul(q, k) * (float(head) ** -0.5) + bias
                out = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(-1, size, c)
                out = a.proj(out).reshape(-1, pad_h * pad_w, c)
                out = out.index_select(1, torch.from_numpy(np.argsort(order))).reshape(-1, pad_h, pad_w, c)
                if pad_r or pad_b:
                    out = out[:, :height, :width, :]
                return out

        return PlainWindowAttention()


class _PlainPatchMerging:
    """Factory of a drop-in for torchvision's Swin (v1) ``PatchMerging`` (export only): the 2x2
    neighbourhoods go to channels by one Reshape/Transpose (a space-to-depth) instead of four
    strided Slices and a Concat, in torchvision's channel order (x0 x1 x2 x3 = row, column offsets
    00 10 01 11)."""

    @staticmethod
    def make(merging: Any) -> Any:
        import torch
        import torch.nn.functional as F

        class PlainPatchMerging(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.merging = merging

            def forward(self, x: Any) -> Any:
                _, height, width, channels = (int(d) for d in x.shape)   # the crop is fixed: plain numbers
                if height % 2 or width % 2:
                    x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
                h, w = (height + height % 2) // 2, (width + width % 2) // 2
                x = x.reshape(-1, h, 2, w, 2, channels).permute(0, 1, 3, 4, 2, 5).reshape(-1, h, w, 4 * channels)
                return self.merging.reduction(self.merging.norm(x))

        return PlainPatchMerging()


class _PlainRelPosAttention:
    """Factory of a drop-in for segment-anything's image-encoder ``Attention`` (export only).

    SAM's encoder attention adds MViTv2's decomposed relative-position bias to the scores, and that
    bias is computed *from the query*: ``rel_h[b, n, y, x, kh] = q[b, n, y, x] . Rh[y, kh]`` (and
    ``rel_w`` likewise over columns), broadcast to ``[B, N, S, S]``. As traced, the 5-D views of the
    scores and the einsums sit between the scale and the Softmax, so the core matches no fusion. This
    computes the same numbers with the bias as its own graph tensor (two batched MatMuls and one
    broadcast Add from the per-head query, ``Rh``/``Rw`` folded into constants for the fixed window or
    grid) that is then added to ``(Q K^T) * scale``: the shape pass 1 fuses, with the bias as
    ``MultiHeadAttention``'s ``attention_bias``. The token grid is fixed (the encoder's input is
    always padded to its square size; windows are padded to whole windows), only the batch is dynamic.
    """

    @staticmethod
    def make(attn: Any) -> Any:
        import torch
        import torch.nn.functional as F
        from segment_anything.modeling.image_encoder import get_rel_pos

        class PlainRelPosAttention(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.attn = attn

            def forward(self, x: Any) -> Any:
                a = self.attn
                _, height, width, channels = (int(d) for d in x.shape)   # fixed grid: plain numbers
                heads = a.num_heads
                head, size = channels // heads, height * width
                x = x.reshape(-1, size, channels)
                w, b = a.qkv.weight, a.qkv.bias
                c = channels
                q = F.linear(x, w[:c], None if b is None else b[:c])
                k = F.linear(x, w[c:2 * c], None if b is None else b[c:2 * c])
                v = F.linear(x, w[2 * c:], None if b is None else b[2 * c:])
                q = q.reshape(-1, size, heads, head).permute(0, 2, 1, 3)         # [B, N, S, H]
                k = k.reshape(-1, size, heads, head).permute(0, 2, 3, 1)         # [B, N, H, S]
                v = v.reshape(-1, size, heads, head).permute(0, 2, 1, 3)
                scores = torch.matmul(q, k) * a.scale
                if a.use_rel_pos:
                    rh = get_rel_pos(height, height, a.rel_pos_h).transpose(1, 2)   # [h, H, kh]
                    rw = get_rel_pos(width, width, a.rel_pos_w).transpose(1, 2)     # [w, H, kw]
                    grid = q.reshape(-1, heads, height, width, head)               # [B, N, h, w, H]
                    rel_h = torch.matmul(grid, rh)                                 # [B, N, h, w, kh]
                    rel_w = torch.matmul(grid.transpose(2, 3), rw).transpose(2, 3)  # [B, N, h, w, kw]
                    bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(-1, heads, size, size)
                    scores = scores + bias
                out = torch.matmul(torch.softmax(scores, dim=-1), v).permute(0, 2, 1, 3).reshape(-1, size, c)
                return a.proj(out).reshape(-1, height, width, c)

        return PlainRelPosAttention()


class _PlainSamBlock:
    """Factory of a drop-in for segment-anything's image-encoder ``Block`` (export only): the window
    partition from plain numbers (the grid is fixed) instead of shape arithmetic traced from
    ``x.shape``, and the residual stream as ``[B, S, C]`` tokens, the layout ONNX Runtime's
    SkipLayerNormalization takes (``fuse="all"``); the block's input and output stay ``[B, H, W, C]``."""

    @staticmethod
    def make(block: Any) -> Any:
        import torch
        import torch.nn.functional as F

        class PlainSamBlock(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.block = block

            def forward(self, x: Any) -> Any:
                blk = self.block
                _, height, width, c = (int(d) for d in x.shape)   # fixed grid: plain numbers
                x = x.reshape(-1, height * width, c)
                y = blk.norm1(x).reshape(-1, height, width, c)
                size = blk.window_size
                if size > 0:
                    pad_h, pad_w = (size - height % size) % size, (size - width % size) % size
                    if pad_h or pad_w:
                        y = F.pad(y, (0, 0, 0, pad_w, 0, pad_h))
                    rows, cols = (height + pad_h) // size, (width + pad_w) // size
                    y = y.reshape(-1, rows, size, cols, size, c).permute(0, 1, 3, 2, 4, 5).reshape(-1, size, size, c)
                    y = blk.attn(y)
                    y = y.reshape(-1, rows, cols, size, size, c).permute(0, 1, 3, 2, 4, 5)
                    y = y.reshape(-1, rows * size, cols * size, c)
                    if pad_h or pad_w:
                        y = y[:, :height, :width, :]
                else:
                    y = blk.attn(y)
                x = x + y.reshape(-1, height * width, c)
                x = x + blk.mlp(blk.norm2(x))
                return x.reshape(-1, height, width, c)

        return PlainSamBlock()


def _plain_replacement(child: Any) -> Any:
    """The export-only drop-in for ``child`` (see ``plain_attention``), or None."""
    import torch

    if (isinstance(child, torch.nn.MultiheadAttention) and child.batch_first and child.dropout == 0.0
            and child._qkv_same_embed_dim and child.bias_k is None and not child.add_zero_attn):
        return _PlainSelfAttention.make(child)
    try:
        from torchvision.models.swin_transformer import PatchMerging, ShiftedWindowAttention
    except ImportError:  # pragma: no cover - torchvision is a runtime dependency
        return None
    try:
        from segment_anything.modeling import image_encoder as sam_encoder
    except ImportError:  # pragma: no cover - segment-anything is a runtime dependency
        sam_encoder = None
    if sam_encoder is not None and type(child) is sam_encoder.Attention:
        return _PlainRelPosAttention.make(child)
    if sam_encoder is not None and type(child) is sam_encoder.Block and type(child.attn) is sam_encoder.Attention:
        return _PlainSamBlock.make(child)
    if type(child) is PatchMerging:
        return _PlainPatchMerging.make(child)
    if type(child) is ShiftedWindowAttention and child.attention_dropout == 0.0 and child.dropout == 0.0:
        return _PlainWindowAttention.make(child)                # v1 only: V2's cosine attention is another graph
    return None


@contextlib.contextmanager
def plain_attention(module: Any) -> Iterator[int]:
    """Swap batch-first ``nn.MultiheadAttention`` children for ``_PlainSelfAttention``, Swin's
    ``ShiftedWindowAttention`` for ``_PlainWindowAttention`` (and its ``PatchMerging``), SAM's encoder
    ``Attention`` and ``Block`` for ``_PlainRelPosAttention`` and ``_PlainSamBlock`` while tracing.

    The weights are shared, nothing is copied; the originals are put back afterwards, so parity
    compares the graph with the module as PyTorch serves it. Yields how many were swapped.
    """
    swapped: list[tuple[Any, str, Any]] = []
    if fusion_enabled():
        for parent in list(module.modules()):
            for name, child in list(parent.named_children()):
                replacement = _plain_replacement(child)
                if replacement is not None:
                    setattr(parent, name, replacement)
                    swapped.append((parent, name, child))
    try:
        yield len(swapped)
    finally:
        for parent, name, child in swapped:
            setattr(parent, name, child)
