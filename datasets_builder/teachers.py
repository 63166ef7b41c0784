"""Teachers: who writes the rationale for (rendered CT image, true score).

* :class:`LLMTeacher`: a remote model asked through a client of :mod:`ctiqa.clients` (:class:`GeminiClient` or
  :class:`OpenAICompatClient`) with the versioned teacher prompt (:mod:`ctiqa.prompts`).
* :class:`TemplateTeacher`: an offline teacher for simulated data that words its rationale from the known
  degradation.

``explain(image, score, metadata) -> CallResult`` with ``result.rationale`` set on success. :func:`make_teacher`
builds one from CLI names. The clients, retries, results, costs and the config error live in :mod:`ctiqa.clients`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Protocol

from PIL import Image

from ctiqa import CTIQAError
from ctiqa.clients import CallResult, ClientConfigError, GeminiClient, OpenAICompatClient, RetryPolicy
from ctiqa.vocabulary import SEVERITIES, noise_severity, streak_severity


class Teacher(Protocol):
    """Writes a rationale for one rendered image whose true score is known.

    Attributes:
        model_id: recorded in the dataset's ``teacher`` column and part of the answer-cache key.
        cacheable: whether answers go through the on-disk cache (remote, paid teachers: yes).
    """

    model_id: str
    cacheable: bool

    async def explain(self, image: Image.Image, score: float, metadata: dict[str, Any] | None) -> CallResult:
        """``image``: the RGB image the student sees; ``score``: true score 0-4; ``metadata``: degradation
        record of simulated data (or None). Returns a result with ``rationale`` set when ``ok``."""
        ...

    async def aclose(self) -> None: ...


@dataclass(frozen=True)
class TeacherRequest:
    """What a remote teacher is sent beside the image: the user prompt, the system text and the JSON schema of the
    answer (``{"rationale": str, "score": number}``)."""

    prompt: str
    system: str | None
    schema: dict[str, Any] | None


class LLMTeacher:
    """A remote model as teacher: :func:`ctiqa.prompts.teacher_prompt`, ``TEACHER_SYSTEM`` and
    ``TEACHER_RESPONSE_SCHEMA`` sent through a client (:class:`GeminiClient` or :class:`OpenAICompatClient`).

    The synchronous path (:meth:`explain`) and the Gemini Batch path (:mod:`datasets_builder.batch`) share
    :meth:`request` (what is asked) and :meth:`accept` (when an answer counts).
    """

    cacheable = True

    def __init__(self, client: GeminiClient | OpenAICompatClient, model_id: str | None = None) -> None:
        self.client = client
        self.model_id = model_id or client.model

    def request(self, score: float, metadata: dict[str, Any] | None = None) -> TeacherRequest:
        """The prompt, system text and schema for an image whose true score is ``score`` (0-4); ``metadata``
        may carry ``grounding`` (the measured findings, :func:`ctiqa.findings.grounding`) and ``feedback`` (why
        the previous answer was rejected), both put into the prompt (:func:`ctiqa.prompts.teacher_prompt`)."""
        from ctiqa.prompts import TEACHER_RESPONSE_SCHEMA, TEACHER_SYSTEM, teacher_prompt

        md = metadata or {}
        return TeacherRequest(teacher_prompt(score, md.get("grounding"), md.get("feedback")), TEACHER_SYSTEM,
                              TEACHER_RESPONSE_SCHEMA)

    @staticmethod
    def accept(result: CallResult) -> CallResult:
        """Mark a schema-valid answer with an empty rationale as failed (``empty_answer``); returns ``result``."""
        if result.ok and not (result.rationale or "").strip():
            result.ok, result.error = False, "empty_answer: the JSON rationale is empty"
        return result

    async def explain(self, image: Image.Image, score: float, metadata: dict[str, Any] | None = None) -> CallResult:
        req = self.request(score, metadata)
        return self.accept(await self.client.generate(image, req.prompt, req.system, req.schema))

    async def aclose(self) -> None:
        await self.client.aclose()


class TemplateTeacher:
    """Offline teacher for SIMULATED data: writes a short rationale (about 30-60 words) from the known degradation.

    Noise wording follows the MEASURED noise class of the image (``metadata["grounding"]``, ctiqa.findings: the
    same grounding a real teacher is given) when present, else the expected quantum-noise standard deviation of
    the level (``noise_sigma_hu`` from degradations.json, else :func:`ctiqa.simulation.expected_noise_hu`);
    streak wording the number of projection views, edge and low-contrast wording and the verdict the score.
    Synonyms and sentence order are drawn from a RNG seeded by (``seed``, score, dose, views), so the text is
    reproducible but varied. Wording is anatomy-neutral (simulated base slices are head, chest, spine and
    abdomen) and never mentions artifacts the simulation does not make (metal, rings, motion, beam hardening).

    Classes: the bands of :mod:`ctiqa.vocabulary` (noise none / mild / moderate / severe below 17 / 32 / 60 HU and
    above; streaks none / mild / moderate / severe for views >= 512 / 256 / 128 and below), worded minimal / mild /
    moderate / heavy noise and no / faint / moderate / dense streaks. Score bands (LDCTIQA scale 0 bad ...
    4 excellent): >= 3.5, >= 2.5, >= 1.5, else.

    Raises (from ``explain`` / ``write``):
        CTIQAError: ``metadata`` lacks ``dose_fraction`` or ``n_views``: real data needs a real teacher.
    """

    cacheable = False
    model_id = "ctiqa-template-v1"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    # phrases per noise class of ctiqa.vocabulary.SEVERITIES (none, mild, moderate, severe; bands NOISE_BANDS_HU)
    _NOISE = [
        ["Image noise is minimal", "Noise is low and fine-grained", "Only minimal quantum mottle is present"],
        ["Mild noise is visible", "A mild, fine noise texture is present", "Noise is mild but noticeable"],
        ["Moderate grainy noise is present", "Noise is moderate and grainy", "A moderate mottled noise texture is present"],
        ["Heavy coarse noise dominates", "Noise is heavy and coarse", "Strong grainy mottle is present"],
    ]
    # phrases per streak class of ctiqa.vocabulary.SEVERITIES (bands STREAK_BANDS_VIEWS: views >= 512 none)
    _STREAK = [
        ["no streak artifacts are seen", "there are no visible streaks", "streak artifacts are absent"],
        ["faint streaks cross the field", "faint thin streaks are seen", "subtle streaking is present"],
        ["moderate streaks radiate across the slice", "moderate streak artifacts cross the soft tissue",
         "streaking of moderate intensity is visible"],
        ["dense streaks radiate across the whole slice", "pronounced streak artifacts cross the image",
         "strong streaking overlies the anatomy"],
    ]
    # (lower bound of score, edge phrases, low-contrast phrases)
    _EDGES = [
        (3.5, ["Organ and vessel edges are sharp", "Tissue margins and vessel walls are crisp"],
         ["low-contrast structures are well distinguished", "subtle density differences remain clear"]),
        (2.5, ["Organ edges are mostly sharp", "Tissue and vessel margins are largely preserved"],
         ["subtle low-contrast detail is slightly obscured", "low-contrast detectability is mildly reduced"]),
        (1.5, ["Organ edges are softened", "Tissue and vessel margins appear blurred"],
         ["low-contrast detectability is clearly reduced", "small low-contrast structures are hard to separate"]),
        (0.0, ["Organ edges are indistinct", "Tissue and vessel margins are largely lost"],
         ["low-contrast structures are obscured", "soft-tissue differences cannot be resolved"]),
    ]
    _VERDICT = [
        (3.5, ["Overall quality is excellent for diagnosis.", "The image is fully adequate for diagnostic reading."]),
        (2.5, ["Overall quality is good; diagnosis is only slightly limited.",
               "The image is diagnostic with minor limitations."]),
        (1.5, ["Overall quality is fair; confidence for subtle findings is reduced.",
               "The image is of limited diagnostic value for subtle findings."]),
        (0.0, ["Overall quality is poor and limits diagnostic use.", "The image is of poor diagnostic quality."]),
    ]
    _WHERE = ["in the soft tissue", "across the homogeneous soft-tissue regions", "over the soft tissue and fat"]

    def write(self, score: float, metadata: dict[str, Any] | None) -> str:
        """The rationale text (deterministic for the same inputs and seed).

        Raises:
            CTIQAError: missing ``dose_fraction`` / ``n_views``.
        """
        md = metadata or {}
        if md.get("dose_fraction") is None or md.get("n_views") is None:
            raise CTIQAError(
                "the template teacher writes rationales from the known degradation and needs degradations.json "
                "metadata (dose_fraction, n_views) for every image; this data has none (real LDCTIQA?): use "
                "--teacher gemini or --teacher openai")
        dose, views = float(md["dose_fraction"]), int(md["n_views"])
        sigma = md.get("noise_sigma_hu")
        if sigma is None:
            from ctiqa.simulation import expected_noise_hu

            sigma = expected_noise_hu(dose, views)
        sigma = float(sigma)
        rng = random.Random(f"{self.seed}|{score:.3f}|{dose:.4f}|{views}")
        # grounded: the measured class of the image, as a real teacher is told; else the simulator's sigma
        cls = (md.get("grounding") or {}).get("noise_severity") or noise_severity(sigma)
        noise = rng.choice(self._NOISE[SEVERITIES.index(cls)])
        streak = rng.choice(self._STREAK[SEVERITIES.index(streak_severity(views))])
        _, edges, contrast = next(row for row in self._EDGES if score >= row[0] or row[0] == 0.0)
        verdict = rng.choice(next(p for lo, p in self._VERDICT if score >= lo or lo == 0.0))
        where = rng.choice(self._WHERE)
        s1 = f"{noise} {where}, and {streak}." if rng.random() < 0.5 else f"{noise} {where}; {streak}."
        s2 = f"{rng.choice(edges)}, and {rng.choice(contrast)}."
        body = [s1, s2] if rng.random() < 0.7 else [s2, s1]
        return " ".join([*body, verdict])

    async def explain(self, image: Image.Image, score: float, metadata: dict[str, Any] | None = None) -> CallResult:
        text = self.write(score, metadata)
        return CallResult(ok=True, text=text, parsed={"rationale": text, "score": float(score)},
                          finish_reason="STOP", model=self.model_id)

    async def aclose(self) -> None:
        return None


TEACHERS = ("gemini", "openai", "template")
DEFAULT_MODELS = {"gemini": "gemini-2.5-pro", "openai": None, "template": TemplateTeacher.model_id}


def make_teacher(name: str, *, model: str | None = None, base_url: str | None = None,
                 max_output_tokens: int | None = None, thinking_budget: int | None = 2048,
                 temperature: float | None = None, timeout_s: float = 300.0, retry: RetryPolicy | None = None,
                 seed: int = 0) -> Teacher:
    """Build a teacher from CLI names.

    Args:
        name: ``gemini``, ``openai`` or ``template``.
        model: model id (gemini default ``gemini-2.5-pro``; openai: required, the served model name).
        base_url: API root (required for ``openai``; optional for ``gemini``, e.g. a proxy or test server).
    Raises:
        ClientConfigError: unknown name, missing model/base URL/API key.
    """
    if name == "template":
        return TemplateTeacher(seed=seed)
    if name == "gemini":
        client: GeminiClient | OpenAICompatClient = GeminiClient(
            model or DEFAULT_MODELS["gemini"], base_url=base_url, max_output_tokens=max_output_tokens or 8192,
            thinking_budget=thinking_budget, temperature=temperature, timeout_s=timeout_s, retry=retry)
        return LLMTeacher(client)
    if name == "openai":
        if not base_url or not model:
            raise ClientConfigError("--teacher openai needs --base-url (e.g. http://localhost:8000/v1) and --model "
                                     "(the served model name)")
        client = OpenAICompatClient(model, base_url=base_url, max_output_tokens=max_output_tokens or 2048,
                                    temperature=temperature, timeout_s=timeout_s, retry=retry)
        return LLMTeacher(client)
    raise ClientConfigError(f"unknown teacher {name!r}; choose one of {', '.join(TEACHERS)}")


