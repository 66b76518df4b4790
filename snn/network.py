"""A spiking image classifier: direct input encoding, spiking layers, and a non-spiking readout."""

import torch
import torch.nn as nn
import torch.nn.functional as F
from spikingjelly.activation_based import base, functional

from snn.neuron import IIRLIFNode

OUTPUT_REDUCTIONS = ("mean", "sum")


class RateGatedMaxPool2d(base.MemoryModule):
    """Max-pooling for spikes: each window passes the spikes of the input that has fired most so far.

    Plain max-pooling of binary spikes fires whenever any input in the window fires, so
    its spike rate can far exceed the largest input rate, and a converted network then
    gets less accurate as T grows. Selecting the input by its running spike count keeps
    the output binary and its rate close to the maximum input rate. At the first
    timestep, and so at T=1, it is plain max-pooling. Ties go to the first input in the
    window, which is the one torch's ``max_pool2d`` returns on CPU. The gradient flows to
    the selected input, as in ``nn.MaxPool2d``.

    It takes multi-step input ``[T, N, C, H, W]``. ``functional.reset_net`` clears the running counts.
    """

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
        ceil_mode: bool = False,
        step_mode: str = "m",
    ) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.stride = kernel_size if stride is None else stride
        self.padding = padding
        self.ceil_mode = ceil_mode
        self.step_mode = step_mode
        self.register_memory("spike_counts", 0.0)

    def single_step_forward(self, spikes: torch.Tensor) -> torch.Tensor:
        counts = self.spike_counts + spikes.detach()
        self.spike_counts = counts
        _, indices = F.max_pool2d(
            counts, self.kernel_size, self.stride, self.padding, ceil_mode=self.ceil_mode, return_indices=True
        )
        return spikes.flatten(2).gather(2, indices.flatten(2)).view(indices.shape)

    def multi_step_forward(self, spike_sequence: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.single_step_forward(spikes) for spikes in spike_sequence])

    def extra_repr(self) -> str:
        return (
            f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}, "
            f"ceil_mode={self.ceil_mode}, step_mode={self.step_mode}"
        )


class SpikeReadout(nn.Module):
    """Non-spiking output layer: global average pooling of the spikes, then a linear classifier.

    Takes spikes ``[T, N, C, H, W]`` (or ``[T, N, C]``) and returns one output per
    timestep, ``[T, N, num_classes]``. It has no state, so it needs no reset.
    """

    def __init__(self, classifier: nn.Linear) -> None:
        super().__init__()
        self.classifier = classifier

    def forward(self, spikes: torch.Tensor) -> torch.Tensor:
        if spikes.dim() > 3:
            spikes = spikes.flatten(3).mean(dim=3)
        return self.classifier(spikes)


class SpikingNetwork(nn.Module):
    """Spiking classifier that maps images ``[N, C, H, W]`` to logits ``[N, num_classes]``.

    Direct input encoding: the analog image is the input at every timestep, and the
    first synaptic layer (``encoder``, usually a convolution) turns it into the input
    current of the first spiking layer. Because the image is the same at every timestep,
    the encoder runs once and its output is repeated over the ``timesteps``.

    ``features`` runs in SpikingJelly's multi-step mode on ``[T, N, ...]``: stateless
    layers wrapped in ``layer.SeqToANNContainer``, and :class:`IIRLIFNode` neurons.
    Its first module receives the encoder's current, so it is normally a neuron.

    ``readout`` does not spike. Its outputs are averaged over the timesteps
    (``output_reduction="mean"``), which keeps the logits on the same scale for every T,
    or summed (``"sum"``), as IIR-SNN's own code does. The two differ only by the
    factor T, so they predict the same class.

    Every forward resets the membrane potentials with ``functional.reset_net`` before
    it starts and after it ends, so no state leaks from one batch to the next and the
    caller never resets anything.
    """

    def __init__(
        self,
        encoder: nn.Module,
        features: nn.Sequential,
        readout: SpikeReadout,
        timesteps: int,
        output_reduction: str = "mean",
    ) -> None:
        super().__init__()
        if output_reduction not in OUTPUT_REDUCTIONS:
            raise ValueError(f"output_reduction must be one of {OUTPUT_REDUCTIONS}, got {output_reduction!r}")
        if not any(isinstance(module, IIRLIFNode) for module in features.modules()):
            raise ValueError("features contain no IIRLIFNode, so the network would not spike")
        for name, module in features.named_modules():
            if isinstance(module, IIRLIFNode) and module.step_mode != "m":
                raise ValueError(
                    f"neuron features.{name} has step_mode={module.step_mode!r}, but SpikingNetwork runs its "
                    "features on [T, N, ...] at once; create the neuron with step_mode='m'"
                )

        self.encoder = encoder
        self.features = features
        self.readout = readout
        self.output_reduction = output_reduction
        self.timesteps = 1
        self.set_timesteps(timesteps)

    def set_timesteps(self, timesteps: int) -> None:
        """Set the number of timesteps T of every following forward pass."""
        if isinstance(timesteps, bool) or not isinstance(timesteps, int) or timesteps < 1:
            raise ValueError(f"timesteps must be an integer >= 1, got {timesteps!r}")
        self.timesteps = timesteps

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits ``[N, num_classes]``: the readout's outputs averaged (or summed) over T."""
        outputs = self.forward_timesteps(images)
        if self.output_reduction == "sum":
            return outputs.sum(dim=0)
        return outputs.mean(dim=0)

    def forward_timesteps(self, images: torch.Tensor) -> torch.Tensor:
        """Return the readout's output at every timestep, ``[T, N, num_classes]``, for images ``[N, C, H, W]``."""
        if images.dim() != 4:
            raise ValueError(
                f"SpikingNetwork expects a batch of images [N, C, H, W], got shape {tuple(images.shape)}. "
                "It repeats each image over the timesteps itself, so pass the images without a time dimension"
            )
        functional.reset_net(self)
        try:
            current = self.encoder(images)
            current_sequence = current.unsqueeze(0).expand(self.timesteps, *current.shape)
            spikes = self.features(current_sequence)
            return self.readout(spikes)
        finally:
            # Frees the last membrane potentials, and the autograd graph they reference,
            # instead of keeping them until the next batch.
            functional.reset_net(self)

    def extra_repr(self) -> str:
        return f"timesteps={self.timesteps}, output_reduction={self.output_reduction!r}"
