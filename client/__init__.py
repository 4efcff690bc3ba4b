"""The typed Python client, the mixture sampler and the `gradmix` CLI.

Data loaders install only the client extra (grpcio, protobuf, numpy);
`gradmix.client.torch_data` is the one module that needs torch, and
`SketchWriter`'s store path the one that needs the store.
"""

from gradmix.client import errors
from gradmix.client.client import SelectionClient
from gradmix.client.follow import MixtureFollower, follow
from gradmix.client.retry import RetryPolicy
from gradmix.client.sampler import MixtureSampler
from gradmix.client.sketch_writer import SketchWriter
from gradmix.client.types import (
    Anchor,
    Calibration,
    EstimateResult,
    Horizon,
    Job,
    JobEvent,
    JobSpec,
    Mixture,
    PolicySettings,
    Selection,
    ServerInfo,
    SketchSpec,
    SketchSpecError,
    Task,
)
from gradmix.client.watch import MixtureWatch

__all__ = [
    "Anchor",
    "Calibration",
    "EstimateResult",
    "Horizon",
    "Job",
    "JobEvent",
    "JobSpec",
    "Mixture",
    "MixtureFollower",
    "MixtureSampler",
    "MixtureWatch",
    "PolicySettings",
    "RetryPolicy",
    "Selection",
    "SelectionClient",
    "ServerInfo",
    "SketchSpec",
    "SketchSpecError",
    "SketchWriter",
    "Task",
    "errors",
    "follow",
]
