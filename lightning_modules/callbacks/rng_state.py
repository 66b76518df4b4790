"""Random-generator state saved in checkpoints, so a resumed run draws what the uninterrupted one would.

Lightning checkpoints hold weights, optimizer and loop state but not the random
generators, so after a resume the shuffling and augmentation of the following epochs
differ from an uninterrupted run. This callback stores the generators' state with
every checkpoint and restores it on resume.
"""

import random
from typing import Any

import lightning as L
import numpy as np
import torch


def collect_rng_state() -> dict[str, Any]:
    """Return the state of torch's CPU and CUDA generators, NumPy's and Python's, as tensors and ints.

    Only tensors, lists and numbers are stored, so the state loads with ``torch.load(weights_only=True)``.
    """
    kind, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_state, gauss = random.getstate()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "kind": kind,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "position": int(position),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "python": {"version": version, "state": list(python_state), "gauss": gauss},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore generators from :func:`collect_rng_state`'s output."""
    torch.set_rng_state(state["torch"])
    numpy_state = state["numpy"]
    np.random.set_state(
        (
            numpy_state["kind"],
            numpy_state["keys"].numpy().astype(np.uint32),
            numpy_state["position"],
            numpy_state["has_gauss"],
            numpy_state["cached_gaussian"],
        )
    )
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"]), python_state["gauss"]))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


class RNGStateCallback(L.Callback):
    """Save the random generators' state in each checkpoint and restore it on resume.

    Under DDP each rank has its own generators. The checkpoint contains rank zero's
    state, and every rank restores it.
    """

    def state_dict(self) -> dict[str, Any]:
        return collect_rng_state()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        restore_rng_state(state_dict)
