"""Callbacks that measure what a run costs; every technique can use them."""

from lightning_modules.callbacks.data_position import DataPositionCallback
from lightning_modules.callbacks.energy import EnergyCallback, OperationCounts, estimate_inference_energy
from lightning_modules.callbacks.epoch_log import EpochLogCallback
from lightning_modules.callbacks.flops import FlopsCallback, count_forward_cost
from lightning_modules.callbacks.preemption import PreemptionCheckpoint
from lightning_modules.callbacks.rng_state import RNGStateCallback
from lightning_modules.callbacks.throughput import ThroughputCallback

__all__ = [
    "DataPositionCallback",
    "EnergyCallback",
    "EpochLogCallback",
    "FlopsCallback",
    "OperationCounts",
    "PreemptionCheckpoint",
    "RNGStateCallback",
    "ThroughputCallback",
    "count_forward_cost",
    "estimate_inference_energy",
]
