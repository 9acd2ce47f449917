"""Secrets from Prefect blocks, resolved here so that `mlpipe/` never imports Prefect."""

from __future__ import annotations

from prefect.blocks.system import Secret

from mlpipe.config import AnonymizeConfig
from mlpipe.errors import MlpipeError


def pseudonym_key(config: AnonymizeConfig) -> bytes | None:
    """The HMAC key from the configured Secret block; None when none is configured.

    A configured block that is missing or empty stops the run: falling back to another key
    would silently change every pseudonym.
    """
    if config.key_secret_block is None:
        return None
    try:
        value = Secret.load(config.key_secret_block).get()
    except (ValueError, KeyError):
        raise MlpipeError(
            f"Prefect Secret block '{config.key_secret_block}' not found (anonymize.key_secret_block)"
        ) from None
    if not value:
        raise MlpipeError(f"Prefect Secret block '{config.key_secret_block}' is empty (anonymize.key_secret_block)")
    return str(value).encode()
