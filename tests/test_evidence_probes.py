"""`lorakit.evidence.probes`: mean reciprocal rank on known similarity matrices, which probe a recipe gets, and the
FAQ-retrieval probe on the real MiniLM encoder."""

from __future__ import annotations

import torch

from lorakit.evidence.probes import mean_reciprocal_rank, probe_for, run_probe


def test_knowledge_probe(minilm) -> None:
    assert mean_reciprocal_rank(torch.eye(4)) == 1.0
    swapped = torch.tensor([[0.0, 1.0], [1.0, 0.0]])  # each query ranks its answer second
    assert mean_reciprocal_rank(swapped) == 0.5
    assert probe_for("sequence-classification", "rotten-tomatoes") == "faq-retrieval"
    assert probe_for("causal-lm", "faq-en") == "general-perplexity"
    assert probe_for("image-classification", "mnist-5k") is None
    model, tokenizer = minilm
    score = run_probe("faq-retrieval", model, tokenizer, limit=16)
    assert 0.5 < score <= 1.0  # the pretrained encoder matches questions to their answers
