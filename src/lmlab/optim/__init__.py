"""Optimizers, their parameter groups and learning-rate schedules (one module per job)."""

from lmlab.optim.groups import (
    build_optimizer,
    decayed_parameters,
    hidden_matrix_groups,
    optimizer_parameter_groups,
    parameter_groups,
)
from lmlab.optim.muon import MuonWithAdamW
from lmlab.optim.schedules import (
    EpochStepDecay,
    ValidationPlateau,
    lightning_scheduler,
    plateau,
    schedule_arguments,
    step_decay,
    warmup_constant,
    warmup_cosine,
    warmup_linear,
    warmup_stable_decay,
)

__all__ = [
    "EpochStepDecay",
    "MuonWithAdamW",
    "ValidationPlateau",
    "build_optimizer",
    "decayed_parameters",
    "hidden_matrix_groups",
    "lightning_scheduler",
    "optimizer_parameter_groups",
    "parameter_groups",
    "plateau",
    "schedule_arguments",
    "step_decay",
    "warmup_constant",
    "warmup_cosine",
    "warmup_linear",
    "warmup_stable_decay",
]
