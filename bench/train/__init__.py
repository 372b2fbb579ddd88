"""`bench run train`: training tricks measured on a tiny LM built from any registered attention.

* :mod:`.spec` — the training spec: studies read from TOML, command-line overrides, validation;
* :mod:`.tasks` — the quality tasks, MQAR (associative recall) and bytes (byte-level language modelling);
* :mod:`.model` — TinyLM, the model trained, with its layer sharing and GELU forms;
* :mod:`.loop` — a TrainTask per grid point, the loop that trains it and what is measured on the way.

>>> from bench import train
>>> spec = train.validate(train.override(train.load("quick", None), only=("gelu",)))
>>> tasks = train.expand(spec, "cpu")  # what the runner executes, one row each
"""

from .loop import TrainTask, accumulate_gradients, evaluate, expand, gradient_rel_error
from .spec import Study, TrainSpec, load, override, validate

__all__ = ["Study", "TrainSpec", "TrainTask", "accumulate_gradients", "evaluate", "expand", "gradient_rel_error",
           "load", "override", "validate"]
