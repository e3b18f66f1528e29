"""Does the agent trigger segmentation? Decided by ``lens_train.inference.agent``'s own router.

Each routing sample is a fresh first turn: the current image is the sample's (none when
it has none) and nothing has been segmented before. The frozen MLLM gets the agent's
few-shot router prompt (``lens_train.inference.agent.ROUTER_PROMPT``, via ``LensAgent.route``);
its answer is parsed (``parse_intent``), with the agent's keyword fallback
(``heuristic_intent``) when it names no intent. As in ``LensAgent.step``, a
``followup`` answer with an empty memory is decided afresh by the keywords (Algorithm
S1, lines 10-11). Segmentation is triggered iff the intent is ``segmentation``.

``decided_by`` says which decided: ``mllm`` or ``heuristic``. A random or small MLLM
(``tiny``, ``toy``) rarely names an intent, so its scores mostly measure the fallback.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from PIL import Image

from ..inference.agent import LensAgent, heuristic_intent


@dataclass(frozen=True)
class RouteDecision:
    """The router's decision for one instruction."""

    intent: str
    decided_by: str
    answer: str

    @property
    def triggered(self) -> bool:
        return self.intent == "segmentation"


def router_agent(generate: Any) -> "LensAgent":
    """``lens-chat``'s agent reduced to its router: ``generate`` is the frozen MLLM's generation.

    Routing needs only the MLLM (``LensAgent.route`` calls nothing else), so no LENS run
    is attached; the agent is never asked to segment here.
    """
    return LensAgent(None, generate=generate)  # type: ignore[arg-type]  # no segmenter: routing only


def decide(agent: "LensAgent", query: str, image: Image.Image | None) -> RouteDecision:
    """The agent's routing of ``query`` as a first turn about ``image`` (see the module docstring)."""
    has_image = image is not None
    intent = agent.route(query, has_image, False, image=image)
    _, source, answer = agent.last_route
    if intent == "followup":  # impossible with an empty memory: the keywords decide (they never say followup here)
        intent, source = heuristic_intent(query, has_image=has_image, has_memory=False), "heuristic"
    return RouteDecision(intent=intent, decided_by=source, answer=answer)
