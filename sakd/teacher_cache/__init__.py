"""The teacher cache (``sakd cache-teacher``): the manifest and its hashes, the sparse-row codec, the reader the
loop uses, and the builder."""
