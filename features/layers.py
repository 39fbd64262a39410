"""Layer names a user can ask for, truncation of the network, pooling of maps.

Layers are named as torchvision's feature extraction names them: a module path
such as `layer3` or `_blocks.5` stands for the last node computed inside that
module (see `torchvision.models.feature_extraction`), and a node name such as
`layer3.1.add` picks one operation. "top" is the input of the final linear
classifier, skipping dropout (the penultimate-layer "CNN codes").

We use torchvision's FX-based `create_feature_extractor` instead of forward
hooks: it returns several depths from one forward pass, and it prunes every
operation after the deepest requested node, so cutting the network early also
makes it cheaper.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)

from features.errors import BackboneError
from features.pooling import Pooling

TOP = "top"
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def pool(tensor: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """Reduce a layer output to one vector per image.

    Outputs that are already vectors (N, D) pass through unchanged whatever the
    pooling: pooling has nothing left to reduce there.
    """
    if tensor.ndim == 2:
        return tensor
    if tensor.ndim == 3:  # (N, L, D) tokens, as vision transformers produce
        tensor = tensor.transpose(1, 2).unsqueeze(-1)
    if tensor.ndim != 4:
        raise BackboneError(
            f"cannot pool a layer output of shape {tuple(tensor.shape)}; pick a "
            "layer whose output is (N, C, H, W), (N, L, D) or (N, D)"
        )
    if pooling.kind == "avg":
        return tensor.mean(dim=(2, 3))
    if pooling.kind == "max":
        return tensor.amax(dim=(2, 3))
    if pooling.kind == "avg+max":
        return torch.cat([tensor.mean(dim=(2, 3)), tensor.amax(dim=(2, 3))], dim=1)
    return _grid(tensor, pooling.grid)


def _grid(tensor: torch.Tensor, k: int) -> torch.Tensor:
    """adaptive_avg_pool2d(tensor, k).flatten(1), written out cell by cell.

    NOTE: the same bins as PyTorch's adaptive pooling (start floor(i*h/k),
    end ceil((i+1)*h/k)), spelled as slices so the ONNX exporter can trace it
    (its adaptive_avg_pool2d needs sizes it cannot see here).
    """
    h, w = int(tensor.shape[-2]), int(tensor.shape[-1])
    rows = [(i * h // k, -(-(i + 1) * h // k)) for i in range(k)]
    cols = [(j * w // k, -(-(j + 1) * w // k)) for j in range(k)]
    cells = [
        tensor[:, :, r0:r1, c0:c1].mean(dim=(2, 3))
        for r0, r1 in rows
        for c0, c1 in cols
    ]
    return torch.stack(cells, dim=2).flatten(1)


def pooled_name(shape: Sequence[int], pooling: Pooling) -> str:
    """The dataset name used for a layer's codes: "none" when nothing was pooled."""
    return "none" if len(shape) == 2 else pooling.spec


def layer_names(model: nn.Module, *, all_nodes: bool = False) -> list[str]:
    """Names a user can ask for, in forward order.

    By default module paths up to two levels deep (`layer1.0`, `_blocks.5`,
    `features.3`, `avgpool`); with `all_nodes` every graph node.
    """
    nodes = _eval_nodes(model)
    if all_nodes:
        return nodes
    names: list[str] = []
    for node in nodes:
        short = ".".join(node.split(".")[:2])
        if short not in names:
            names.append(short)
    return names


def _eval_nodes(model: nn.Module) -> list[str]:
    try:
        _, eval_nodes = get_graph_node_names(model)
    except Exception as err:  # FX tracing errors come in many types
        raise BackboneError(
            f"{type(model).__name__} cannot be traced by torch.fx, so its layers "
            f"cannot be listed or cut ({type(err).__name__}: {err})"
        ) from err
    return [n for n in eval_nodes if n != "x"]


def resolve_top(model: nn.Module) -> str:
    """The node feeding the final linear classifier, skipping dropout.

    The graph of a classification network ends in its classifier; walking the
    node list backwards from the last node past dropout (an identity in eval
    mode) lands on the penultimate layer.

    Raises:
        BackboneError: if the network does not end in a linear layer.
    """
    nodes = _eval_nodes(model)
    modules = dict(model.named_modules())
    if not nodes or not isinstance(modules.get(nodes[-1]), nn.Linear):
        raise BackboneError(
            f"{type(model).__name__} does not end in a linear classifier, so "
            '"top" is undefined; name a layer from `quadrant layers` instead'
        )
    for node in reversed(nodes[:-1]):
        if not _is_dropout(node, modules):
            return node
    raise BackboneError(f"{type(model).__name__} has no layer before its classifier")


def _is_dropout(node: str, modules: dict[str, nn.Module]) -> bool:
    if node in modules:
        return isinstance(modules[node], _DROPOUTS)
    return node.rsplit(".", 1)[-1].startswith("dropout")


def resolve_layers(model: nn.Module, layers: Sequence[str]) -> dict[str, str]:
    """Map each requested layer ("top" or a name) to a graph node name.

    Raises:
        BackboneError: for a name that is not in the network, with close matches.
    """
    nodes = _eval_nodes(model)
    resolved = {}
    for layer in layers:
        node = resolve_top(model) if layer == TOP else layer
        if not any(n == node or n.startswith(node + ".") for n in nodes):
            raise BackboneError(_unknown_layer_message(model, layer, nodes))
        resolved[layer] = node
    return resolved


def _unknown_layer_message(model: nn.Module, layer: str, nodes: list[str]) -> str:
    # Every module path is a valid name, so offer prefixes of nodes too.
    names = {
        ".".join(n.split(".")[:i]) for n in nodes for i in range(1, n.count(".") + 2)
    }
    close = difflib.get_close_matches(layer, sorted(names), n=5)
    hint = f" Did you mean {close}?" if close else ""
    return (
        f"layer {layer!r} is not in {type(model).__name__}.{hint} Hint: run "
        "`quadrant layers` to list the layer names (with --all for every node)."
    )


def depth_order(model: nn.Module, nodes: Mapping[str, str]) -> list[str]:
    """The layers of `nodes` ({layer: node}) sorted from input to output."""
    graph = _eval_nodes(model)

    def position(layer: str) -> int:
        node = nodes[layer]
        return max(
            i for i, n in enumerate(graph) if n == node or n.startswith(node + ".")
        )

    return sorted(nodes, key=position)


def build_feature_extractor(
    model: nn.Module, nodes: Mapping[str, str]
) -> fx.GraphModule:
    """A module returning {layer: output} for `nodes` ({layer: node name} from
    `resolve_layers`), in eval mode.

    Operations after the deepest requested node are pruned away.
    """
    extractor = create_feature_extractor(
        model.eval(), return_nodes={node: layer for layer, node in nodes.items()}
    )
    return extractor.eval()


@torch.no_grad()
def layer_shapes(
    model: nn.Module, layers: Sequence[str], input_size: int
) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch axis) of each layer for one input image."""
    extractor = build_feature_extractor(model, resolve_layers(model, layers))
    outputs = extractor(torch.zeros(1, 3, input_size, input_size))
    return {layer: tuple(outputs[layer].shape[1:]) for layer in layers}


def spread_layers(model: nn.Module, input_size: int, count: int = 5) -> list[str]:
    """`count` layers spread evenly over the network's depth, then "top".

    Candidates are the module paths of `layer_names` that own parameters,
    are not normalisation layers, and output spatial maps (stems, blocks,
    stages), so the advisor's sweep sees early, middle and late features of
    any backbone.
    """
    modules = dict(model.named_modules())
    owners = {n for n, _ in model.named_parameters()}
    candidates = [
        n
        for n in layer_names(model)
        if any(o.startswith(n + ".") for o in owners)
        and not isinstance(modules.get(n), _NORMS)
    ]
    shapes = layer_shapes(model, candidates, input_size)
    spatial = [n for n in candidates if len(shapes[n]) == 3]
    picks = [round(i * (len(spatial) - 1) / count) for i in range(1, count + 1)]
    return [*dict.fromkeys(spatial[i] for i in picks), TOP]
