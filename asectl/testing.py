"""Material for tests and benchmarks, built on the spot: no weights are ever downloaded.

``build_tiny_instructblip(folder)`` writes a complete InstructBLIP folder (config, safetensors weights,
language-model tokenizer, Q-Former tokenizer, image processor, processor config) that
``InstructBlipProcessor.from_pretrained`` / ``InstructBlipForConditionalGeneration.from_pretrained`` load
like a real checkpoint. The tokenizers are trained here on a few sentences. Its answers are random words;
it exists to exercise the real loading, batching, generation and caching code paths (also on a GPU).

``sample_calibrated_cards`` draws logits and labels whose softmax is the true class probability (calibrated
scores without a model), and ``fresh_defect_errors`` measures how a way of choosing the decision rule on
held-out cards holds its defect-error target on fresh cards of the same source. tests/test_calibration.py
asserts the direction of these figures; bench/defect_cut_simulation.py reports them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from asectl.models.calibration import DecisionRule, decision_stats, defect_cuts, softmax

# Words the tiny tokenizers know: enough for the default prompt and a few answers.
_SENTENCES = [
    "Please comprehensively describe the distribution and shape of the image",
    "the pink dots are shifted right and slightly down from the centre",
    "the dots form a ring with a hollow centre",
    "the dots form two clusters along a tilted axis",
    "the distribution is round compact and centred in the circle",
    "a few isolated outliers lie far from the main group",
]


def _train_lm_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=["<pad>", "<s>", "</s>", "<unk>"])
    tok.train_from_iterator(_SENTENCES, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
    )


def _train_qformer_tokenizer():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.train_from_iterator(_SENTENCES, trainer=trainers.WordPieceTrainer(vocab_size=200, special_tokens=specials))
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )


def build_tiny_instructblip(folder: str | Path, seed: int = 0, image_size: int = 32, num_query_tokens: int = 4) -> Path:
    """Write a tiny random InstructBLIP (Llama text model) to ``folder`` and return the folder."""
    import torch
    from transformers import (
        BlipImageProcessor,
        InstructBlipConfig,
        InstructBlipForConditionalGeneration,
        InstructBlipProcessor,
        InstructBlipQFormerConfig,
        InstructBlipVisionConfig,
        LlamaConfig,
    )

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_lm_tokenizer()
    qformer_tokenizer = _train_qformer_tokenizer()
    image_processor = BlipImageProcessor(size={"height": image_size, "width": image_size})
    # The processor adds the "<image>" token to the language-model tokenizer.
    processor = InstructBlipProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        qformer_tokenizer=qformer_tokenizer,
        num_query_tokens=num_query_tokens,
    )
    vocab = len(tokenizer)
    text_config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    vision_config = InstructBlipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        image_size=image_size,
        patch_size=8,
    )
    qformer_config = InstructBlipQFormerConfig(
        vocab_size=len(qformer_tokenizer),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=qformer_tokenizer.pad_token_id,
    )
    config = InstructBlipConfig(
        vision_config=vision_config,
        qformer_config=qformer_config,
        text_config=text_config,
        num_query_tokens=num_query_tokens,
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
    )
    torch.manual_seed(seed)
    model = InstructBlipForConditionalGeneration(config).eval()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


# ---------------------------------------------------------------------------------------------------
# Simulated calibrated scores

CLASSES = ("normal", "type1", "type2", "type3", "type4")


def sample_calibrated_cards(
    n: int, temperature: float, seed: int, classes: tuple[str, ...] = CLASSES
) -> tuple[np.ndarray, np.ndarray]:
    """Logits and labels drawn so that softmax(logits / temperature) are the true class probabilities."""
    rng = np.random.default_rng(seed)
    y_mean = rng.integers(0, len(classes), n)
    logits = rng.normal(0, 1.5, (n, len(classes)))
    logits[np.arange(n), y_mean] += 3.0
    cum = np.cumsum(softmax(logits, temperature), axis=1)
    y = np.minimum((rng.random((n, 1)) > cum).sum(axis=1), len(classes) - 1)
    return logits, y


def lowest_cut_anywhere(
    probs: np.ndarray, y: np.ndarray, target: float, classes: tuple[str, ...] = CLASSES
) -> float | None:
    """The defect threshold as fuse-train chose it before: the lowest cut meeting the target anywhere."""
    cuts, errors = defect_cuts(probs, y, classes)
    met = cuts[errors <= target]
    return float(met[-1]) if len(met) else None


def fresh_defect_errors(
    rule_of: Callable[[np.ndarray, np.ndarray], DecisionRule], draws: int, n: int, classes: tuple[str, ...] = CLASSES
) -> list[float]:
    """Defect error on 40,000 fresh cards of rules chosen on ``draws`` held-out sets of ``n`` cards
    (``rule_of(probs, y)``); a draw whose rule grants no defect decision is left out."""
    fresh_logits, fresh_y = sample_calibrated_cards(40000, 1.0, seed=99, classes=classes)
    fresh = softmax(fresh_logits)
    out = []
    for d in range(draws):
        logits, y = sample_calibrated_cards(n, 1.0, seed=1000 + d, classes=classes)
        rule = rule_of(softmax(logits), y)
        if rule.defect_threshold is not None:
            out.append(decision_stats(rule.decide(fresh), fresh_y, fresh.argmax(1), classes)["defect_error"])
    return out
