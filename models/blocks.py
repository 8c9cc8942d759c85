"""A classifier's body as a chain of stages, and which stages are its "blocks", for fine-tuning.

``vfm finetune train --unfreeze N`` trains a backbone's last N blocks: it splits the body (the
network up to its pooled features, as ``features_and_logits_module`` leaves it) into a frozen
prefix, run once per image and cached, and a trainable rest (the last N blocks and everything
after them up to the features). Calling the two in turn is the body's own forward.

What a block is, per model (``BLOCKS``; each entry builds the chain from the body):

- ``tiny_cnn``: its conv-bn-relu layers (3);
- ``efficientnet_lite0``: its MBConv blocks (``_blocks``, 16), then the 1x1 head conv and pooling;
- ``resnet50``: its bottlenecks (16, the last three are ``layer4``'s), then pooling;
- ``vit_b_16`` (torchvision): its encoder layers (12), then the final layer norm and the CLS token.

torch is imported inside the functions: the registry imports nothing of this module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class Chain:
    """``stages`` called in turn are the body; ``stages[first:first + count]`` are its blocks."""

    stages: list[Any]
    first: int
    count: int

    def split(self, n: int) -> tuple[Any, Any]:
        """(frozen prefix, trainable rest) with the last ``n`` blocks in the rest, as two modules."""
        from torch import nn

        if not 0 <= n <= self.count:
            raise ValueError(f"n must be between 0 and {self.count}, got {n}")
        cut = self.first + self.count - n
        return nn.Sequential(*self.stages[:cut]), nn.Sequential(*self.stages[cut:])


def _tiny_cnn(body: Any) -> Chain:
    from torch import nn

    children = dict(body.named_children())
    layers = sorted({int(name[4:]) for name in children if name.startswith("conv")})
    stages = [nn.Sequential(children[f"conv{i}"], children[f"bn{i}"], children[f"relu{i}"]) for i in layers]
    rest = [module for name, module in children.items() if not name[-1:].isdigit()]  # pool, flatten, fc (Identity)
    return Chain(stages + rest, 0, len(layers))


def _efficientnet_lite(body: Any) -> Chain:
    from torch import nn

    class Stem(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act = body._conv_stem, body._bn0, body._swish

        def forward(self, x: Any) -> Any:
            return self.act(self.bn(self.conv(x)))

    class Block(nn.Module):
        # extract_features scales the drop-connect rate by the block's index; it only acts in training
        # mode, and the blocks are trained in eval mode (frozen batch statistics, no drop-connect).
        def __init__(self, block: Any) -> None:
            super().__init__()
            self.block = block

        def forward(self, x: Any) -> Any:
            return self.block(x)

    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn, self.act = body._conv_head, body._bn1, body._swish
            self.pool, self.fc = body._avg_pooling, body._fc

        def forward(self, x: Any) -> Any:
            x = self.pool(self.act(self.bn(self.conv(x))))
            return self.fc(x.flatten(1))  # _fc is the Identity left where the Linear was

    if body._global_params.local_pooling:
        raise ValueError("EfficientNet with local pooling is not supported")
    blocks = [Block(b) for b in body._blocks]
    return Chain([Stem(), *blocks, Head()], 1, len(blocks))


def _resnet(body: Any) -> Chain:
    from torch import nn

    stem = nn.Sequential(body.conv1, body.bn1, body.relu, body.maxpool)
    blocks = [b for layer in (body.layer1, body.layer2, body.layer3, body.layer4) for b in layer]
    return Chain([stem, *blocks, nn.Sequential(body.avgpool, nn.Flatten(1), body.fc)], 1, len(blocks))


def _torchvision_vit(body: Any) -> Chain:
    from torch import nn

    class Tokens(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.vit = body

        def forward(self, x: Any) -> Any:
            import torch

            x = self.vit._process_input(x)
            x = torch.cat([self.vit.class_token.expand(x.shape[0], -1, -1), x], dim=1)
            return self.vit.encoder.dropout(x + self.vit.encoder.pos_embedding)

    class ClsToken(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ln, self.heads = body.encoder.ln, body.heads

        def forward(self, x: Any) -> Any:
            return self.heads(self.ln(x)[:, 0])

    layers = list(body.encoder.layers)
    return Chain([Tokens(), *layers, ClsToken()], 1, len(layers))


BLOCKS: dict[str, tuple[str, Callable[[Any], Chain]]] = {
    "tiny_cnn": ("conv layers", _tiny_cnn),
    "efficientnet_lite0": ("MBConv blocks", _efficientnet_lite),
    "resnet50": ("bottleneck blocks", _resnet),
    "vit_b_16": ("encoder layers", _torchvision_vit),
}


class NoBlocks(ValueError):
    """A model whose blocks vfm does not know (``--unfreeze`` cannot split it)."""


def chain_of(model: str, body: Any) -> Chain:
    """The chain of ``model``'s body (the zoo name of the model it was built from)."""
    if model not in BLOCKS:
        raise NoBlocks(f"--unfreeze and --unpooled are not available for {model!r}: vfm knows the blocks of "
                       f"{', '.join(sorted(BLOCKS))}.")
    return BLOCKS[model][1](body)


def unpooled_body(model: str, body: Any, n: int) -> Any:
    """``model``'s body cut before its last ``n`` blocks (0: after its last block, before the pooling), its output
    flattened: the module of a model made by ``vfm finetune train --unpooled N`` (the same chain of stages, so the
    state dict's keys match)."""
    return unpooled_chain(model, body, n)[0]


def unpooled_chain(model: str, body: Any, n: int) -> tuple[Any, Chain]:
    """(``unpooled_body(model, body, n)``, its chain): the stages up to the cut then the flatten, the blocks left
    before the cut as its blocks, so ``split(m)`` of it gives what ``--unfreeze M --unpooled N`` freezes and trains."""
    from torch import nn

    chain = chain_of(model, body)
    frozen, _ = chain.split(n)
    cut = nn.Sequential(frozen, nn.Flatten(1))
    return cut, Chain([*frozen, cut[1]], chain.first, chain.count - n)


def describe_blocks(model: str) -> str:
    return BLOCKS[model][0] if model in BLOCKS else "blocks"
