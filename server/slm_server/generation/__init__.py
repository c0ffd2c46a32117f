"""The generation layer: a model turns prompt tokens into generated tokens, text and log-probabilities.

Modules, each importing only those above it (tests/server/test_structure.py holds the import graph
acyclic, and this layer free of the HTTP and monitoring layers above it):

- `types`: what a generation is made of (settings, result, tokens with their log-probabilities, the
  loaded model's facts, the statistics an engine reports) and `Engine`, what the service needs of a
  model. No torch: the service, the routers and the metrics read these.
- `structured`: grammars (JSON schemas, regular expressions, choices, Lark) compiled by llguidance.
- `detokenize`: generated tokens into text deltas, incrementally, with stop strings.
- `prefix_cache`: prompt prefixes' KV caches.
- `sampling`: the choice of the next token from one position's logits (torch).
- `scheduler`: continuous batching over a `BatchableModel` (torch).
- `transformers_engine`: any Hugging Face causal LM (torch, transformers).
- `echo_engine`: a no-op engine for benchmarks of the HTTP and monitoring layers.
"""
