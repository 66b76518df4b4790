"""Channel gates with a straight-through binary forward, the polarization regularizer and FLOPs from gates."""

import contextlib
from collections.abc import Iterator

import torch
import torch.nn as nn

from pruning.graph import ChannelGraph

# A channel is open when its score is above this value.
THRESHOLD = 0.5


def binary_gate(scores: torch.Tensor) -> torch.Tensor:
    """Return ``1[scores > 0.5]`` in the forward pass, with the gradient passed straight through to ``scores``."""
    hard = (scores > THRESHOLD).to(scores.dtype)
    return hard + scores - scores.detach()


def polarization_regularizer(scores: torch.Tensor, t: float) -> torch.Tensor:
    """Return ``t * sum|s_i| - sum|s_i - mean(s)|`` over all gate scores (Zhuang et al., NeurIPS 2020).

    With scores bounded in [0, 1], its minimisers put some scores at 1 and the rest at
    0 instead of shrinking all of them together, as L1 alone does. The mean is one
    global mean over every gate of the model.
    """
    return t * scores.abs().sum() - (scores - scores.mean()).abs().sum()


def polarization_gradient_on_open(scores: torch.Tensor, t: float) -> float | None:
    """Return the mean gradient of R(s) over the open gates above the mean score, or None.

    The gradient of R on a gate above the mean of all scores is ``t - 2 * (1 - f)``, ``f``
    being the fraction of scores above the mean. A positive value means that R pulls the
    open gates down towards the threshold, where they flip at random, instead of up to 1.
    Then ``t`` is too large for the fraction of gates kept, and R does not separate them.
    Open gates below the mean are left out: R pushes them down for any ``t``, as it
    pushes every gate below the mean, and that is the polarization at work. None unless
    some gates are open and some closed.
    """
    scores = scores.detach().double().requires_grad_(True)
    open_gates = scores.detach() > THRESHOLD
    if not open_gates.any() or open_gates.all():
        return None
    above_mean = open_gates & (scores.detach() > scores.detach().mean())
    if not above_mean.any():
        return None
    (gradient,) = torch.autograd.grad(polarization_regularizer(scores, t), scores)
    return float(gradient[above_mean].mean())


class ChannelGates(nn.Module):
    """One gate score in [0, 1] per channel of each prunable group of ``graph``.

    :meth:`attach` registers hooks that multiply the input channels of each group's
    consumers by the binary gate, so the network trains as the sub-network that
    extraction will keep. Scores are parameters under ``scores.<group index>``.

    The gate sits where the consumers read the channels, after any activation. Gated
    before a ReLU, a closed channel would enter it at exactly 0, where the ReLU's
    gradient is 0, so the task loss could never reopen the gate.

    With ``blocks=True`` every removable residual branch of ``graph.blocks`` also gets
    one gate (layer pruning), under ``block_scores.<block index>``; it multiplies the
    branch's output, so a closed block passes only its shortcut.
    """

    def __init__(self, graph: ChannelGraph, init: float = 1.0, blocks: bool = False) -> None:
        super().__init__()
        if not 0.0 <= init <= 1.0:
            raise ValueError(f"gate init must be in [0, 1], got {init}")
        self.graph = graph
        # ParameterDict sorts the keys of a plain dict as strings ("11" before "2"), so the
        # groups go in as pairs, which keep their order for all_scores().
        self.scores = nn.ParameterDict(
            [
                (str(group.index), nn.Parameter(torch.full((group.channels,), float(init))))
                for group in graph.prunable_groups
            ]
        )
        self.block_scores = nn.ParameterDict(
            [(str(block.index), nn.Parameter(torch.tensor(float(init)))) for block in graph.blocks] if blocks else []
        )
        self.hook_ids: dict[str, int] = {}
        self.block_hook_ids: dict[str, int] = {}

    def attach(self, net: nn.Module) -> None:
        """Register the gating hooks on the consumers of every prunable group (``net`` is the traced network)."""
        if self.hook_ids or self.block_hook_ids:
            raise RuntimeError("gates are already attached; call detach_from(net) first")
        self._register(net)

    def _register(self, net: nn.Module) -> None:
        for group in self.graph.prunable_groups:
            for name in group.consumers:
                handle = net.get_submodule(name).register_forward_pre_hook(_GateHook(self, str(group.index)))
                self.hook_ids[name] = handle.id
        for block in self.graph.blocks:
            if str(block.index) in self.block_scores:
                handle = net.get_submodule(block.output).register_forward_hook(_BlockGateHook(self, str(block.index)))
                self.block_hook_ids[block.output] = handle.id

    def detach_from(self, net: nn.Module) -> None:
        """Remove the gating hooks from ``net`` or from a deep copy of it."""
        for name, hook_id in self.hook_ids.items():
            net.get_submodule(name)._forward_pre_hooks.pop(hook_id, None)
        for name, hook_id in self.block_hook_ids.items():
            net.get_submodule(name)._forward_hooks.pop(hook_id, None)

    @contextlib.contextmanager
    def detached(self, net: nn.Module) -> Iterator[None]:
        """Remove the hooks for the duration of the block (to copy ``net`` without the gates), then restore them."""
        attached = bool(self.hook_ids or self.block_hook_ids)
        self.detach_from(net)
        self.hook_ids, self.block_hook_ids = {}, {}
        try:
            yield
        finally:
            self.hook_ids, self.block_hook_ids = {}, {}
            if attached:
                self._register(net)

    def all_scores(self) -> torch.Tensor:
        """Return every score: the channels' in the order of ``graph.prunable_groups``, then the blocks'."""
        scores = [score for score in self.scores.values()] + [score.view(1) for score in self.block_scores.values()]
        if not scores:
            return torch.zeros(0)
        return torch.cat(scores)

    @torch.no_grad()
    def clamp_(self) -> None:
        """Clamp the scores to [0, 1] in place (after each optimizer step)."""
        for score in [*self.scores.values(), *self.block_scores.values()]:
            score.clamp_(0.0, 1.0)

    def keep_masks(self) -> dict[int, torch.Tensor]:
        """Return the open channels of each prunable group as boolean masks."""
        return {int(index): (score.detach() > THRESHOLD).cpu() for index, score in self.scores.items()}

    def removed_blocks(self) -> set[int]:
        """Return the indices of the blocks whose gate is closed."""
        return {int(index) for index, score in self.block_scores.items() if float(score.detach()) <= THRESHOLD}

    def block_states(self, gradient_scale: dict[int, float] | None = None) -> dict[int, torch.Tensor]:
        """Return 1 for each open block and 0 for each closed one, with the straight-through gradient to its score.

        ``gradient_scale`` multiplies the gradient of each block's state without changing its value.
        """
        states = {}
        for index, score in self.block_scores.items():
            scale = 1.0 if gradient_scale is None else gradient_scale[int(index)]
            states[int(index)] = (score > THRESHOLD).to(score.dtype) + scale * (score - score.detach())
        return states

    def kept_counts(
        self, straight_through: bool = False, gradient_scale: dict[int, float] | None = None
    ) -> dict[int, torch.Tensor]:
        """Return the open channels per prunable group; differentiable through the scores if ``straight_through``.

        ``gradient_scale`` multiplies the straight-through gradient of each group's count
        without changing its value.
        """
        if straight_through:
            counts = {}
            for index, score in self.scores.items():
                scale = 1.0 if gradient_scale is None else gradient_scale[int(index)]
                hard = (score > THRESHOLD).to(score.dtype)
                counts[int(index)] = (hard + scale * (score - score.detach())).sum()
            return counts
        return {int(index): (score.detach() > THRESHOLD).sum().float() for index, score in self.scores.items()}


class _GateHook:
    """Forward pre-hook that multiplies the input channels of a consumer by its group's binary gate."""

    def __init__(self, gates: ChannelGates, key: str) -> None:
        self.gates = gates
        self.key = key

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        features = inputs[0]
        gate = binary_gate(self.gates.scores[self.key]).to(features.dtype)
        shape = [1] * features.ndim
        shape[1] = -1
        return (features * gate.view(shape), *inputs[1:])


class _BlockGateHook:
    """Forward hook that multiplies the output of a residual branch by its block's binary gate."""

    def __init__(self, gates: ChannelGates, key: str) -> None:
        self.gates = gates
        self.key = key

    def __call__(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output * binary_gate(self.gates.block_scores[self.key]).to(output.dtype)


def macs_from_counts(
    graph: ChannelGraph,
    kept: dict[int, torch.Tensor | float],
    blocks: dict[int, torch.Tensor | float] | None = None,
) -> torch.Tensor:
    """Return the MACs per sample of the convolutions and linear layers for the given kept channels per group.

    Groups missing from ``kept`` count in full. A group with nothing kept counts one
    channel, because extraction keeps one zeroed channel so that every layer stays valid.
    ``blocks`` gives 1 for a kept and 0 for a removed residual branch (missing: kept);
    the layers of a removed branch cost nothing. This is the quantity
    ``torch.utils.flop_counter`` counts (conv and matmul only).
    """
    counts: dict[int, torch.Tensor | float] = {}
    for group in graph.groups:
        value = kept.get(group.index, float(group.channels))
        if isinstance(value, torch.Tensor):
            # Keeps the straight-through gradient when at least one channel is open.
            counts[group.index] = torch.where(value < 1, value.detach().clamp(min=1.0), value)
        else:
            counts[group.index] = max(1.0, float(value))
    # A layer of a nested block belongs to the inner and the outer block, and removing either removes it.
    blocks_of_layer: dict[str, list[int]] = {}
    for block in graph.blocks:
        for name in block.layers:
            blocks_of_layer.setdefault(name, []).append(block.index)
    total: torch.Tensor | float = 0.0
    for layer in graph.layers:
        if layer.kind == "depthwise":
            cost = counts[layer.out_group] * layer.unit_macs
        else:
            cost = counts[layer.in_group] * counts[layer.out_group] * layer.unit_macs
        for block in blocks_of_layer.get(layer.name, []):
            if blocks is not None and block in blocks:
                cost = cost * blocks[block]
        total = total + cost
    # float64, so that counts of large networks stay exact integers.
    return torch.as_tensor(total, dtype=torch.float64) if not isinstance(total, torch.Tensor) else total


def channel_costs(graph: ChannelGraph) -> dict[int, float]:
    """Return, per prunable group, the MACs per sample that one of its channels costs in the dense network."""
    counts = {
        group.index: torch.tensor(float(group.channels), dtype=torch.float64, requires_grad=True)
        for group in graph.prunable_groups
    }
    total = macs_from_counts(graph, counts)
    gradients = torch.autograd.grad(total, list(counts.values())) if counts else []
    return {index: float(gradient) for index, gradient in zip(counts, gradients, strict=True)}


def block_costs(graph: ChannelGraph) -> dict[int, float]:
    """Return, per residual block, the MACs per sample that its branch costs in the dense network."""
    return {
        block.index: float(dense_macs(graph)) - float(macs_from_counts(graph, {}, {block.index: 0.0}))
        for block in graph.blocks
    }


def dense_macs(graph: ChannelGraph) -> float:
    """Return the MACs per sample of the network with every channel kept."""
    return float(macs_from_counts(graph, {}))


def fit_masks_to_budget(
    graph: ChannelGraph,
    scores: dict[int, torch.Tensor],
    flops_reduction: float,
    tolerance: float,
    removed_blocks: set[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Return keep masks (``score > 0.5``) adjusted by score order until the MACs reduction is in the budget.

    If fewer MACs than ``flops_reduction`` are removed, the open channels with the lowest
    scores are closed until enough are. If more than ``flops_reduction + tolerance`` are
    removed, the closed channels with the highest scores are opened while the reduction
    stays at or above ``flops_reduction``. Returns the masks as they are when they already fit.
    The blocks in ``removed_blocks`` stay removed and cost nothing.
    """
    masks = {index: (score.detach().cpu() > THRESHOLD).clone() for index, score in scores.items()}
    dense = dense_macs(graph)
    blocks = dict.fromkeys(removed_blocks or (), 0.0)

    def reduction() -> float:
        kept = {index: float(mask.sum()) for index, mask in masks.items()}
        return 1.0 - float(macs_from_counts(graph, kept, blocks)) / dense

    candidates = [
        (float(score), index, channel)
        for index, group_scores in scores.items()
        for channel, score in enumerate(group_scores.detach().cpu().tolist())
    ]
    if reduction() < flops_reduction:
        for _, index, channel in sorted(candidate for candidate in candidates if masks[candidate[1]][candidate[2]]):
            masks[index][channel] = False
            if reduction() >= flops_reduction:
                break
    elif reduction() > flops_reduction + tolerance:
        closed = [candidate for candidate in candidates if not masks[candidate[1]][candidate[2]]]
        for _, index, channel in sorted(closed, reverse=True):
            masks[index][channel] = True
            if reduction() < flops_reduction:
                masks[index][channel] = False
                break
            if reduction() <= flops_reduction + tolerance:
                break
    return masks


def reopen_blocks_to_budget(
    graph: ChannelGraph,
    masks: dict[int, torch.Tensor],
    block_scores: dict[int, float],
    removed_blocks: set[int],
    flops_reduction: float,
    tolerance: float,
) -> set[int]:
    """Return ``removed_blocks`` less the blocks reopened, highest score first, until the budget is not exceeded.

    Closing channels cannot undo an overshoot that removed blocks caused. So while more
    than ``flops_reduction + tolerance`` of the MACs are removed with the channels of
    ``masks``, the removed block with the highest score reopens. The last block reopened
    may leave the reduction below ``flops_reduction``; closing channels
    (:func:`fit_masks_to_budget`) then makes up the difference.
    """
    dense = dense_macs(graph)
    kept_channels = {index: float(mask.sum()) for index, mask in masks.items()}
    removed = set(removed_blocks)

    def reduction() -> float:
        return 1.0 - float(macs_from_counts(graph, kept_channels, dict.fromkeys(removed, 0.0))) / dense

    for block in sorted(removed_blocks, key=lambda index: block_scores[index], reverse=True):
        if reduction() <= flops_reduction + tolerance:
            break
        removed.discard(block)
    return removed


def round_kept_channels(
    graph: ChannelGraph,
    scores: dict[int, torch.Tensor],
    masks: dict[int, torch.Tensor],
    multiple: int,
    flops_reduction: float,
    tolerance: float,
    removed_blocks: set[int] | None = None,
) -> dict[int, torch.Tensor]:
    """Return masks that keep a multiple of ``multiple`` channels (or all) in every group, chosen by score.

    Convolution kernels on CPUs and GPUs are fastest when channel counts are multiples
    of 4, 8 or 16; a network pruned to odd widths runs slower than its FLOPs suggest.
    Each group's kept count is first rounded to the nearest allowed count. While fewer
    MACs than ``flops_reduction`` are removed, the group whose next step down closes the
    lowest-scoring channels steps down. While more than ``flops_reduction + tolerance``
    are removed, the group whose next step up opens the highest-scoring channels steps
    up, as long as the reduction stays at or above ``flops_reduction``. Within a group
    the channels with the highest ``scores`` are kept. The blocks in ``removed_blocks``
    stay removed and cost nothing.
    """
    if multiple <= 1:
        return {index: mask.clone() for index, mask in masks.items()}
    widths = {group.index: group.channels for group in graph.prunable_groups}
    allowed = {index: sorted({*range(multiple, width + 1, multiple), width}) for index, width in widths.items()}
    ranked = {index: torch.argsort(scores[index].detach().cpu().float(), descending=True) for index in masks}
    counts = {
        index: min(allowed[index], key=lambda count: (abs(count - int(mask.sum())), count))
        for index, mask in masks.items()
    }
    dense = dense_macs(graph)
    blocks = dict.fromkeys(removed_blocks or (), 0.0)

    def reduction() -> float:
        kept = {index: float(count) for index, count in counts.items()}
        return 1.0 - float(macs_from_counts(graph, kept, blocks)) / dense

    def mean_score(index: int, start: int, stop: int) -> float:
        return float(scores[index].detach().cpu().float()[ranked[index][start:stop]].mean())

    def neighbour(index: int, direction: int) -> int | None:
        position = allowed[index].index(counts[index]) + direction
        return allowed[index][position] if 0 <= position < len(allowed[index]) else None

    while reduction() < flops_reduction:
        steps = [
            (mean_score(index, lower, counts[index]), index, lower)
            for index in counts
            if (lower := neighbour(index, -1)) is not None
        ]
        if not steps:
            break
        _, index, lower = min(steps)
        counts[index] = lower
    while reduction() > flops_reduction + tolerance:
        steps = [
            (mean_score(index, counts[index], higher), index, higher)
            for index in counts
            if (higher := neighbour(index, +1)) is not None
        ]
        opened = False
        for _, index, higher in sorted(steps, reverse=True):
            previous = counts[index]
            counts[index] = higher
            if reduction() >= flops_reduction:
                opened = True
                break
            counts[index] = previous
        if not opened:
            break

    rounded = {}
    for index, count in counts.items():
        mask = torch.zeros(widths[index], dtype=torch.bool)
        mask[ranked[index][:count]] = True
        rounded[index] = mask
    return rounded
