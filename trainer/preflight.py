"""Checks run before anything heavy is built: a bad job fails in seconds, in one line.

`preflight(config)` reads and tokenises the target's and the configured
tasks' files, and asks the server where its store is. A trainer that writes
its sketch rows into a store the server does not read would train on a
uniform mixture while every commit failed; here it stops, naming both
places. Every problem is a `ConfigError` whose message is one line (the
caller prints it and exits 2).
"""

from __future__ import annotations

import dataclasses

from gradmix.client.errors import GradmixError
from gradmix.store import StoreError
from gradmix.store.backend import url_identity
from gradmix.trainer.config import TrainConfig
from gradmix.trainer.data import MAX_TARGET_TRUNCATED, Tokenizer, read_task
from gradmix.trainer.errors import ConfigError, DataError
from gradmix.trainer.setup import build_client

#: Seconds the server gets to answer the start-up check.
SERVER_CHECK_TIMEOUT = 5.0


def preflight(config: TrainConfig, tokenizer: Tokenizer) -> TrainConfig:
    """Check the job's data files and its server before the model is built; returns the
    config with `store` set to the server's store when the job left it empty.

    Raises:
        ConfigError: a data file is missing or malformed, the server cannot be
            reached, or the server's store is not the trainer's store.
    """
    files = {"[data].target": config.data.target}
    files.update({f"[data].tasks.{t}": p for t, p in config.data.tasks.items()})
    for key, path in files.items():
        limit = MAX_TARGET_TRUNCATED if key == "[data].target" else 1.0
        try:  # the trainer reads them again, and warns about them, when it loads them
            read_task(path, tokenizer, config.data.max_length, max_truncated=limit,
                       warn=False)
        except DataError as error:
            raise ConfigError(f"{key}: {_one_line(error)}") from error
    return check_server(config)


def check_server(config: TrainConfig) -> TrainConfig:
    """The server answers, and its store is `config.store` (empty: taken from the server).

    Raises:
        ConfigError: unreachable server, or another store (both are named).
    """
    try:
        with build_client(config, timeout=SERVER_CHECK_TIMEOUT) as client:
            info = client.server_info()
    except GradmixError as error:
        raise ConfigError(
            f"selection server {config.server} did not answer ({error.code.name}: "
            f"{_one_line(error.details)}); start it (gradmix-server) or set server / "
            "GRADMIX_SERVER / --server"
        ) from error
    if config.upload:
        return config  # rows go over gRPC: the trainer never opens a store
    if not config.store:
        place = info.store_identity
        store = place.removeprefix("file:") if place.startswith("file:") else info.store_url
        return dataclasses.replace(config, store=store)
    try:
        mine = url_identity(config.store)
    except StoreError as error:
        raise ConfigError(f"store {config.store!r}: {_one_line(error)}") from error
    if info.store_identity != mine:
        raise ConfigError(
            f"the trainer's store is {_place(mine)} but the server at {config.server} "
            f"uses {_place(info.store_identity)}: set the job's store (or GRADMIX_STORE / "
            "--store) to the server's store, or leave it out"
        )
    return config


def _place(identity: str) -> str:
    return identity.removeprefix("file:")


def _one_line(text: object) -> str:
    return " ".join(str(text).split())
