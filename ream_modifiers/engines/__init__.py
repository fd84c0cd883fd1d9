"""Pure tensor math of the expert-reduction methods (no llm-compressor imports)."""
