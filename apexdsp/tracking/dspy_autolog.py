"""``mlflow.dspy.autolog`` covers apexdsp's optimizers whatever the import order.

``mlflow.dspy.autolog()`` patches ``compile`` of the ``dspy.Teleprompter`` subclasses that exist when it is
called (``Teleprompter.__subclasses__()``). An optimizer defined later, as apexdsp's are when
``apexdsp.optimizers`` is imported after autolog was turned on, would be left as it is: its compile's many
module calls (the teacher's runs, each candidate's validation pass) traced as if they were inference, and
``log_compiles`` recording nothing. An optimizer that derives from :class:`FollowsDSPyAutolog` as well has
autolog applied again, with the settings it was turned on with, the moment the class is defined.
"""

from __future__ import annotations

import inspect
import logging
import sys

logger = logging.getLogger(__name__)

FLAVOR = "dspy"


class FollowsDSPyAutolog:
    """Mixin for a ``Teleprompter`` subclass, listed before ``Teleprompter`` (``class X(FollowsDSPyAutolog,
    Teleprompter)``): DSPy wraps the class's ``compile`` first, and autolog then patches that, as it does for
    a class that existed when autolog was turned on."""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        reapply_dspy_autolog()


def reapply_dspy_autolog() -> bool:
    """Turn ``mlflow.dspy.autolog`` on again with the settings it is on with, so that it patches the
    teleprompters defined since; ``False`` (nothing done) when it is not on."""
    if "mlflow.dspy" not in sys.modules:  # autolog imports it: never turned on in this process
        return False
    import mlflow.dspy
    from mlflow.utils.autologging_utils import autologging_is_disabled, get_autologging_config

    if autologging_is_disabled(FLAVOR):
        return False
    names = inspect.signature(mlflow.dspy.autolog).parameters
    settings = {name: get_autologging_config(FLAVOR, name) for name in names}
    try:
        mlflow.dspy.autolog(**{name: value for name, value in settings.items() if value is not None})
    except Exception as error:  # noqa: BLE001 - tracing is an aid: the optimizer still works without it
        logger.warning("mlflow.dspy.autolog could not be applied to the optimizers defined since it was turned on "
                       "(%s: %s); call it after importing apexdsp.optimizers", type(error).__name__, error)
        return False
    return True


__all__ = ["FollowsDSPyAutolog", "reapply_dspy_autolog"]
