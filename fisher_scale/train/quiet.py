"""Library messages a fisher-scale user cannot act on, silenced by their text where they start, so that what is
left on the terminal (and in a log) is what needs reading. Every other warning and error still shows."""

from __future__ import annotations

import logging
import os
import warnings

#: deprecation notices raised inside transformers, PEFT and DeepSpeed, not by this package's calls
DEPRECATIONS = (
    r"`is_gradient_checkpointing` is deprecated",
    r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
)


class _Without(logging.Filter):
    def __init__(self, *texts: str) -> None:
        super().__init__()
        self.texts = texts

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(text in record.getMessage() for text in self.texts)


def quiet_driver() -> None:
    """On the driver: the deprecations; Ray's note that a local cluster has token authentication (this package's
    local Ray listens on loopback only); MLflow's note that it creates a new store's tables; Tune's banner."""
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        _Without("Token authentication is enabled for this Ray cluster")
    )
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    # Tune's own console output (a configuration box, a TensorBoard hint for a temporary folder) even at verbose=0:
    # its older output path is silent there, and the studies print their own live table
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")


def quiet_worker(*, use_gpu: bool) -> None:
    """On a Ray Train worker, before DeepSpeed is imported: the deprecations; Ray Train's line per report (the
    driver shows the reports); DeepSpeed's notes that a CPU run uses the CPU and that a client optimizer is
    "untested" under ZeRO (every optimizer here is one, and tested against its single-process run)."""
    for message in DEPRECATIONS:
        warnings.filterwarnings("ignore", message=message, category=FutureWarning)
    from ray.train.v2._internal.execution import context

    logging.getLogger(context.__file__).setLevel(logging.WARNING)  # Ray Train names this logger by its file
    if not use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # named, DeepSpeed takes it without its detection warning
    logging.getLogger("DeepSpeed").addFilter(_Without("untested optimizer"))
