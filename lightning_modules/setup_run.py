"""Build the pieces of a run from a Hydra config: data, network, module, callbacks, loggers, trainer."""

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import Logger
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)


def instantiate_user_object(node: DictConfig, **kwargs: Any) -> Any:
    """Instantiate ``node``; a user-fixable error (a bad value, a missing file) is raised as itself.

    Hydra wraps every error of a target in ``InstantiationException``. The errors of
    leanlight's own targets already name the bad value and the fix, so the wrapper
    would only hide their type from callers and tests.
    """
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, (ValueError, FileNotFoundError)):
            raise error.__cause__ from None
        rejected = _rejected_setting(node, error.__cause__)
        if rejected is not None:
            # Typically an experiment's setting for one model left behind when the command line
            # picks another model (experiment=iir_snn_digits model=resnet20).
            raise ValueError(
                f"{node.get('_target_')} does not accept the setting {rejected!r} of this config "
                f"({error.__cause__}). If an experiment set it for another model or module, remove it on the "
                f"command line (for a model, ~model.{rejected}) or pick a matching experiment"
            ) from error.__cause__
        raise


def _rejected_setting(node: DictConfig, cause: BaseException | None) -> str | None:
    """Return the config key that ``cause`` rejects as an unexpected keyword argument, else None.

    A TypeError about a keyword that is not a key of ``node`` comes from code inside the
    target, not from the config, and is left as it is.
    """
    if not isinstance(cause, TypeError):
        return None
    match = re.search(r"unexpected keyword argument '(\w+)'", str(cause))
    if match is None or match.group(1) not in node:
        return None
    return match.group(1)


def instantiate_callbacks(callbacks_cfg: DictConfig | None, has_logger: bool) -> list[L.Callback]:
    """Instantiate every entry of the ``callbacks`` group that has a ``_target_``.

    Without a logger, the learning-rate monitor is left out: it has nowhere to write.
    """
    if not callbacks_cfg:
        return []
    callbacks = [instantiate(entry) for entry in callbacks_cfg.values() if entry and "_target_" in entry]
    if not has_logger:
        callbacks = [callback for callback in callbacks if not isinstance(callback, LearningRateMonitor)]
    return callbacks


def instantiate_loggers(logger_cfg: DictConfig | None) -> list[Logger]:
    """Instantiate every entry of the ``logger`` group; ``logger=none`` gives an empty list."""
    if not logger_cfg:
        return []
    return [instantiate(entry) for entry in logger_cfg.values() if entry and "_target_" in entry]


def resolve_precision(precision: str | int, accelerator: str = "auto") -> str | int:
    """Turn ``"auto"`` into bf16 mixed precision when training on a GPU that supports it, else 32-bit."""
    if precision != "auto":
        return precision
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return "bf16-mixed"
    return "32-true"


def resolve_checkpoint_path(ckpt_path: str | None) -> str | None:
    """Accept a checkpoint file or a run folder; a folder resumes its ``checkpoints/last.ckpt``."""
    if ckpt_path is None:
        return None
    path = Path(ckpt_path).expanduser()
    if path.is_dir():
        last = path / "checkpoints" / "last.ckpt"
        if not last.is_file():
            raise FileNotFoundError(
                f"ckpt_path={ckpt_path} is a folder without checkpoints/last.ckpt; "
                "pass a run folder written by train.py or the path of a .ckpt file"
            )
        return str(last)
    if not path.is_file():
        raise FileNotFoundError(
            f"ckpt_path={ckpt_path} does not exist; pass a .ckpt file or a run folder (logs/<task>/runs/<time>)"
        )
    return str(path)


def check_accelerator(accelerator: str | None) -> None:
    """Raise ``ValueError`` when the config requests a GPU that torch cannot see, and name the alternatives."""
    if str(accelerator) in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator} but torch sees no CUDA GPU (torch.cuda.is_available() is False); "
            "use trainer=cpu, or trainer=default to pick what is there, or install a CUDA build of torch"
        )


def resolve_lightning_checkpoint(ckpt_path: str | None) -> str | None:
    """Resolve ``ckpt_path`` as :func:`resolve_checkpoint_path` does, and check that Lightning can load the file."""
    resolved = resolve_checkpoint_path(ckpt_path)
    if resolved is not None:
        check_checkpoint_file(Path(resolved))
    return resolved


def check_checkpoint_file(path: Path) -> None:
    """Raise ``ValueError`` naming ``path`` if it is not a readable Lightning checkpoint.

    Lightning would otherwise fail deep inside fit or test with a bare ``KeyError`` or a
    zip-reader message. The file is memory-mapped, so the check reads little of it, and
    it is loaded weights-only, as Lightning loads local checkpoints with this torch.
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:
        raise ValueError(
            f"ckpt_path={path} could not be read as a checkpoint ({type(error).__name__}: {error}). "
            "It may be truncated, or not written by torch.save; pass a .ckpt written by train.py or a run folder"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise ValueError(
            f"ckpt_path={path} is not a Lightning checkpoint (it has no 'state_dict'); "
            "pass a .ckpt written by train.py or a run folder"
        )


def summarize_load_error(error: RuntimeError, examples: int = 3) -> str:
    """Condense torch's ``load_state_dict`` error to counts and a few key names.

    torch lists every missing and unexpected key, thousands of characters for a ResNet,
    which buries the one line a user needs.
    """
    key_counts, mismatches = [], []
    for line in str(error).splitlines()[1:]:
        line = line.strip()
        names = re.findall(r'"([^"]+)"', line)
        if line.startswith(("Missing key(s)", "Unexpected key(s)")) and names:
            kind = "missing" if line.startswith("Missing") else "unexpected"
            listed = ", ".join(names[:examples]) + (", ..." if len(names) > examples else "")
            key_counts.append(f"{len(names)} {kind} key(s) ({listed})")
        elif line.startswith("size mismatch"):
            mismatches.append(line.rstrip("."))
    if not key_counts and not mismatches:
        return str(error)

    parts = key_counts + mismatches[:examples]
    if len(mismatches) > examples:
        parts.append(f"{len(mismatches) - examples} more size mismatch(es)")
    return "; ".join(parts)


# Overrides that choose where a run writes or what it loads, not what it trains. Repeating
# them would load the same checkpoint again, or write into the run folder of the checkpoint.
_RUN_PLACEMENT_KEYS = frozenset({"ckpt_path", "train", "test", "run_id", "task_name"})
_RUN_PLACEMENT_GROUPS = ("paths.", "hydra.")


def recorded_overrides(checkpoint: str | Path, output_dir: str | Path) -> list[str] | None:
    """Return the overrides that chose the module, model and data of the run that wrote ``checkpoint``.

    They come from its run folder's ``.hydra/overrides.yaml``, without the keys that place
    the run (:data:`_RUN_PLACEMENT_KEYS`, ``paths.*``, ``hydra.*``). ``checkpoint`` is a file in a run folder's
    ``checkpoints/``. None when the folder has no record, or when it is this run's own
    folder (``output_dir``), whose record Hydra has already replaced with this command's.
    """
    path = Path(checkpoint).resolve()
    run_folder = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    record = run_folder / ".hydra" / "overrides.yaml"
    if run_folder == Path(output_dir).resolve() or not record.is_file():
        return None
    return [str(item) for item in OmegaConf.load(record) if not _places_run(str(item))]


def _places_run(override: str) -> bool:
    """Return whether a Hydra override such as ``+run_id=x`` sets one of the keys that place a run."""
    key = override.lstrip("+~").split("=", 1)[0]
    return key in _RUN_PLACEMENT_KEYS or key.startswith(_RUN_PLACEMENT_GROUPS)


def checkpoint_mismatch_error(
    checkpoint: str, module: L.LightningModule, error: RuntimeError, output_dir: str | Path
) -> ValueError:
    """Return the error for a checkpoint whose weights do not fit this run's module and network."""
    net = getattr(module, "net", None)
    network = f", network {type(net).__name__}" if net is not None else ""
    message = (
        f"the weights in {checkpoint} do not fit this run's module ({type(module).__name__}{network}): "
        f"{summarize_load_error(error)}. "
    )
    overrides = recorded_overrides(checkpoint, output_dir)
    if overrides:
        message += f"The run that wrote it was started with: {' '.join(overrides)}. Pass the same overrides"
    else:
        message += "Pass the experiment, module and model overrides of the run that wrote it"
    return ValueError(message)


def log_resolved_config(cfg: DictConfig, loggers: list[Logger]) -> None:
    """Send the fully resolved config to every logger, so runs can be compared by any key."""
    # Hydra's own section has values that exist only in multiruns; it is not the run's config.
    unresolved = OmegaConf.to_container(cfg, resolve=False)
    unresolved.pop("hydra", None)
    resolved: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(unresolved), resolve=True)
    for logger in loggers:
        logger.log_hyperparams(resolved)
