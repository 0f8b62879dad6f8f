"""kiln's runtime: engine, KV cache use, sampler, tokenizer, conversation templates, chat, server."""
