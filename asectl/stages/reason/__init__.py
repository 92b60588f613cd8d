"""``reason``: an LLM reasons over a card's OCR'd record, Eq. (1) of the paper:

    LLM's answer = LLM(prompt_LLM, g(OCR(image)))

``g`` is the data preparation: the parsed record in words, plus prior knowledge from the training split
(per-class typical statistics) and the record's deviation from it. The parts:

- ``priors``: the training priors and the numbers a record is compared by;
- ``prompt``: versioned templates (``asectl/prompts``), the record as text, the answer schema, the
  answer's text form that the text encoder reads downstream;
- ``stage``: ``ReasonSettings`` and ``run_reason`` (cached per image; cards whose prompts read alike
  share one answer).
"""

from asectl.stages.reason.priors import (
    FIELD_WORDS,
    PRIOR_FEATURES,
    PRIORS_FORMAT,
    SCALAR_FIELDS,
    SHARE_FEATURES,
    SHOWN_FEATURES,
    build_priors,
    card_features,
    check_priors,
    class_distances,
    deviation_scale,
    priors_from_dataset,
    priors_sha256,
)
from asectl.stages.reason.prompt import (
    ANSWER_KEYS,
    AXES,
    CARD_PLACEHOLDERS,
    DEFAULT_PROMPT,
    DEVIATION_KINDS,
    HINT_FREE_PROMPT,
    HINT_PLACEHOLDERS,
    PLACEHOLDERS,
    PROMPTS_DIR,
    RATIONALE_MAX_CHARS,
    SEVERITIES,
    VERDICTS,
    PromptTemplate,
    answer_only_text,
    answer_schema,
    answer_text,
    card_levels,
    card_summary,
    deviation_text,
    hint_free_prompt,
    load_prompt,
    parse_answer,
    priors_text,
    prompt_names,
    record_sentence,
)
from asectl.stages.reason.stage import (
    ANSWER_STAGE,
    DECODER,
    DEFAULT_MAX_TOKENS,
    RECORD_FORMAT,
    STAGE,
    ReasonSettings,
    Sampling,
    run_reason,
)

__all__ = [n for n in dir() if not n.startswith("__") and n not in ("priors", "prompt", "stage")]
