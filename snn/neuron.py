"""The IIR-SNN spiking neuron: leaky integrate-and-fire with a learnable threshold and leak.

One timestep of a layer, with membrane potential ``u``, input current ``x``, threshold
``threshold`` and leak ``leak`` (one scalar each per layer)::

    u <- min(leak, 1) * u + x
    spike = 1 if u / threshold - 1 > 0 else 0
    u <- u - spike * threshold                  (soft reset)

The spike's gradient is the triangle surrogate ``gamma * max(0, 1 - |u / threshold - 1|)``
with gamma 0.3, as in the code of Chowdhury, Rathi and Roy, "One Timestep is All You
Need" (arXiv 2110.05929; github.com/SayeedChowdhury/IIR-SNN, ``LinearSpike``).

The node is a SpikingJelly 2.x ``BaseNode``, so ``functional.reset_net`` clears its
membrane potential and ``step_mode='m'`` takes input ``[T, N, ...]``. SpikingJelly's
own LIF nodes take the threshold as a float, so it cannot be learned with them.
"""

import torch
import torch.nn as nn
from spikingjelly.activation_based import neuron, surrogate
from torch.utils.hooks import RemovableHandle

# Height of the triangle surrogate gradient at the threshold.
TRIANGLE_GAMMA = 0.3


class _TriangleSpike(torch.autograd.Function):
    """Heaviside step ``x > 0`` forward, and ``gamma * max(0, 1 - |x|)`` times the output gradient backward."""

    @staticmethod
    def forward(x: torch.Tensor, gamma: float) -> torch.Tensor:
        return (x > 0).to(x.dtype)

    @staticmethod
    def setup_context(ctx, inputs: tuple[torch.Tensor, float], output: torch.Tensor) -> None:
        x, gamma = inputs
        ctx.save_for_backward(x)
        ctx.gamma = gamma

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        surrogate_gradient = ctx.gamma * torch.clamp(1.0 - x.abs(), min=0.0)
        return grad_output * surrogate_gradient, None


class TriangleSurrogate(surrogate.SurrogateFunctionBase):
    """Triangle surrogate gradient of the spike, ``gamma * max(0, 1 - |x|)`` for ``x = u / threshold - 1``.

    SpikingJelly 2.0's ``PiecewiseQuadratic(alpha=1)`` has the same triangle shape, but
    its height is fixed at 1, and IIR-SNN scales it by ``gamma``. With ``spiking=False``
    the module returns the smooth function whose derivative is the surrogate, as
    SpikingJelly's surrogates do.
    """

    def __init__(self, gamma: float = TRIANGLE_GAMMA, spiking: bool = True) -> None:
        if gamma <= 0:
            raise ValueError(f"triangle surrogate gamma must be > 0, got {gamma}")
        super().__init__(spiking=spiking, gamma=gamma)

    @staticmethod
    def spiking_function(x: torch.Tensor, gamma: float) -> torch.Tensor:
        return _TriangleSpike.apply(x, gamma)

    @staticmethod
    def primitive_function(x: torch.Tensor, gamma: float) -> torch.Tensor:
        # gamma times the cumulative distribution of the unit triangle on [-1, 1].
        below = 0.5 * torch.clamp(x + 1.0, min=0.0, max=1.0) ** 2
        above = 0.5 * torch.clamp(1.0 - x, min=0.0, max=1.0) ** 2
        return gamma * torch.where(x < 0, below, 1.0 - above)


class IIRLIFNode(neuron.BaseNode):
    """Leaky integrate-and-fire neuron layer with a learnable scalar threshold and leak, and soft reset.

    Args:
        threshold: initial firing threshold, > 0 (a conversion sets it from the layer's
            pre-activation on calibration data).
        leak: initial leak of the membrane potential per timestep, in (0, 1]. 1.0 is a
            pure integrate-and-fire neuron, where IIR-SNN starts.
        surrogate_function: the spike's surrogate gradient, by default a triangle with gamma 0.3.
        detach_reset: keep the spike out of the reset's gradient, as IIR-SNN's code does
            (it subtracts ``threshold * (u / threshold - 1 > 0)``). The threshold still gets
            a gradient through the reset.
        step_mode: ``'m'`` takes ``[T, N, ...]`` and returns spikes of the same shape.
            ``'s'`` takes one timestep ``[N, ...]``.

    The leak is used as ``min(leak, 1)`` in the forward pass, so the membrane potential
    never grows by itself, and :meth:`clamp_leak_` (or :func:`register_leak_clamp` on the
    optimizer) keeps the parameter itself at most 1 after each optimizer step.

    NOTE: nothing keeps the threshold positive while it is trained (IIR-SNN's code does
    not either). A threshold at or below 0 divides by zero or inverts the firing condition.

    While :attr:`record_spikes` is true, every forward adds to :attr:`spike_count` (the
    number of spikes) and :attr:`neuron_timesteps` (neurons times timesteps times
    images), so that ``spike_count / neuron_timesteps`` is the spike rate. The counters
    survive ``functional.reset_net``, and :meth:`reset_spike_counts` clears them.
    """

    def __init__(
        self,
        threshold: float = 1.0,
        leak: float = 1.0,
        surrogate_function: surrogate.SurrogateFunctionBase | None = None,
        detach_reset: bool = True,
        step_mode: str = "m",
    ) -> None:
        threshold = float(threshold)
        leak = float(leak)
        if not threshold > 0 or threshold == float("inf"):
            raise ValueError(f"threshold must be finite and > 0, got {threshold}")
        if not 0 < leak <= 1:
            raise ValueError(f"leak must be in (0, 1], got {leak}")
        if surrogate_function is None:
            surrogate_function = TriangleSurrogate()
        super().__init__(
            v_threshold=threshold,
            v_reset=None,
            surrogate_function=surrogate_function,
            detach_reset=detach_reset,
            step_mode=step_mode,
        )
        # BaseNode stores the threshold as a float, but this node learns it as a parameter.
        del self.v_threshold
        self.threshold = nn.Parameter(torch.tensor(threshold))
        self.leak = nn.Parameter(torch.tensor(leak))

        self.record_spikes = False
        self.spike_count = torch.zeros((), dtype=torch.float64)
        self.neuron_timesteps = 0

    def single_step_functional_forward(
        self, inputs: tuple[torch.Tensor, ...], states: tuple[object, ...], **kwargs: object
    ) -> tuple[tuple[torch.Tensor, ...], tuple[object, ...]]:
        """Advance one timestep: integrate ``inputs[0]``, fire, and soft-reset the membrane potential ``states[0]``."""
        current = inputs[0]
        potential = states[0]
        potential = self.effective_leak() * potential + current
        spike = self.surrogate_function(potential / self.threshold - 1.0)
        reset_spike = spike.detach() if self.detach_reset else spike
        potential = potential - reset_spike * self.threshold
        return (spike,), (potential, *states[1:])

    def effective_leak(self) -> torch.Tensor:
        """Return ``min(leak, 1)``, the leak the forward pass uses."""
        # torch.clamp(leak, max=1) has zero gradient at leak == 1, where IIR-SNN starts,
        # so the leak could never learn. This form passes the gradient there.
        return self.leak - torch.relu(self.leak - 1.0)

    def single_step_forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        spike = super().single_step_forward(x, *args, **kwargs)
        self._record(spike)
        return spike

    def multi_step_forward(self, x_seq: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        spikes = super().multi_step_forward(x_seq, *args, **kwargs)
        self._record(spikes)
        return spikes

    def _record(self, spikes: torch.Tensor) -> None:
        if not self.record_spikes:
            return
        # The count stays on the spikes' device, so recording adds no host synchronisation.
        if self.spike_count.device != spikes.device:
            self.spike_count = self.spike_count.to(spikes.device)
        self.spike_count += spikes.detach().sum(dtype=torch.float64)
        self.neuron_timesteps += spikes.numel()

    def reset_spike_counts(self) -> None:
        """Set :attr:`spike_count` and :attr:`neuron_timesteps` to zero."""
        self.spike_count = torch.zeros((), dtype=torch.float64, device=self.threshold.device)
        self.neuron_timesteps = 0

    @torch.no_grad()
    def clamp_leak_(self) -> None:
        """Clamp the leak parameter to at most 1 in place."""
        self.leak.clamp_(max=1.0)

    def extra_repr(self) -> str:
        return (
            f"threshold={self.threshold.item():.4g}, leak={self.leak.item():.4g}, "
            f"detach_reset={self.detach_reset}, step_mode={self.step_mode}"
        )


def spiking_neurons(module: nn.Module) -> list[tuple[str, IIRLIFNode]]:
    """Return the ``(name, neuron)`` pairs of every :class:`IIRLIFNode` in ``module``, in forward order."""
    return [(name, child) for name, child in module.named_modules() if isinstance(child, IIRLIFNode)]


def clamp_leaks_(module: nn.Module) -> None:
    """Clamp the leak of every :class:`IIRLIFNode` in ``module`` to at most 1, in place."""
    for _, node in spiking_neurons(module):
        node.clamp_leak_()


def register_leak_clamp(optimizer: torch.optim.Optimizer, module: nn.Module) -> RemovableHandle:
    """Clamp the leaks of ``module``'s neurons to at most 1 after every ``optimizer.step()``.

    The hook is registered on the optimizer itself, so it also runs when Lightning
    steps a wrapped optimizer. Remove it with the returned handle's ``remove()``.
    """

    def clamp_after_step(optimizer: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        clamp_leaks_(module)

    return optimizer.register_step_post_hook(clamp_after_step)
