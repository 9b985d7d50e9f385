"""The data layer: read chat records, tokenize and mask them, pack them once to disk, and serve
layout-independent global batches. One module per concern:

- ``readers`` / ``records``: json/jsonl/parquet/hub through ``datasets``; record shapes -> messages
- ``tokenizer`` / ``templates`` / ``generation`` / ``tokenize``: HF or sentencepiece; llama3/chatml/plain/tokenizer
  templates, and tokenizer_generation (the last answer after the generation prompt, for reasoning models);
  supervised = answer + end-of-turn, from character offsets; shifted loss mask
- ``packing`` / ``storage`` / ``pipeline`` / ``prepare``: best-fit packing, mmap format, the CLI
- ``provenance``: what a prepared split was made from, and whether a config still asks for it
- ``loader`` / ``collate``: ``PackedDataset`` rows -> DP-rank micro-batches (padded or THD packed)

See ``docs/data.md``.
"""
