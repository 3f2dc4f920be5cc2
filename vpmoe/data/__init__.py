"""SYNTH -> Harmony conversations -> packed, masked training shards, and the loader that reads them.

Modules: `prompt` (system/developer prompt config), `render` (one row -> tokens + label-aligned
masks, structured truncation), `shards` (Megatron-Core IndexedDataset .bin/.idx writer/reader),
`build` (sources, packing, manifest, resumable multi-process build), `loader` (training batches),
`verify` (shard checks), `cli` (`vpmoe data render|build|verify`). See docs/data.md.
"""


class DataError(ValueError):
    """Bad input data or a bad/corrupt dataset on disk; the message names the file (and row/field)."""
