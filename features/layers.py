"""Layer names a user can ask for, truncation of the network, pooling of maps.

Layers are named as torchvision's feature extraction names them: a module path
such as `layer3` or `_blocks.5` stands for the last node computed inside that
module (see `torchvision.models.feature_extraction`), and a node name such as
`layer3.1.add` picks one operation. "top" is the input of the final linear
classifier, skipping dropout (the penultimate-layer "CNN codes").

We use torchvision's FX-based `create_feature_extractor` instead of forward
hooks: it returns several depths from one forward pass, and it prunes every
operation after the deepest requested node, so cutting the network early also
makes it cheaper. timm's networks are traced the same way with timm's own
leaf modules and wrapped functions (timm's `create_feature_extractor`), the
tracer timm itself tests its models with; their default layer list is timm's
feature stages (CNN stages, transformer blocks) and what follows them.
"""

from __future__ import annotations

import difflib
import inspect
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import fx, nn
from torchvision.models.feature_extraction import (
    create_feature_extractor,
    get_graph_node_names,
)

from features.backbones import (
    is_timm_model,
    timm_classifier_names,
    timm_feature_extractor,
    timm_graph_node_names,
    timm_stage_names,
)
from features.errors import BackboneError
from features.pooling import Pooling

TOP = "top"
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class OutputLayout:
    """How a network lays out its intermediate outputs.

    Attributes:
        prefix_tokens: tokens before the patch tokens in a transformer's
            sequence (class, distillation and register tokens).
        class_token: whether the first token is a class token.
        tokens: the sequence length of the transformer blocks (prefix plus
            patches), when known; token poolings refuse other lengths.
        nhwc: spatial maps come channels-last, (N, H, W, C) (timm's Swin).
    """

    prefix_tokens: int = 1
    class_token: bool = True
    tokens: int | None = None
    nhwc: bool = False


def output_layout(model: nn.Module) -> OutputLayout:
    """The layout of `model`'s outputs; timm models say theirs, others the default.

    The default fits torchvision's vision transformers (one class token first).
    """
    if not is_timm_model(model):
        return OutputLayout()
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)
    fmt = getattr(model, "output_fmt", "NCHW")
    return OutputLayout(
        prefix_tokens=prefix,
        class_token=getattr(model, "cls_token", None) is not None,
        tokens=prefix + int(patches) if patches else None,
        nhwc=getattr(fmt, "value", fmt) == "NHWC",
    )


def as_nchw(tensor: torch.Tensor, layout: OutputLayout) -> torch.Tensor:
    """Spatial maps channels-first, whatever the network's layout."""
    return tensor.permute(0, 3, 1, 2) if layout.nhwc and tensor.ndim == 4 else tensor


def pool(
    tensor: torch.Tensor, pooling: Pooling, layout: OutputLayout | None = None
) -> torch.Tensor:
    """Reduce a layer output to one vector per image.

    Outputs that are already vectors (N, D) pass through unchanged whatever the
    pooling: pooling has nothing left to reduce there. Token poolings (cls,
    patch_avg, cls+patch_avg) take transformer tokens (N, L, D) only; the
    spatial ones pool tokens over their whole sequence.

    Raises:
        BackboneError: a pooling that does not fit the output.
    """
    if tensor.ndim == 2:
        return tensor
    if pooling.tokens_only:
        return _pool_tokens(tensor, pooling, layout or OutputLayout())
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


def _pool_tokens(
    tensor: torch.Tensor, pooling: Pooling, layout: OutputLayout
) -> torch.Tensor:
    """The class token, the mean of the patch tokens, or both."""
    shape = tuple(tensor.shape[1:])
    if tensor.ndim != 3 or (layout.tokens and shape[0] != layout.tokens):
        expected = f" of the {layout.tokens} tokens" if layout.tokens else ""
        raise BackboneError(
            f"pooling {pooling.spec!r} takes a transformer block's tokens (N, L, D)"
            f"{expected}; this layer outputs {shape}. Use it on the blocks (and "
            "norm) of a vision transformer, and avg, max, avg+max or grid:K on "
            "other layers"
        )
    uses_cls = pooling.kind in ("cls", "cls+patch_avg")
    if uses_cls and not layout.class_token:
        raise BackboneError(
            f"pooling {pooling.spec!r}: this network has no class token; use "
            "patch_avg (the mean of the patch tokens)"
        )
    if pooling.kind == "cls":
        return tensor[:, 0]
    patches = tensor[:, layout.prefix_tokens :].mean(dim=1)
    if pooling.kind == "patch_avg":
        return patches
    return torch.cat([tensor[:, 0], patches], dim=1)


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
    `features.3`, `avgpool`); for timm models, timm's feature stages
    (`layer1`, `stages.2`, `blocks.7`) and the modules after the last one;
    with `all_nodes` every graph node.
    """
    nodes = _eval_nodes(model)
    if all_nodes:
        return nodes
    stages = timm_stage_names(model) if _is_timm(model) else []
    inside = [i for i, n in enumerate(nodes) if _inside(n, stages)]
    if inside:
        nodes = nodes[inside[-1] + 1 :]
    else:
        stages = []
    modules = dict(model.named_modules())
    names: list[str] = list(stages)
    for node in nodes:
        short = _module_path(node, modules) if stages else ".".join(node.split(".")[:2])
        if short and short not in names:
            names.append(short)
    return names


def _is_timm(model: nn.Module) -> bool:
    return is_timm_model(model)


def _inside(node: str, modules: Sequence[str]) -> bool:
    return any(node == m or node.startswith(m + ".") for m in modules)


def _module_path(node: str, modules: Mapping[str, nn.Module]) -> str | None:
    """The longest module path (two levels at most) a graph node belongs to."""
    parts = node.split(".")
    for depth in (2, 1):
        path = ".".join(parts[:depth])
        if len(parts) >= depth and path in modules:
            return path
    return None


# NOTE: tracing a transformer takes about a second and every question about
# layers needs the node list: one trace per network object.
_NODES: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


def _eval_nodes(model: nn.Module) -> list[str]:
    if model not in _NODES:
        _NODES[model] = _trace_nodes(model)
    return list(_NODES[model])


def _trace_nodes(model: nn.Module) -> list[str]:
    try:
        if _is_timm(model):
            nodes = timm_graph_node_names(model)
        else:
            _, nodes = get_graph_node_names(model)
    except Exception as err:  # FX tracing errors come in many types
        raise BackboneError(
            f"{type(model).__name__} cannot be traced by torch.fx, so its layers "
            f"cannot be listed or cut ({type(err).__name__}: {err})"
        ) from err
    # The forward's arguments (x, and timm's optional masks) are no layers.
    inputs = set(inspect.signature(model.forward).parameters)
    return [n for n in nodes if n not in inputs]


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
    if _is_timm(model):
        return _timm_top(model, nodes, modules)
    if not nodes or not isinstance(modules.get(nodes[-1]), nn.Linear):
        raise BackboneError(
            f"{type(model).__name__} does not end in a linear classifier, so "
            '"top" is undefined; name a layer from `quadrant layers` instead'
        )
    for node in reversed(nodes[:-1]):
        if not _is_dropout(node, modules):
            return node
    raise BackboneError(f"{type(model).__name__} has no layer before its classifier")


def _timm_top(model: nn.Module, nodes: list[str], modules: dict[str, nn.Module]) -> str:
    """The node feeding timm's classifier: its pooled pre-logits features.

    timm's pretrained config names the classifier module ("fc", "head",
    "head.fc"); the node before its first node, past dropout, is what timm's
    `forward_head(x, pre_logits=True)` returns. Models built without a
    classifier (DINOv2, SigLIP) keep an identity in its place.
    """
    heads = timm_classifier_names(model)
    first = next((i for i, n in enumerate(nodes) if _inside(n, heads)), None)
    if first is None:
        raise BackboneError(
            f"{type(model).__name__} has no classifier module {list(heads)} in its "
            'graph, so "top" is undefined; name a layer from `quadrant layers`'
        )
    for node in reversed(nodes[:first]):
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
    return_nodes = {node: layer for layer, node in nodes.items()}
    if _is_timm(model):
        return timm_feature_extractor(model.eval(), return_nodes).eval()
    extractor = create_feature_extractor(model.eval(), return_nodes=return_nodes)
    return extractor.eval()


def parameters_before(model: nn.Module, layer: str) -> list[str]:
    """Names of the parameters whose modules run before `layer` ("top" or a name).

    A module runs before the layer when its first graph node comes before
    the layer's first node: freezing these leaves `layer` and everything
    after it to train (partial fine-tuning).

    Raises:
        BackboneError: the layer is not in the network, with close matches.
    """
    node = resolve_layers(model, [layer])[layer]
    graph = _eval_nodes(model)

    def first(name: str) -> int | None:
        return next(
            (i for i, n in enumerate(graph) if n == name or n.startswith(name + ".")),
            None,
        )

    start = first(node)
    assert start is not None  # resolve_layers found it in the graph
    frozen = []
    for name, _ in model.named_parameters():
        module = name.rsplit(".", 1)[0]
        position = first(module)
        if position is not None and position < start:
            frozen.append(name)
    return frozen


@torch.no_grad()
def layer_shapes(
    model: nn.Module, layers: Sequence[str], input_size: int
) -> dict[str, tuple[int, ...]]:
    """Output shape (without the batch axis) of each layer for one input image.

    Spatial maps are given channels first, (C, H, W), whatever the layout.
    """
    extractor = build_feature_extractor(model, resolve_layers(model, layers))
    outputs = extractor(torch.zeros(1, 3, input_size, input_size))
    layout = output_layout(model)
    # NOTE: with every graph node asked for, some are sizes or asserts, not
    # tensors: they have no shape and are left out.
    return {
        layer: tuple(as_nchw(outputs[layer], layout).shape[1:])
        for layer in layers
        if isinstance(outputs[layer], torch.Tensor)
    }


def code_dims(shape: Sequence[int], pooling: Pooling) -> int | None:
    """Code length of a layer output `shape` (no batch axis) pooled `pooling`.

    None where the pooling does not apply (a token pooling on a spatial map).
    """
    if len(shape) == 1:
        return int(shape[0])
    if len(shape) == 2:  # tokens (L, D)
        return pooling.dims(int(shape[1]))
    return None if pooling.tokens_only else pooling.dims(int(shape[0]))


def spread_layers(model: nn.Module, input_size: int, count: int = 5) -> list[str]:
    """`count` layers spread evenly over the network's depth, then "top".

    Candidates are the module paths of `layer_names` that own parameters,
    are not normalisation layers, and output spatial maps (stems, blocks,
    stages), so the advisor's sweep sees early, middle and late features of
    any backbone. For timm models the candidates are timm's feature stages:
    CNN stages, or a transformer's blocks (token outputs).
    """
    if _is_timm(model) and (stages := timm_stage_names(model)):
        shapes = layer_shapes(model, stages, input_size)
        return _spread([n for n in stages if len(shapes[n]) in (2, 3)], count)
    modules = dict(model.named_modules())
    owners = {n for n, _ in model.named_parameters()}
    candidates = [
        n
        for n in layer_names(model)
        if any(o.startswith(n + ".") for o in owners)
        and not isinstance(modules.get(n), _NORMS)
    ]
    shapes = layer_shapes(model, candidates, input_size)
    return _spread([n for n in candidates if len(shapes[n]) == 3], count)


def _spread(layers: list[str], count: int) -> list[str]:
    picks = [round(i * (len(layers) - 1) / count) for i in range(1, count + 1)]
    return [*dict.fromkeys(layers[i] for i in picks), TOP]
