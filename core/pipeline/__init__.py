"""kiln's pipelines: convert_weight, gen_config, compile (and the JIT cache)."""
