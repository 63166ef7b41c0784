"""datasets_builder: teacher rationales for LDCTIQA-style data -> a chat-format dataset on the Hub or on disk.

Modules (each readable top to bottom; nothing is imported here so ``ctiqa`` sub-commands stay fast; this
package imports ``ctiqa``, never the reverse):

* :mod:`datasets_builder.teachers`: the teachers ``LLMTeacher`` (a remote model through a client of
  :mod:`ctiqa.clients`) and ``TemplateTeacher`` (offline, simulated data), ``make_teacher``.
* :mod:`datasets_builder.cache`: the append-only JSONL answer cache (resume after ``kill -9``).
* :mod:`datasets_builder.batch`: Gemini Batch Mode (``--batch``): jobs recorded beside the cache, resumed by a
  re-run, answers merged into the cache.
* :mod:`datasets_builder.checks`: rationale cleaning, the rejection rubric, artifact-term counts.
* :mod:`datasets_builder.card`: the dataset card (README.md).
* :mod:`datasets_builder.build`: ``ctiqa build-dataset``: render, ask, check, assemble, write / push.
"""
