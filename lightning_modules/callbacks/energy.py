"""Energy: measured energy of fit and test, and estimated compute energy per inference.

The two are different quantities and are reported under different names:

- Measured energy comes from hardware counters through Zeus' ``ZeusMonitor``:
  NVIDIA GPUs through NVML, and CPU packages and DRAM through RAPL where the
  kernel exposes it. Where neither can be read, the callback reports
  "unavailable" with the reason, never zero.
- Estimated energy is the compute energy of one inference from operation counts,
  with 45 nm figures from Horowitz, "Computing's energy problem", ISSCC 2014:
  4.6 pJ per 32-bit float MAC and 0.9 pJ per 32-bit float accumulate. Memory
  traffic is not included. This is the convention of the spiking-network literature.
"""

import os
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_modules.callbacks.flops import count_forward_cost, example_input_of

RAPL_DIR = "/sys/class/powercap/intel-rapl"

# Windows shorter than this are below the resolution of NVML's energy counter.
MIN_TRUSTED_WINDOW_S = 0.1


@dataclass(frozen=True)
class OperationCounts:
    """Operations of one inference: MACs (multiply-accumulates) and accumulates (additions only).

    A spiking network accumulates a weight for each incoming spike, so its synaptic
    operations are accumulates; a sampler multiplies its network's counts by its steps.
    """

    macs: float
    accumulates: float = 0.0
    source: str = "one forward pass, torch.utils.flop_counter"


@dataclass(frozen=True)
class MeasuredEnergy:
    """Energy read from hardware counters over one window; ``joules`` is None when unavailable."""

    joules: float | None
    seconds: float
    detail: str


def estimate_inference_energy(
    counts: OperationCounts, energy_per_mac_pj: float, energy_per_accumulate_pj: float
) -> float:
    """Return the estimated compute energy of one inference, in joules."""
    picojoules = counts.macs * energy_per_mac_pj + counts.accumulates * energy_per_accumulate_pj
    return picojoules * 1e-12


def operation_counts_of(pl_module: L.LightningModule) -> OperationCounts:
    """Return the module's own counts (``operation_counts()``) or those of its forward pass."""
    if hasattr(pl_module, "operation_counts"):
        return pl_module.operation_counts()
    if hasattr(pl_module, "cost_model"):
        model, example = pl_module.cost_model()
    else:
        model, example = pl_module, example_input_of(pl_module)
    return OperationCounts(macs=count_forward_cost(model, example).macs)


def _rapl_unavailable_reason() -> str | None:
    if not os.path.isdir(RAPL_DIR):
        return f"no RAPL counters ({RAPL_DIR} does not exist)"
    if not os.access(os.path.join(RAPL_DIR, "intel-rapl:0", "energy_uj"), os.R_OK):
        return f"RAPL counters under {RAPL_DIR} are not readable by this user (reading them usually needs root)"
    return None


class EnergyMeter:
    """Measure energy over named windows with Zeus, or explain why it cannot.

    Only the GPU that this process trains on is measured, so that under DDP each rank
    measures its own device and the callback sums over ranks. CPU packages are read
    by local rank zero only, because all ranks of a node share them.
    """

    def __init__(self, gpu_index: int | None, read_cpu: bool) -> None:
        self.monitor = None
        self.unavailable_reason: str | None = None
        self._starts: dict[str, float] = {}

        reasons = []
        if gpu_index is None:
            reasons.append("no NVIDIA GPU in use")
        rapl_reason = _rapl_unavailable_reason() if read_cpu else "CPU counters are read by local rank 0"
        if rapl_reason:
            reasons.append(rapl_reason)
        gpu_indices = [] if gpu_index is None else [gpu_index]
        cpu_indices = None if rapl_reason is None else []

        if not gpu_indices and cpu_indices == []:
            self.unavailable_reason = "; ".join(reasons)
            return
        try:
            from zeus.monitor import ZeusMonitor

            self.monitor = ZeusMonitor(gpu_indices=gpu_indices, cpu_indices=cpu_indices)
        except Exception as error:  # Zeus raises its own errors for each driver problem.
            self.unavailable_reason = f"Zeus could not start: {type(error).__name__}: {error}"

    def begin(self, window: str) -> None:
        self._starts[window] = time.perf_counter()
        if self.monitor is not None:
            self.monitor.begin_window(window)

    def end(self, window: str) -> MeasuredEnergy:
        seconds = time.perf_counter() - self._starts.pop(window)
        if self.monitor is None:
            return MeasuredEnergy(None, seconds, f"unavailable: {self.unavailable_reason}")

        measurement = self.monitor.end_window(window)
        parts = {f"gpu{index}": joules for index, joules in measurement.gpu_energy.items()}
        parts.update({f"cpu{index}": joules for index, joules in (measurement.cpu_energy or {}).items()})
        parts.update({f"dram{index}": joules for index, joules in (measurement.dram_energy or {}).items()})
        detail = ", ".join(f"{name} {joules:.1f} J" for name, joules in parts.items())
        if seconds < MIN_TRUSTED_WINDOW_S:
            detail += f" (window of {seconds * 1e3:.0f} ms is too short to trust)"
        return MeasuredEnergy(sum(parts.values()), seconds, detail)


class EnergyCallback(L.Callback):
    """Measure the energy of fit and test, and estimate compute energy per inference.

    Args:
        energy_per_mac_pj: energy of one multiply-accumulate, in picojoules.
        energy_per_accumulate_pj: energy of one accumulate, in picojoules.
        measure: read hardware energy counters; false skips measurement entirely.
    """

    def __init__(
        self, energy_per_mac_pj: float = 4.6, energy_per_accumulate_pj: float = 0.9, measure: bool = True
    ) -> None:
        if energy_per_mac_pj < 0 or energy_per_accumulate_pj < 0:
            raise ValueError(
                f"energies per operation must be >= 0 pJ, got energy_per_mac_pj={energy_per_mac_pj}, "
                f"energy_per_accumulate_pj={energy_per_accumulate_pj}"
            )
        self.energy_per_mac_pj = energy_per_mac_pj
        self.energy_per_accumulate_pj = energy_per_accumulate_pj
        self.measure = measure
        self.meter: EnergyMeter | None = None
        self.measured: dict[str, MeasuredEnergy] = {}
        self.counts: OperationCounts | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.meter is not None or not self.measure:
            return
        device = pl_module.device if pl_module.device.type == "cuda" else trainer.strategy.root_device
        gpu_index = device.index if device.type == "cuda" else None
        self.meter = EnergyMeter(gpu_index, read_cpu=trainer.local_rank == 0)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.meter is not None:
            self.meter.begin("fit")

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.meter is not None:
            self._finish_window("fit", trainer)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.meter is not None:
            self.meter.begin("test")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.meter is not None:
            self._finish_window("test", trainer)
        self._estimate(trainer, pl_module)

    def _finish_window(self, window: str, trainer: L.Trainer) -> None:
        measured = self.meter.end(window)

        # Every rank takes part in the reduction, with 0 where it measured nothing, so the
        # collective call cannot hang. The total is reported only if some rank measured.
        local = torch.tensor(measured.joules or 0.0, dtype=torch.float64, device=trainer.strategy.root_device)
        total = float(trainer.strategy.reduce(local, reduce_op="sum"))
        if measured.joules is not None:
            detail = measured.detail
            if trainer.world_size > 1:
                detail += f"; total over {trainer.world_size} ranks, parts of rank {trainer.global_rank}"
            measured = MeasuredEnergy(total, measured.seconds, detail)
            for logger in trainer.loggers:
                logger.log_metrics({f"energy/{window}_measured_j": total}, step=trainer.global_step)
        # The reason for missing energy is logged in full once. Later windows (test after fit) refer to it.
        reason_logged = measured.joules is None and any(m.detail == measured.detail for m in self.measured.values())
        self.measured[window] = measured
        summary = "unavailable, for the reason given above" if reason_logged else _format_measured(measured)
        rank_zero_info(f"[energy] {window}: measured {summary}")

    def _estimate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        try:
            self.counts = operation_counts_of(pl_module)
        except ValueError as error:
            rank_zero_warn(f"[energy] no estimate of inference energy: {error}")
            return
        joules = estimate_inference_energy(self.counts, self.energy_per_mac_pj, self.energy_per_accumulate_pj)
        for logger in trainer.loggers:
            logger.log_metrics({"energy/estimated_inference_uj": joules * 1e6}, step=trainer.global_step)
        rank_zero_info(f"[energy] estimated {joules * 1e6:.3f} uJ per inference ({self.constants_text()})")

    def constants_text(self) -> str:
        """Describe the energy constants, to print next to every estimate."""
        return (
            f"{self.energy_per_mac_pj} pJ/MAC, {self.energy_per_accumulate_pj} pJ/accumulate, "
            "45 nm, Horowitz ISSCC 2014, compute only"
        )

    def summary(self) -> dict[str, Any]:
        """Return estimated and measured energy, for the run summary."""
        result: dict[str, Any] = {}
        if self.counts is not None:
            joules = estimate_inference_energy(self.counts, self.energy_per_mac_pj, self.energy_per_accumulate_pj)
            result["estimated_inference_energy_uj"] = joules * 1e6
            result["estimated_energy_constants"] = self.constants_text()
            result["estimated_energy_counts"] = (
                f"{self.counts.macs:.4g} MACs + {self.counts.accumulates:.4g} accumulates ({self.counts.source})"
            )
        for window, measured in self.measured.items():
            result[f"measured_{window}_energy"] = _format_measured(measured)
        if not self.measure:
            result["measured_energy"] = "not measured (callbacks.energy.measure=false)"
        return result


def _format_measured(measured: MeasuredEnergy) -> str:
    if measured.joules is None:
        return measured.detail
    return f"{measured.joules:.1f} J over {measured.seconds:.1f} s ({measured.detail})"
