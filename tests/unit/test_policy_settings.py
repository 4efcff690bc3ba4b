"""The policy settings are defined once (`gradmix.vocabulary.policy_settings`).

The proto, the client's request type and the server config's job defaults
carry exactly its fields, and client and server refuse the same values.
"""

from __future__ import annotations

import dataclasses

import pytest
from gradmix.client import PolicySettings
from gradmix.client.errors import InvalidArgument
from gradmix.proto.v1 import selection_pb2 as pb
from gradmix.server.config import ServerConfig
from gradmix.vocabulary.policy_settings import (
    DEFAULTABLE_FIELDS,
    FIELDS,
    WIRE_FIELDS,
    PolicyConfig,
    PolicySettingsError,
)

INVALID = [
    {"policy": "best"},
    {"regularization": 1e-9},
    {"regularization": float("nan")},
    {"temperature": -1.0},
    {"temperature": 2e3},
    {"floor": 0.3},
    {"subset_count": 20_001},
    {"subset_fraction": 1.0},
    {"prior_weight": -0.5},
    {"prior_weight": float("inf")},
    {"seed": -1},
    {"smoothing": 1.0},
    {"smoothing": -0.1},
]


def test_the_wire_carries_every_setting_but_the_server_side_bootstrap():
    assert set(FIELDS) - set(WIRE_FIELDS) == {"bootstrap"}
    assert tuple(pb.PolicySettings.DESCRIPTOR.fields_by_name) == WIRE_FIELDS


def test_the_client_request_has_the_wire_fields():
    assert tuple(f.name for f in dataclasses.fields(PolicySettings)) == WIRE_FIELDS


def test_the_server_config_has_a_default_for_each_defaultable_setting():
    names = {f.name for f in dataclasses.fields(ServerConfig)}
    assert set(DEFAULTABLE_FIELDS) <= names
    config = ServerConfig(insecure=True, floor=0.01)
    assert config.policy_defaults() == {"policy": config.policy, "floor": 0.01}


@pytest.mark.parametrize("kwargs", [*INVALID, {"bootstrap": 1}, {"subset_count": 0},
                                    {"regularization": 0.0}])
def test_invalid_policy_configs_are_rejected(kwargs):
    with pytest.raises(PolicySettingsError, match=f"invalid {next(iter(kwargs))}"):
        PolicyConfig(**kwargs)


@pytest.mark.parametrize("kwargs", INVALID)
def test_the_client_refuses_what_the_server_refuses(kwargs):
    with pytest.raises(InvalidArgument, match=f"invalid {next(iter(kwargs))}"):
        PolicySettings(**kwargs)


def test_the_client_leaves_zero_to_the_server_default():
    # 0 is "the server's default" on the wire, so the client does not check it.
    assert PolicySettings(regularization=0.0, subset_count=0).subset_count == 0
    PolicyConfig(**{k: v for k, v in dataclasses.asdict(PolicySettings(floor=0.2)).items()
                    if v not in (0, None)})
