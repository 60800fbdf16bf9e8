"""What of a config a compiled program depends on: the config part of executable-cache keys.

    key = config_key(cfg)       # every field but those only the host loop reads

`runtime.executables` keys a compiled program by its name, its arguments' signature, the
environment and this: the whole parsed config except `HOST_ONLY_FIELDS`, the fields that no
traced function reads (how long to train, how often to log, save or sample, how many
checkpoints to keep, where a rollback goes). So a resumed run with more steps, or logged more
often, reuses its executables; any other change, including a field added to the config later,
is another key, and compiles.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ddpm_jax.experiment.config import ExperimentConfig

# "group.field" of the fields that only the host's loop reads (checked by a test against the
# modules that trace programs).
HOST_ONLY_FIELDS = frozenset(
    {
        "training.num_train_steps",
        "training.log_every_steps",
        "training.checkpoint_every_steps",
        "training.keep_checkpoints",
        "training.keep_period",
        "training.sample_every_steps",
        "training.allow_config_change",
        "training.resume_step",
        "sampling.num_samples",
    }
)


def config_key(cfg: ExperimentConfig) -> dict[str, Any]:
    """The parsed config as a JSON-able dict {group: {field: value}}, without
    `HOST_ONLY_FIELDS`; values that JSON cannot hold as they are become their `repr`."""
    out: dict[str, Any] = {}
    for group in dataclasses.fields(cfg):
        view = getattr(cfg, group.name)
        values = dataclasses.asdict(view) if dataclasses.is_dataclass(view) else {"": view}
        out[group.name] = {
            k: _jsonable(v)
            for k, v in sorted(values.items())
            if f"{group.name}.{k}" not in HOST_ONLY_FIELDS
        }
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, bool | int | float | str | None):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in sorted(value.items())}
    return repr(value)
