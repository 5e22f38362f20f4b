"""MLflow tracking: every evaluation, compile and index job is one run with provenance attached."""

from apexdsp.tracking.provenance import data_file_params, file_sha256, git_commit
from apexdsp.tracking.run import (
    COMPILE_EXPERIMENT, TrackedRun, UntrackedRun, disable_tracking, flat_params, run_active, tracked_run,
    tracking_disabled, tracking_enabled, write_json_atomic, write_text_atomic,
)
from apexdsp.tracking.store import (
    TrackingUnavailable, configure_tracking, default_tracking_uri, ensure_experiment, probe_tracking,
)


def enable_dspy_tracing(experiment: str | None = None) -> None:
    """Trace every DSPy module and LM call to MLflow (``mlflow.dspy.autolog``), in ``experiment`` if given."""
    import mlflow

    configure_tracking()
    if experiment:
        mlflow.set_experiment(experiment_id=ensure_experiment(experiment))
    mlflow.dspy.autolog()


__all__ = [
    "COMPILE_EXPERIMENT", "TrackedRun", "TrackingUnavailable", "UntrackedRun", "configure_tracking",
    "data_file_params", "disable_tracking", "default_tracking_uri", "enable_dspy_tracing", "ensure_experiment",
    "file_sha256", "flat_params", "git_commit", "probe_tracking", "run_active", "tracked_run",
    "tracking_disabled", "tracking_enabled",
    "write_json_atomic", "write_text_atomic",
]
