"""A predictor for closed answers (yes/no, A/B) whose preference between the choices can be calibrated.

A small LM asked to choose has a position and a label bias that has nothing to do with the question:
SmolLM2-135M picks "A" for 41 of the 42 "X or Y" HotpotQA dev questions and "yes" for every yes/no
question. :class:`ChoicePredict` is a ``dspy.Predict`` with one more parameter, ``choice_bias``: an
additive offset on each choice's logit (``{"B": 1.3}``), which the local engine adds to the one
constrained token it decodes (:func:`apexdsp.lm.adapter.choice_constraint`). Offsets are fitted at
compile time on training questions (:class:`apexdsp.optimizers.calibration.ChoiceCalibration`), the way
contextual calibration fits a bias from data instead of trusting the raw argmax; they are saved with the
predictor's demos in the compiled program's JSON state.

Empty offsets (the uncompiled program) change nothing, and nothing is sent to the LM. Remote LMs (an
OpenAI-compatible server) are not constrained to one token and ignore the offsets: their token ids are
not known here.
"""

from __future__ import annotations

from typing import Any

import dspy

from apexdsp.lm.adapter import CHOICE_BIAS  # the LM setting the adapter reads (and removes)


class ChoicePredict(dspy.Predict):
    """``dspy.Predict`` over a signature with one ``Literal`` output, plus per-choice logit offsets."""

    def __init__(self, signature: Any, **config: Any):
        super().__init__(signature, **config)
        self.choice_bias: dict[str, float] = {}

    def forward(self, **kwargs: Any) -> dspy.Prediction:
        return super().forward(config=self._with_bias(kwargs.pop("config", None)), **kwargs)

    async def aforward(self, **kwargs: Any) -> dspy.Prediction:
        return await super().aforward(config=self._with_bias(kwargs.pop("config", None)), **kwargs)

    def _with_bias(self, config: dict[str, Any] | None) -> dict[str, Any]:
        """The call's LM settings plus the offsets (a call's own ``choice_bias`` wins: calibration probes)."""
        config = dict(config or {})
        if self.choice_bias and CHOICE_BIAS not in config:
            config[CHOICE_BIAS] = dict(self.choice_bias)
        return config

    def reset(self) -> None:
        super().reset()
        self.choice_bias = {}

    def dump_state(self, json_mode: bool = True) -> dict[str, Any]:
        return {**super().dump_state(json_mode=json_mode), CHOICE_BIAS: dict(self.choice_bias)}

    def load_state(self, state: dict[str, Any], **kwargs: Any) -> ChoicePredict:
        state = dict(state)
        bias = state.pop(CHOICE_BIAS, None) or {}  # states saved before calibration existed have none
        super().load_state(state, **kwargs)
        self.choice_bias = {str(k): float(v) for k, v in bias.items()}
        return self


def choice_values(predictor: dspy.Predict) -> tuple[str, ...]:
    """The choices of a predictor's single ``Literal`` output (``()`` for any other signature)."""
    from typing import Literal, get_args, get_origin

    outputs = list(predictor.signature.output_fields.values())
    if len(outputs) != 1 or get_origin(outputs[0].annotation) is not Literal:
        return ()
    return tuple(str(value) for value in get_args(outputs[0].annotation))


__all__ = ["CHOICE_BIAS", "ChoicePredict", "choice_values"]
